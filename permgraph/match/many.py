"""Many models: MergeMany (Git Re-Basin) and cycle-consistent pairwise maps.

**MergeMany.** Every model ``i`` gets a permutation ``P_i`` into one shared frame. A round
visits the models in a random order; model ``i`` is weight-matched to the average of the
*others* as they currently sit in the frame, ``mean_{j≠i} P_j(θ_j)``. Rounds repeat until
one changes nothing. The merged model is the average of the aligned models.

**Cycle consistency.** Maps aligned through a shared frame compose exactly: the map from
model ``i`` to model ``j`` is ``P_ij = P_j⁻¹ ∘ P_i`` (into the frame, then out to ``j``), so
``P_jk ∘ P_ij = P_ik`` for every triple, by construction. Maps found pair by pair (weight
matching of each pair on its own) need not agree around a cycle; `cycle_error` measures
how often they do not.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from permgraph.errors import SpecMismatchError
from permgraph.match._common import MatchError, check_finite, check_spec
from permgraph.match.weight import weight_matching
from permgraph.spec import PermSpec

__all__ = ["merge_many", "MergeManyResult", "cycle_consistent_maps", "pairwise_maps", "cycle_error"]

Maps = dict[tuple[int, int], dict[str, torch.Tensor]]


@dataclass
class MergeManyResult:
    """What `merge_many` returns.

    Attributes:
        merged: the average of the aligned models (floating tensors; the others, such as
            BatchNorm's counters, from the first model).
        states: each model's state_dict aligned into the shared frame.
        perms: each model's permutation into the frame (``states[i] = spec.apply(perms[i],
            inputs[i])``).
        rounds: rounds run.
        converged: a round changed no permutation before ``max_iter`` rounds.
        changed: per round, the models whose permutation changed.
        seconds: wall time of the whole call.
    """

    merged: dict[str, torch.Tensor]
    states: list[dict[str, torch.Tensor]]
    perms: list[dict[str, torch.Tensor]]
    rounds: int = 0
    converged: bool = False
    changed: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0


def _check_states(spec: PermSpec, states: Any) -> list[Mapping[str, torch.Tensor]]:
    check_spec(spec)
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise MatchError(f"states must be a list of state_dicts, got {type(states).__name__}")
    if len(states) < 2:
        raise MatchError(f"aligning models needs at least two state_dicts, got {len(states)}")
    keys = [k for k in spec.shapes]
    for i, sd in enumerate(states):
        if not isinstance(sd, Mapping):
            raise SpecMismatchError(f"states[{i}] must be a state_dict (a mapping of names to tensors), got {type(sd).__name__}")
        spec.check_state_dict(sd, f"states[{i}]")
        check_finite(sd, keys, f"states[{i}]")
    return list(states)


def _average(states: Sequence[Mapping[str, torch.Tensor]], skip: int | None = None) -> dict[str, torch.Tensor]:
    """The mean of the floating tensors of ``states`` (but ``states[skip]``); the others from
    the first model kept."""
    use = [s for i, s in enumerate(states) if i != skip]
    out: dict[str, torch.Tensor] = {}
    for k, v in use[0].items():
        if v.is_floating_point():
            total = v.clone()
            for s in use[1:]:
                total += s[k].to(v.device)
            out[k] = total / len(use)
        else:
            out[k] = v
    return out


def merge_many(
    spec: PermSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    max_iter: int = 100,
    seed: int = 0,
    lap: str = "auto",
    progress: bool = False,
) -> MergeManyResult:
    """Align N models into one shared frame and average them (Git Re-Basin's MergeMany).

    See the module docstring. Each weight matching is warm-started from the model's
    current permutation.

    Args:
        spec: the PermSpec of the architecture (`permgraph.infer`).
        states: two or more state_dicts of that architecture (not modified); tensors are
            read on the first model's devices.
        max_iter: the most rounds.
        seed: seed of the visiting order (and of weight matching's).
        lap: the LAP backend (see `permgraph.lap.solve`).
        progress: show a tqdm bar over the rounds.

    Returns:
        A `MergeManyResult`: the merged state_dict, the aligned states, their permutations.

    Raises:
        MatchError: fewer than two state_dicts, or a bad ``max_iter``.
        SpecMismatchError: a state_dict does not match the spec (different architectures),
            or holds NaN/inf.

    Examples:
        >>> import torch, permgraph
        >>> from permgraph.match.many import merge_many
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> a = mlp.state_dict()
        >>> gen = torch.Generator().manual_seed(0)
        >>> states = [spec.apply(spec.random_permutation(gen), a) for _ in range(3)]
        >>> result = merge_many(spec, states)
        >>> all(torch.allclose(result.merged[k], result.states[0][k]) for k in a)
        True
    """
    t_start = time.perf_counter()
    states = _check_states(spec, states)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise MatchError(f"max_iter must be a positive int, got {max_iter!r}")
    first = states[0]
    models = [{k: v.detach().to(first[k].device) for k, v in sd.items()} for sd in states]
    perms = [spec.identity() for _ in models]
    aligned = [dict(m) for m in models]
    result = MergeManyResult(merged={}, states=aligned, perms=perms)
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="merge many", unit="round")
    try:
        for _ in range(max_iter):
            changed = []
            for i in torch.randperm(len(models), generator=gen).tolist():
                others = _average(aligned, skip=i)
                p = weight_matching(spec, others, models[i], seed=seed, lap=lap, init=perms[i])
                if any(not torch.equal(p[g], perms[i][g]) for g in p):
                    changed.append(i)
                    perms[i] = p
                    aligned[i] = spec.apply(p, models[i], check=False)
            result.rounds += 1
            result.changed.append(sorted(changed))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(changed=len(changed))
            if not changed:
                result.converged = True
                break
    finally:
        if bar is not None:
            bar.close()
    result.merged = _average(aligned)
    result.seconds = time.perf_counter() - t_start
    return result


def cycle_consistent_maps(spec: PermSpec, perms: Sequence[Mapping[str, torch.Tensor]]) -> Maps:
    """Pairwise maps composed through a shared frame.

    Args:
        spec: the PermSpec.
        perms: each model's permutation into the shared frame (``MergeManyResult.perms``).

    Returns:
        ``{(i, j): P_ij}`` for every ordered pair ``i != j``, where ``spec.apply(P_ij,
        states[i])`` is model ``i`` aligned to model ``j``: ``P_ij = P_j⁻¹ ∘ P_i``. Every
        triple satisfies ``P_jk ∘ P_ij = P_ik`` exactly.

    Raises:
        MatchError: fewer than two permutations.
        PermutationError: one is not a permutation of every group.

    Examples:
        >>> import torch, permgraph
        >>> from permgraph.match.many import cycle_consistent_maps, cycle_error
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> gen = torch.Generator().manual_seed(0)
        >>> maps = cycle_consistent_maps(spec, [spec.random_permutation(gen) for _ in range(3)])
        >>> cycle_error(spec, maps)
        0.0
    """
    check_spec(spec)
    if isinstance(perms, Mapping) or not isinstance(perms, Sequence) or len(perms) < 2:
        n = len(perms) if isinstance(perms, Sequence) and not isinstance(perms, Mapping) else type(perms).__name__
        raise MatchError(f"cycle_consistent_maps needs a list of at least two permutations, got {n}")
    for p in perms:
        spec.check_permutation(p)
    inverse = [spec.inverse(p) for p in perms]
    return {
        (i, j): spec.compose(perms[i], inverse[j])
        for i, j in itertools.permutations(range(len(perms)), 2)
    }


def pairwise_maps(
    spec: PermSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    *,
    max_iter: int = 100,
    seed: int = 0,
    lap: str = "auto",
    progress: bool = False,
) -> Maps:
    """Independent pairwise maps: weight matching of each pair on its own.

    For ``i < j``, ``P_ij`` aligns model ``i`` to model ``j`` by weight matching, and
    ``P_ji`` is its inverse. Nothing ties the pairs together, so the maps need not compose
    around a cycle (compare `cycle_consistent_maps`).

    Args:
        spec: the PermSpec.
        states: two or more state_dicts.
        max_iter: weight matching's most sweeps per pair.
        seed: weight matching's seed.
        lap: the LAP backend.
        progress: show a tqdm bar over the pairs.

    Returns:
        ``{(i, j): P_ij}`` for every ordered pair ``i != j``.

    Raises:
        MatchError: fewer than two state_dicts.
        SpecMismatchError: a state_dict does not match the spec, or holds NaN/inf.
    """
    states = _check_states(spec, states)
    pairs = list(itertools.combinations(range(len(states)), 2))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="pairwise matching", unit="pair")
    maps: Maps = {}
    for i, j in pairs:
        p = weight_matching(spec, states[j], states[i], max_iter=max_iter, seed=seed, lap=lap)
        maps[(i, j)] = p
        maps[(j, i)] = spec.inverse(p)
    return maps


def cycle_error(spec: PermSpec, maps: Mapping[tuple[int, int], Mapping[str, torch.Tensor]]) -> float:
    """The fraction of units where going ``i -> j -> k`` differs from going ``i -> k``.

    Over every ordered triple of distinct models and every unit of every group, compares
    ``P_jk ∘ P_ij`` with ``P_ik``.

    Args:
        spec: the PermSpec.
        maps: ``{(i, j): P_ij}`` for every ordered pair of distinct models (as returned by
            `cycle_consistent_maps` or `pairwise_maps`).

    Returns:
        A number in ``[0, 1]``; 0 for cycle-consistent maps (and for fewer than three
        models, which have no triple).

    Raises:
        MatchError: a pair is missing.
        PermutationError: a map is not a permutation of every group.
    """
    check_spec(spec)
    models = sorted({i for pair in maps for i in pair})
    missing = [(i, j) for i, j in itertools.permutations(models, 2) if (i, j) not in maps]
    if missing:
        raise MatchError(f"maps is missing the pairs {missing[:5]}: give a map for every ordered pair of models")
    wrong, total = 0, 0
    for i, j, k in itertools.permutations(models, 3):
        via = spec.compose(maps[(i, j)], maps[(j, k)])
        direct = maps[(i, k)]
        for g in spec.groups:
            wrong += int((via[g.name].cpu() != direct[g.name].cpu()).sum())
            total += g.size
    return wrong / total if total else 0.0
