"""Activation matching: align B to A by how alike their hidden units respond to data.

Both models run the traced graph of the spec's analysis in lockstep, batch by batch, with
their own weights (through `permgraph.runner`; a spec without an analysis, read back with
`PermSpec.from_dict`, gets the model's, analysed on the first batch). For each group, the values that carry it are read through the
group's layout into ``(samples, n)`` matrices (every other dim, block and repeat position
counts as a sample): preferably the outputs of non-linear element-wise ops (ReLU, GELU,
SiLU, ...), the post-activation units Git Re-Basin and Benzing et al. match; else every
computed value that carries the group. Per group the sums of ``x_a``, ``x_b``, ``x_a²``,
``x_b²`` and ``x_aᵀ x_b`` are accumulated over all samples (memory ``O(n²)`` per group, never
``samples x n`` across batches), then turned into a similarity (Pearson correlation by
default, covariance or cosine) and one LAP per group gives the permutation.

Attention heads: a head group whose units are blocks of a within-head group is matched on
the joint units: the similarity of head ``i`` of A and head ``j`` of B is the best
alignment of their within-head units (one small LAP per pair), the heads take the LAP of
that, and the within-head group then matches given the heads.

Data parallel: under ``torch.distributed`` (``torchrun``), each rank passes its own shard of
the batches; the sums are added over the process group (``process_group=``) before any
similarity is formed, so every rank solves the same LAPs and returns the same permutation,
the one a single process gets on all the batches (see :mod:`permgraph.distributed`). Every
rank centres its data on the means of rank 0's first batch (one process centres on its
first batch's): each batch's float32 products are then those of one process, and only the
float64 sums are added in another order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from permgraph import distributed as _dist
from permgraph import lap as _lap
from permgraph.match import _stats
from permgraph.match._common import MatchError, check_finite, check_spec, nested_positions, partitioned_positions
from permgraph.match._stats import ActivationStats
from permgraph.runner import check_unsliced, device_of, input_signature, runner_for
from permgraph.spec import Layout, PermSpec

__all__ = ["activation_matching", "activation_similarity", "ActivationStats", "METHODS", "NONLINEAR_OPS"]

#: The similarities :func:`activation_matching` offers.
METHODS = ("correlation", "covariance", "cosine")

#: Element-wise non-linearities whose outputs represent a group's units (aten base names).
NONLINEAR_OPS = frozenset({
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "elu", "selu",
    "celu", "leaky_relu", "mish", "softplus", "prelu", "rrelu", "logsigmoid", "softsign", "threshold",
    "clamp", "clamp_min",
})
#: Ops whose output repeats values already seen (views, copies, dropout): skipped when
#: every value carrying a group is used.
_REPEATS = frozenset({
    "view", "reshape", "_unsafe_view", "alias", "clone", "contiguous", "dropout", "feature_dropout", "expand",
    "expand_as", "permute", "transpose", "t", "squeeze", "unsqueeze", "flatten", "unflatten", "to", "_to_copy",
    "detach", "slice", "select", "narrow", "movedim", "as_strided", "cat", "stack", "repeat", "lift_fresh_copy",
})


def _base(target: str) -> str:
    """``"aten.relu_.default"`` -> ``"relu"``."""
    parts = target.split(".")
    name = parts[1] if len(parts) >= 2 and parts[0] == "aten" else parts[-1]
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


@dataclass(frozen=True)
class _Occurrence:
    """One reading of a node's value: the units of ``key`` along ``dim`` at ``positions``
    (``(*counts, units, block)``); ``key`` is ``(group,)``, or ``(outer, inner)`` for the
    joint units of a head group and its within-head group."""

    node: str
    item: int | None  # which element of a tuple output
    dim: int
    key: tuple[str, ...]
    positions: torch.Tensor
    size: int  # the length of the dim, as traced

    def read(self, value: torch.Tensor) -> torch.Tensor:
        """The ``(samples, units)`` matrix of this reading of ``value``."""
        if value.shape[self.dim] != self.size:
            raise MatchError(f"node {self.node} has another size along the permuted dim for this batch shape; "
                             "pass batches shaped like the example inputs")
        pos = self.positions
        counts, units, block = tuple(pos.shape[:-2]), pos.shape[-2], pos.shape[-1]
        x = value.movedim(self.dim, -1).index_select(-1, pos.reshape(-1).to(value.device))
        x = x.reshape(*x.shape[:-1], *counts, units, block).movedim(-2, -1)
        return x.reshape(-1, units)


def _plan(spec: PermSpec, graph: Any) -> tuple[dict[str, list[_Occurrence]], dict[tuple[str, ...], int], list[str]]:
    """Pick the values that represent each group.

    Returns:
        node name -> its readings, accumulator key -> its number of units, and the groups
        no value carries.
    """
    sizes = {g.name: g.size for g in spec.groups}
    # every (node, item, dim, group, layout) carrying a group, in graph order
    found: dict[str, list[tuple[str, int | None, int, Layout, str]]] = {g: [] for g in sizes}
    dims: dict[tuple[str, int | None, int], list[tuple[str, Layout]]] = {}
    for name, data in graph.nodes(data=True):
        if data.get("kind") != "op" or not data.get("layouts"):
            continue
        shape = data.get("shape")
        if shape is None:
            continue
        items: list[tuple[int | None, Any]]
        if shape and isinstance(shape[0], (tuple, list)):  # a tuple output
            items = list(enumerate(data["layouts"]))
        else:
            items = [(None, data["layouts"])]
        base = _base(str(data.get("target", "")))
        for item, per_dim in items:
            for dim, occ in enumerate(per_dim or ()):
                for gname, lay in occ:
                    if gname in found:
                        found[gname].append((name, item, dim, lay, base))
                        dims.setdefault((name, item, dim), []).append((gname, lay))
    chosen: dict[str, list[tuple[str, int | None, int, Layout]]] = {}
    missing: list[str] = []
    for gname, occs in found.items():
        pick = [o for o in occs if o[4] in NONLINEAR_OPS]
        if not pick:
            pick = [o for o in occs if o[4] not in _REPEATS] or occs
        if not pick:
            missing.append(gname)
        chosen[gname] = [o[:4] for o in pick]
    # joint readings of nested groups (attention heads and their within-head units): the
    # outer group's reading covers the inner units there too, of one group shared by every
    # head, or of one group per head (heads="independent": those come after the heads in
    # spec order and permute inside whatever head the heads group brings, so they are read
    # only jointly, where B's head j meets A's head i)
    rank = {g.name: i for i, g in enumerate(spec.groups)}
    joint: dict[tuple[str, int | None, int, str, Layout], tuple[tuple[str, ...], torch.Tensor]] = {}
    covered: set[tuple[str, int | None, int, str, Layout]] = set()
    per_head: set[str] = set()
    for gname, occs in chosen.items():
        for node, item, dim, lay in occs:
            shape = graph.nodes[node]["shape"]
            dim_size = (shape[item] if item is not None else shape)[dim]
            outer = lay.positions(sizes[gname])
            rivals = [(other, olay) for other, olay in dims[(node, item, dim)] if other != gname]
            found_nest = next((((other,), inner, [(other, olay)]) for other, olay in rivals
                               if (inner := nested_positions(outer, olay.positions(sizes[other]), dim_size)) is not None),
                              None)
            if found_nest is None:
                later = [(o, ol) for o, ol in rivals if rank[o] > rank[gname]]
                part = partitioned_positions(outer, [(o, ol.positions(sizes[o])) for o, ol in later], dim_size)
                if part is not None:
                    found_nest = (part[0], part[1], [(o, ol) for o, ol in later if o in part[0]])
                    per_head.update(part[0])
            if found_nest is not None:
                inners, inner, readings = found_nest
                joint[(node, item, dim, gname, lay)] = (inners, inner.reshape(*inner.shape[:-2], -1, 1))
                covered.update((node, item, dim, o, ol) for o, ol in readings)
    plan: dict[str, list[_Occurrence]] = {}
    keys: dict[tuple[str, ...], int] = {}
    for gname, occs in chosen.items():
        for node, item, dim, lay in occs:
            if (node, item, dim, gname, lay) in covered or gname in per_head:
                continue  # read jointly with its heads
            shape = graph.nodes[node]["shape"]
            size = (shape[item] if item is not None else shape)[dim]
            nest = joint.get((node, item, dim, gname, lay))
            if nest is not None:
                key: tuple[str, ...] = (gname, *nest[0])
                reading = _Occurrence(node, item, dim, key, nest[1], size)
                keys[key] = nest[1].shape[-2]
            else:
                reading = _Occurrence(node, item, dim, (gname,), lay.positions(sizes[gname]), size)
                keys[(gname,)] = sizes[gname]
            plan.setdefault(node, []).append(reading)
    return plan, keys, missing


def _check_models(spec: PermSpec, model_a: Any, model_b: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    states = []
    for what, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, torch.nn.Module):
            raise MatchError(f"{what} must be an nn.Module, got {type(model).__name__}")
        state = model.state_dict()
        spec.check_state_dict(state, f"{what}.state_dict()")
        check_finite(state, [k for k in spec.shapes if k in state], f"{what}.state_dict()")
        states.append(state)
    return states[0], states[1]


def activation_similarity(
    spec: PermSpec,
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "correlation",
    progress: bool = False,
    inputs: Callable[[Any], Any] | None = None,
    process_group: Any = None,
    timeout: float | timedelta | None = None,
) -> tuple[dict[tuple[str, ...], torch.Tensor], dict[str, int]]:
    """The activation similarities :func:`activation_matching` solves.

    Args:
        spec: the PermSpec, with its traced graph (from :func:`permgraph.infer`).
        model_a: the reference model.
        model_b: the model to align; both run in eval mode through the traced graph.
        batches: an iterable of inputs, each a Tensor, a tuple of positional arguments or a
            dict of keyword arguments, like ``infer``'s ``example_inputs``.
        method: ``"correlation"``, ``"covariance"`` or ``"cosine"``.
        progress: show a tqdm bar over the batches (on rank 0 only, in a distributed run).
        inputs: picks the model's inputs out of each batch (for ``(x, y)`` batches:
            ``inputs=lambda b: b[0]``; see :func:`permgraph.data.pick`).
        process_group: the ``torch.distributed`` group whose ranks' statistics are summed:
            ``None`` (default) the default group when ``torch.distributed`` is initialised,
            ``False`` none; see :func:`activation_matching`.
        timeout: seconds each rank waits for the others (default 30 minutes).

    Returns:
        ``(similarities, sizes)``: accumulator key -> float64 CPU matrix, where a key is
        ``(group,)`` (an ``(n, n)`` matrix) or ``(heads, within)`` (an ``(H*D, H*D)`` matrix
        over the joint units, head-major); and group name -> size.

    Raises:
        MatchError: no batches, an unknown method, a spec without its traced graph, or a
            batch unlike the example inputs.
        SpecMismatchError: a model's state_dict does not match the spec, or holds NaN/inf.
        DistributedError: in a distributed run, the ranks disagree, another rank failed, or
            one did not arrive in time (:mod:`permgraph.distributed`).
    """
    stats, sizes = _accumulate(spec, model_a, model_b, batches, method, progress,
                               inputs=inputs, process_group=process_group, timeout=timeout, call="activation_similarity")
    return {k: s.similarity(method) for k, s in stats.items()}, sizes


def _accumulate(spec: PermSpec, model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Iterable[Any],
                method: str, progress: bool, *, inputs: Callable[[Any], Any] | None = None, process_group: Any = None,
                timeout: float | timedelta | None = None, call: str = "activation_matching",
                options: Mapping[str, Any] | None = None,
                precheck: Callable[[], Any] | None = None) -> tuple[dict[tuple[str, ...], ActivationStats], dict[str, int]]:
    group = _dist.resolve_group(process_group)
    rank, _ = _dist.rank_and_size(group)
    try:  # every local check first; a failure here is told to the other ranks
        if precheck is not None:
            precheck()
        check_spec(spec)
        check_unsliced(spec, call, MatchError)
        if method not in METHODS:
            raise MatchError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(batches, (torch.Tensor, dict)):
            raise MatchError("batches must be an iterable of batches (e.g. a list or a DataLoader), not a single batch; wrap it: [batch]")
        if inputs is not None and not callable(inputs):
            raise MatchError(f"inputs must be a function of a batch (e.g. lambda b: b[0]), got {type(inputs).__name__}")
        state_a, state_b = _check_models(spec, model_a, model_b)
        runner = runner_for(model_a)
        analysis, batches = runner.analysis(spec, model_a, batches, inputs, MatchError)
        plan, keys, missing = _plan(spec, analysis.graph)
        example = input_signature(analysis.traced)
        items: dict[str, Any] = {}
        if group is not None:
            items = {"method": method, **(options or {}),
                     "spec": [(g.name, g.size) for g in spec.groups],
                     **_dist.model_items("model_a", state_a), **_dist.model_items("model_b", state_b),
                     "statistics": sorted(keys.items()), "inputs": example}
    except Exception as exc:
        _dist.agree(group, f"{call} (before the data)", failure=exc, timeout=timeout)
        raise
    _dist.agree(group, f"{call} (before the data)", items, timeout=timeout, warn_only=("model_a bits", "model_b bits"))
    if missing:
        warnings.warn(
            f"no value of the traced graph carries group(s) {', '.join(missing[:5])}: they keep the identity",
            stacklevel=3,
        )
    sizes = {g.name: g.size for g in spec.groups}
    device = device_of(model_a) or torch.device("cpu")
    stats = {k: ActivationStats(n, device) for k, n in keys.items()}

    def read(name: str, va: Any, vb: Any) -> None:
        for r in plan[name]:
            xa, xb = (va, vb) if r.item is None else (va[r.item], vb[r.item])
            stats[r.key].update(r.read(xa), r.read(xb))
    was = (model_a.training, model_b.training)
    bar = None
    seen = 0
    shared = False
    try:
        model_a.eval()
        model_b.eval()
        if progress and rank == 0:
            from tqdm.auto import tqdm

            try:
                total: int | None = len(batches)  # type: ignore[arg-type]
            except TypeError:  # an iterable without a length (a generator, a Batches over one)
                total = None
            bar = tqdm(desc="activation matching", unit="batch", total=total)

        def one(batch: Any) -> None:
            nonlocal seen
            flat, canonical = runner.flatten(analysis, batch, inputs, MatchError)
            traced = runner.program(analysis, model_a, flat, canonical, plan, MatchError)
            runner.run_pair(traced, (model_a, model_b), (state_a, state_b), flat, read, plan, MatchError)
            seen += 1
            if bar is not None:
                bar.update(1)

        with torch.no_grad():
            it = iter(batches)
            if group is not None:
                # rank 0's first batch sets the shifts every rank's sums are taken about:
                # each batch's float32 products are then those of one process on all the
                # batches, and only the float64 sums are added in another order
                status, error = _stats.NO_DATA, None
                if rank == 0:
                    try:
                        first = next(it, _END)
                        if first is not _END:
                            one(first)
                            status = _stats.DATA
                    except Exception as exc:  # told to the others, then raised below
                        status, error = _stats.FAILED, exc
                status = _stats.share_shifts(stats, group, rank, status, timeout, call)
                if error is not None:
                    raise error
                shared = status == _stats.DATA
                if status == _stats.FAILED:
                    it = iter(())  # rank 0 failed: straight to the handshake, which says so
            for batch in it:
                one(batch)
    except Exception as exc:
        _dist.agree(group, f"{call} (after the data)", failure=exc, timeout=timeout)
        raise
    finally:
        model_a.train(was[0])
        model_b.train(was[1])
        if bar is not None:
            bar.close()
    if group is not None:
        _dist.agree(group, f"{call} (after the data)", timeout=timeout)
        seen = _stats.reduce(stats, group, seen, timeout, call, shared=shared)
    if not seen:
        raise MatchError("batches is empty: activation matching needs at least one batch of inputs"
                         + (" (on every rank)" if group is not None else ""))
    return stats, sizes


_END = object()


def activation_matching(
    spec: PermSpec,
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    batches: Iterable[Any],
    *,
    method: str = "correlation",
    lap: str = "auto",
    progress: bool = False,
    inputs: Callable[[Any], Any] | None = None,
    process_group: Any = None,
    timeout: float | timedelta | None = None,
) -> dict[str, torch.Tensor]:
    """Align B to A by matching activations (Git Re-Basin; Benzing et al. 2022).

    Args:
        spec: the PermSpec, with its traced graph (from :func:`permgraph.infer` on this
            architecture).
        model_a: the reference model.
        model_b: the model to align. Both run in eval mode (their modes are restored),
            each on its own device; the statistics live on ``model_a``'s device.
        batches: an iterable of inputs (a list, a DataLoader yielding inputs only), each a
            Tensor, a tuple of positional arguments or a dict of keyword arguments, like
            ``infer``'s ``example_inputs``. Batches of another shape than the example inputs
            are traced again (once per shape).
        method: the similarity of two units: ``"correlation"`` (Pearson, default),
            ``"covariance"`` or ``"cosine"`` (Benzing et al.).
        lap: the LAP backend (see :func:`permgraph.lap.solve`).
        progress: show a tqdm bar over the batches (on rank 0 only, in a distributed run).
        inputs: picks the model's inputs out of each batch: for a DataLoader of ``(x, y)``
            pairs, ``inputs=lambda b: b[0]``; for dict batches, ``permgraph.data.pick("input_ids",
            "attention_mask")``.
        process_group: data parallelism over ``torch.distributed``. ``None`` (default):
            when ``torch.distributed`` is initialised, each rank passes its own shard of the
            batches and the statistics are summed over the default group, so every rank
            returns the same permutation, the one of a single process on all the batches;
            a ``ProcessGroup``: the same over that group; ``False``: keep the statistics of
            this rank's batches only. Every rank of the group must make the call, with the same
            spec, models and options (checked first).
        timeout: seconds each rank waits for the others at each collective step (default
            30 minutes: a fast rank waits there for the slowest shard).

    Returns:
        The permutation, group name -> int64 CPU tensor, such that ``spec.apply(perm,
        model_b.state_dict())`` is B aligned to A. A group that no value of the graph
        carries keeps the identity (with a warning).

    Raises:
        MatchError: ``batches`` is empty or a single batch, ``method`` is unknown, the spec
            has no traced graph, or a batch does not fit the traced inputs.
        SpecMismatchError: a model's state_dict does not match the spec (the first
            mismatching key is named), or holds NaN/inf (the tensor is named).
        LapError: the LAP backend is unknown or not installed.
        RankMismatchError: in a distributed run, the ranks passed different specs, models,
            options or example inputs (raised on every rank).
        RankFailedError: another rank failed (raised on the ranks that did not).
        RankTimeoutError: some rank did not reach the same step within ``timeout``.

    Example:
        >>> import torch, permgraph
        >>> from permgraph.match import activation_matching
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(8, 4))
        >>> other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> other.load_state_dict(spec.apply(spec.random_permutation(), mlp.state_dict()))
        <All keys matched successfully>
        >>> perm = activation_matching(spec, mlp, other, [torch.randn(8, 4) for _ in range(8)])
        >>> aligned = spec.apply(perm, other.state_dict())
        >>> all(torch.allclose(aligned[k], v) for k, v in mlp.state_dict().items())
        True
    """
    stats, sizes = _accumulate(spec, model_a, model_b, batches, method, progress, inputs=inputs,
                               process_group=process_group, timeout=timeout, options={"lap": lap},
                               precheck=lambda: _lap._pick(2, lap))
    perm = _solve(spec, stats, sizes, method, lap)
    group = _dist.resolve_group(process_group)
    if group is not None:
        # every rank solved the same LAPs on the same sums; rank 0's answer is sent anyway,
        # so that the ranks agree even where a backend would not reduce bit for bit alike
        names = sorted(perm)
        mine = [perm[g] if _dist.rank_and_size(group)[0] == 0 else torch.zeros_like(perm[g]) for g in names]
        _dist.all_reduce_sum(mine, group, timeout=timeout, what="activation_matching (rank 0's permutation)")
        sent = dict(zip(names, mine))
        perm = {g: sent[g] for g in perm}
    return perm


def _solve(spec: PermSpec, stats: Mapping[tuple[str, ...], ActivationStats], sizes: Mapping[str, int],
           method: str, lap: str) -> dict[str, torch.Tensor]:
    """The LAPs of :func:`activation_matching` on accumulated statistics."""
    sims = {k: s.similarity(method) for k, s in stats.items()}
    perm = {g.name: torch.arange(g.size) for g in spec.groups}
    total: dict[str, torch.Tensor] = {}
    for key, s in sims.items():
        if len(key) == 1:
            total[key[0]] = s if key[0] not in total else total[key[0]] + s
    # heads first: each pair of heads scored by the best alignment of their inner units
    # (key (heads, inner): one inner group in every head; (heads, inner_0, ...): one per head)
    nested = {k: s for k, s in sims.items() if len(k) >= 2}
    blocks: dict[tuple[str, ...], torch.Tensor] = {}
    for key, s in nested.items():
        outer = key[0]
        n = sizes[outer]
        m = s.shape[0] // n
        b = s.view(n, m, n, m).permute(0, 2, 1, 3)
        blocks[key] = b
        score = torch.zeros(n, n, dtype=torch.float64)
        ar = torch.arange(m)
        for i in range(n):
            for j in range(n):
                sigma = _lap.solve(b[i, j], maximize=True, backend=lap)
                score[i, j] = b[i, j][ar, sigma].sum()
        total[outer] = score if outer not in total else total[outer] + score
    outers = {k[0] for k in nested}
    for name in outers:
        perm[name] = _lap.solve(total[name], maximize=True, backend=lap)
    for (outer, *inners), b in blocks.items():
        pairs = b[torch.arange(sizes[outer]), perm[outer]]  # block(i, p(i)): A's head i, B's head p(i)
        given = [pairs.sum(0)] if len(inners) == 1 else list(pairs)  # a shared inner group sums them
        for inner, g in zip(inners, given):
            total[inner] = g if inner not in total else total[inner] + g
    for name, s in total.items():
        if name not in outers:
            perm[name] = _lap.solve(s, maximize=True, backend=lap)
    return perm
