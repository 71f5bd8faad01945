"""Weight matching (Git Re-Basin, Alg. 1): coordinate descent over the groups of a PermSpec.

The objective is ``J(P) = Σ_T <A_T, P(B_T)>`` over every state_dict tensor ``T`` that some
group permutes. With every group but ``g`` fixed, ``J`` is linear in ``g``'s permutation:
``J = Σ_u S_g[u, p[u]] + const`` with ``S_g = Σ_{members m} A_m · B_mᵀ``, where ``A_m`` is
``A_T`` with the member axis brought to the front and read at the member's layout
positions (an ``(n, rest)`` matrix) and ``B_m`` is the same from ``B_T`` after every *other*
group's current permutation. Solving that LAP is one step; the groups are visited in a
random order (``order="random"``, the default) or in the order of their tensors in the
state_dict (``order="graph"``: input side first), sweep after sweep, until a whole sweep
improves nothing (``tol=0``, the default) or raises ``J`` by at most ``tol`` times what all
sweeps so far raised it. A LAP whose every row has its best column to itself is not solved:
those columns are the optimum.

**A forward first pass** (``first_pass="forward"``) replaces the first sweep by one in the
graph order in which each group reads only what is aligned already: the members whose other
groups it visited before (a layer's own weights, read through its input side), not those
read through groups still at their start (the next layer's input columns), which join
``S_g`` at the group's next visit. Each layer is thus matched as in layer-by-layer matching,
for about half a sweep's GEMMs (ResNet-50: 39 of 79 GFLOP); the pass is kept when it raises
``J`` (measured in full after it), and the descent goes on from there as usual.

**Nested groups.** Attention gives groups whose units are blocks of another group's units:
a head (``n = H``, blocks of ``D``) holds every within-head unit once. Taken one at a time,
such a pair locks up (with the heads misaligned, the within-head similarity is noise, and
the reverse), so a visit of the outer group first tries a *joint* move: the similarity of
head ``i`` of A and head ``j`` of B is the best alignment of their inner units (one small
LAP per pair), the heads take the LAP of that matrix, the inner groups their best response
to the new heads, and the move is kept when it raises ``J``; otherwise the visit is the
plain step above. With a group of its own in each head (``heads="independent"``), applied
after the heads group and so permuting inside whatever head it brought, the joint move is
the heads group's only step: its plain ``S_g`` would read B's head ``j`` under head ``j``'s
inner permutation, where head ``i``'s applies once ``j`` moves to ``i``.

**Only what a change invalidates is recomputed.** A group whose neighbours (the groups it
shares a tensor with) did not change since its last LAP is skipped. ``S_g`` is kept from
visit to visit, with the permutations each member's term was computed under; a visit adds,
for each member whose other axes were re-gathered since, the change of its term only:
``A_J · (B_new,J - B_old,J)ᵀ`` over the positions ``J`` that moved when one other axis
changed (after the first sweeps a neighbour's new permutation moves a tenth of its units or
fewer), the whole ``A_m · (B_new - B_old)ᵀ`` otherwise; the thin updates of one visit are
concatenated into one GEMM (each alone would cost a pass over ``S_g``). Products run on the compute device;
only the LAP runs on the host, on a float64 copy of ``-S_g``. Visits to groups that share no
tensor are independent: the LAP of a group of 1024 units or more runs in a thread
(``lap_threads``) while the next visits that share no tensor with it build their products and
solve their own (small or joint) LAPs, so the descent is the same step for step.

**Streaming.** Neither model is held whole: ``state_a`` and ``state_b`` may be lazy mappings
(a memory-mapped `permgraph.checkpoint.Checkpoint`), read one tensor at a time. Gathers run
on the stored tensor in its stored dtype (exact), and only the gathered piece is converted to
the compute dtype; a member of more than `CHUNK` elements is multiplied in pieces along its
largest other axis. What is kept between visits (every ``S_g``, and A's member matrices) stays
within ``max_memory``: member matrices are dropped first, then the least recently used
``S_g``, which its group's next visit rebuilds in full. The result does not depend on the
budget beyond float rounding.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch

from permgraph import lap as _lap
from permgraph.errors import SpecMismatchError
from permgraph.match._common import MatchError, check_finite, check_spec
from permgraph.match._wm_descent import RTOL, _Descent
from permgraph.match._wm_descent import run as _run
from permgraph.match._wm_problem import CHUNK, _Problem
from permgraph.spec import PermSpec

__all__ = ["weight_matching", "WeightMatchingHistory", "similarity_matrices", "DEFAULT_MAX_MEMORY"]
# importable from here: the benchmarks read _Problem
_ = (RTOL, CHUNK, _Problem)

#: What weight matching keeps between visits by default (similarities, converted tensors).
DEFAULT_MAX_MEMORY = 512 << 20

#: Weight matching stops when a sweep raises the objective by at most this fraction of what
#: all sweeps raised it (0: only when a sweep changes nothing).
DEFAULT_TOL = 0.0


@dataclass
class WeightMatchingHistory:
    """What :func:`weight_matching` did.

    Attributes:
        objective: ``Σ_T <A_T, P(B_T)>`` over the tensors the groups permute: first at the
            starting permutation, then after each sweep (non-decreasing).
        changed: per sweep, the groups whose permutation changed (in spec order).
        sweeps: number of sweeps run (the last one changed nothing when ``converged``).
        converged: a sweep improved no group before ``max_iter`` sweeps.
        stopped_by_tol: the descent stopped on ``tol`` (a sweep raised the objective by
            at most ``tol`` times what all sweeps had).
        seconds: wall time of the whole call.
        product_seconds: time spent building similarity matrices (GEMMs and gathers).
        lap_seconds: time spent in the LAP solver (host; summed over ``lap_threads``).
        laps: number of group LAPs solved (the small per-head-pair LAPs of joint moves
            are not counted).
        products: member terms computed (or changed) in full.
        updates: member terms updated from the units that moved only.
        reused: member terms found up to date.
        joint_moves: joint moves of nested groups (attention heads) kept.
        gemm_flops: floating-point operations of the similarity GEMMs.
        cache_peak: the most bytes kept between visits (within ``max_memory``).
        cache_evictions: entries dropped to stay within ``max_memory`` (a dropped
            similarity is rebuilt in full at the group's next visit).
    """

    objective: list[float] = field(default_factory=list)
    changed: list[list[str]] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = False
    seconds: float = 0.0
    product_seconds: float = 0.0
    lap_seconds: float = 0.0
    laps: int = 0
    products: int = 0
    updates: int = 0
    reused: int = 0
    joint_moves: int = 0
    gemm_flops: int = 0
    cache_peak: int = 0
    cache_evictions: int = 0
    stopped_by_tol: bool = False


def _validate(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], max_iter: int) -> None:
    check_spec(spec)
    for what, sd in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(sd, Mapping):
            raise SpecMismatchError(f"{what} must be a state_dict (a mapping of names to tensors), got {type(sd).__name__}")
        spec.check_state_dict(sd, what)
    keys = {m.key for g in spec.groups for m in g.members}
    check_finite(state_a, [k for k in spec.shapes if k in keys], "state_a")
    check_finite(state_b, [k for k in spec.shapes if k in keys], "state_b")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise MatchError(f"max_iter must be a positive int, got {max_iter!r}")


def _check_threads(lap_threads: Any) -> int:
    if lap_threads is None:
        return torch.get_num_threads()
    if isinstance(lap_threads, bool) or not isinstance(lap_threads, int) or lap_threads < 1:
        raise MatchError(f"lap_threads must be a positive int or None, got {lap_threads!r}")
    return lap_threads


def _check_descent(tol: Any, order: Any, first_pass: Any) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise MatchError(f"tol must be a number in [0, 1) (0: run to exact convergence), got {tol!r}")
    if order not in ("graph", "random"):
        raise MatchError(f"order must be 'graph' or 'random', got {order!r}")
    if first_pass not in ("sweep", "forward"):
        raise MatchError(f"first_pass must be 'sweep' or 'forward', got {first_pass!r}")


def _check_max_memory(max_memory: Any) -> int | None:
    if max_memory is None:
        return None
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 0:
        raise MatchError(f"max_memory must be a number of bytes >= 0 or None, got {max_memory!r}")
    return max_memory


@overload
def weight_matching(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_iter: int = 100, tol: float = DEFAULT_TOL, order: str = "random",
                    first_pass: str = "sweep", lap: str = "auto", progress: bool = False,
                    init: Mapping[str, torch.Tensor] | None = None,
                    max_memory: int | None = DEFAULT_MAX_MEMORY, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, lap_threads: int | None = None,
                    return_history: Literal[False] = False) -> dict[str, torch.Tensor]: ...


@overload
def weight_matching(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_iter: int = 100, tol: float = DEFAULT_TOL, order: str = "random",
                    first_pass: str = "sweep", lap: str = "auto", progress: bool = False,
                    init: Mapping[str, torch.Tensor] | None = None,
                    max_memory: int | None = DEFAULT_MAX_MEMORY, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, lap_threads: int | None = None,
                    return_history: Literal[True]) -> tuple[dict[str, torch.Tensor], WeightMatchingHistory]: ...


def weight_matching(
    spec: PermSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = DEFAULT_TOL,
    order: Literal["random", "graph"] = "random",
    first_pass: Literal["sweep", "forward"] = "sweep",
    lap: str = "auto",
    progress: bool = False,
    init: Mapping[str, torch.Tensor] | None = None,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    lap_threads: int | None = None,
    return_history: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], WeightMatchingHistory]:
    """Align B to A by matching weights (Git Re-Basin, Alg. 1).

    Coordinate descent on ``J(P) = Σ_T <A_T, P(B_T)>``: the groups are visited in a random
    order (drawn from ``seed`` each sweep), each taking the permutation that maximises ``J``
    with the others held fixed (one LAP), kept when ``J`` rises by more than ``1e-12``
    relative; sweeps repeat until one changes nothing, or ``max_iter`` sweeps. Attention
    heads and their within-head groups also get a joint move (see the module docstring).

    Args:
        spec: the PermSpec of the architecture (:func:`permgraph.infer`).
        state_a: the reference state_dict.
        state_b: the state_dict to align to ``state_a`` (same keys and shapes). Either may
            be any mapping, such as a lazily read `permgraph.checkpoint.Checkpoint`: tensors
            are read one at a time, converted to the compute dtype (float32, or wider when
            stored wider) on the compute device, and dropped unless the memory budget keeps
            them, so neither model is ever held whole.
        seed: seed of the visiting order when ``order="random"``.
        max_iter: the most sweeps to run.
        tol: stop when a sweep raises the objective by at most ``tol`` times what all
            sweeps so far raised it (``history.stopped_by_tol``); 0 (the default) runs to
            exact convergence, until a sweep changes nothing.
        order: ``"random"`` (default): a random order each sweep, drawn from ``seed``;
            ``"graph"``: every sweep visits the groups in the order of their tensors in the
            state_dict (input side first, so each group sees its predecessors aligned),
            which climbs faster on deep networks (see ``benchmarks/weight_matching.py``).
        first_pass: ``"sweep"`` (default): the first sweep is like the others;
            ``"forward"``: a forward first pass (see the module docstring), which on the
            benchmark's models needs fewer GEMMs (and on ResNet-50 fewer sweeps), and ends
            higher on the MLP, ResNet-18, ViT-B/16 and GPT-2, 0.05% lower on ResNet-50.
        lap: the LAP backend (see :func:`permgraph.lap.solve`).
        progress: show a tqdm bar over the sweeps.
        init: the starting permutation (default: the identity).
        max_memory: bytes kept from visit to visit: the groups' similarity matrices (dropped
            ones are rebuilt in full), and converted tensors and member matrices (dropped
            first); None keeps everything. The permutation found does not depend on it
            beyond float rounding; the time does.
        device: where the products run (default: the device of ``state_a``'s first member
            tensor); the LAP runs on the host.
        dtype: the compute dtype of the products (default: float32, or the stored dtype
            when wider).
        lap_threads: host threads for the LAPs (default: ``torch.get_num_threads()``): the
            LAPs of groups of 1024 units or more run side by side with the next visits to
            groups that share no tensor with them. The result is the same for any value.
        return_history: also return a :class:`WeightMatchingHistory` (the objective per
            sweep, the groups changed, counts and timings).

    Returns:
        The permutation, group name -> int64 CPU tensor, such that ``spec.apply(perm,
        state_b)`` is B aligned to A; with ``return_history=True`` the pair
        ``(perm, history)``.

    Raises:
        SpecMismatchError: a state_dict does not match the spec (the message names the first
            mismatching key and its shapes), or a tensor holds NaN/inf (named).
        PermutationError: ``init`` is not a permutation of every group.
        MatchError: ``max_iter`` or ``lap_threads`` is not a positive int, ``max_memory``
            not a size, ``tol`` not in [0, 1), or ``order`` or ``first_pass`` unknown.
        LapError: the LAP backend is unknown or not installed.

    Example:
        >>> import torch, permgraph
        >>> from permgraph.match import weight_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> a = mlp.state_dict()
        >>> b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(0)), a)
        >>> perm = weight_matching(spec, a, b)
        >>> all(torch.equal(spec.apply(perm, b)[k], a[k]) for k in a)
        True
    """
    t_start = time.perf_counter()
    _validate(spec, state_a, state_b, max_iter)
    _check_descent(tol, order, first_pass)
    lap_threads = _check_threads(lap_threads)
    _lap._pick(2, lap)  # an unknown backend fails now, not after the first products
    if init is not None:
        spec.check_permutation(init)
    start = init if init is not None else spec.identity()
    perm = [start[g.name].detach().to("cpu", torch.int64).clone() for g in spec.groups]
    hist = WeightMatchingHistory()
    if not spec.groups:
        hist.converged = True
        hist.seconds = time.perf_counter() - t_start
        return ({}, hist) if return_history else {}
    max_memory = _check_max_memory(max_memory)
    prob = _Problem(spec, state_a, state_b, max_memory=max_memory, device=device, dtype=dtype)
    descent = _Descent(prob, perm, lap, hist)
    hist.objective.append(descent.objective)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="weight matching", unit="sweep")
    try:
        _run(descent, spec, order=order, seed=seed, tol=tol, max_iter=max_iter, lap_threads=lap_threads,
             first_pass=first_pass, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    result = {g.name: descent.perm[gi] for gi, g in enumerate(spec.groups)}
    hist.cache_peak, hist.cache_evictions = prob.budget.peak, prob.budget.evictions
    hist.seconds = time.perf_counter() - t_start
    return (result, hist) if return_history else result


def similarity_matrices(
    spec: PermSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    perm: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every group's ``S_g`` at once, with the other groups permuted by ``perm``.

    One sweep's worth of GEMMs (the floor of :func:`weight_matching`); the LAP of each
    matrix is that group's best response to ``perm``.

    Args:
        spec: the PermSpec.
        state_a: the reference state_dict.
        state_b: the state_dict to align.
        perm: the permutation of the other groups (default: the identity).

    Returns:
        group name -> float64 CPU matrix ``(n, n)``: ``S[u, v]`` is the similarity of A's unit
        ``u`` and B's unit ``v`` (``Σ`` over the members of the products of their weights).

    Raises:
        SpecMismatchError: a state_dict does not match the spec, or holds NaN/inf.
        PermutationError: ``perm`` is not a permutation of every group.
    """
    _validate(spec, state_a, state_b, 1)
    start = spec.identity() if perm is None else perm
    spec.check_permutation(start)
    p = [start[g.name].detach().to("cpu", torch.int64) for g in spec.groups]
    prob = _Problem(spec, state_a, state_b)
    hist = WeightMatchingHistory()
    return {g.name: prob.cost(gi, p, hist).to(device="cpu", dtype=torch.float64, copy=True).neg_() for gi, g in enumerate(spec.groups)}
