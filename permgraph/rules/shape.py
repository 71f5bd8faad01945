"""Shape ops: views, permutes, expands, concatenation, splitting, slicing.

A reshape keeps the elements in row-major order, so the product of the input's axes equals
the product of the output's (``view`` E -> H x D refines the E axis into heads and
within-head units; ``flatten`` after a conv gives each channel a block of H*W features).
Concatenation and slicing see an axis as a concatenation of segments.
"""

from __future__ import annotations

from collections.abc import Iterator

from permgraph.rules import Block, Cat, Constraint, Free, Fresh, OpCall, Prod, Tie, rule, value_of_arg
from permgraph.rules._util import is_mask, norm_dim, reshape, tie_except


@rule(
    "aten.view", "aten.reshape", "aten._unsafe_view", "aten.flatten", "aten.unflatten",
    "aten.squeeze", "aten.unsqueeze", "aten._reshape_alias", "aten.view_as", "aten.reshape_as",
    "aten.ravel",
)
def _reshape(op: OpCall) -> Iterator[Constraint]:
    x = op.tensor("self") or op.tensor("input")
    yield from reshape(x, op.out, op.name.split(".")[1])
    other = op.tensor("other")  # view_as / reshape_as read it for its shape only
    if other is not None:
        yield from (Free(a) for a in other.axes)


@rule(
    "aten.permute", "aten.transpose", "aten.t", "aten.swapaxes", "aten.swapdims", "aten.movedim", "aten.mT",
    "aten.numpy_T", "aten.permute_copy", "aten.transpose_copy", "aten.t_copy", "aten.mH", "aten.adjoint",
)
def _permute(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    n = x.ndim
    order = list(range(n))
    if op.name.startswith("aten.numpy_T"):  # Tensor.T reverses every dim
        order.reverse()
    elif "dims" in op.args and isinstance(op.args["dims"], (list, tuple)) and op.name.startswith("aten.permute"):
        order = [norm_dim(int(d), n) for d in op.args["dims"]]
    elif "source" in op.args:  # movedim
        src = op.args["source"]
        dst = op.args["destination"]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [norm_dim(s, n) for s in src]
        dst = [norm_dim(s, n) for s in dst]
        rest = iter(d for d in range(n) if d not in src)
        inv = dict(zip(dst, src))
        order = [inv[i] if i in inv else next(rest) for i in range(n)]
    elif n >= 2:
        last_two = op.name.startswith(("aten.mT", "aten.mH", "aten.adjoint"))
        d0 = norm_dim(int(op.args.get("dim0", op.args.get("axis0", -2 if last_two else 0))), n)
        d1 = norm_dim(int(op.args.get("dim1", op.args.get("axis1", -1 if last_two else 1))), n)
        order[d0], order[d1] = order[d1], order[d0]
    for i, d in enumerate(order):
        yield Tie(out.axis(i), x.axis(d), "permute")


@rule("aten.channel_shuffle", "aten.native_channel_shuffle")
def _channel_shuffle(op: OpCall) -> Iterator[Constraint]:
    """Channels ``g x m`` come out as ``m x g`` (a view, a transpose and a flatten)."""
    x, out = op.tensor("self"), op.out
    g = int(op.args["groups"])
    outer, inner = Fresh(g, "shuffle groups"), Fresh(x.shape[1] // g, "within shuffle groups")
    yield Tie(x.axis(1), Prod(outer, inner), "channel_shuffle: groups x units")
    yield Tie(out.axis(1), Prod(inner, outer), "channel_shuffle: units x groups")
    yield from (Tie(x.axis(d), out.axis(d), "channel_shuffle: other dims") for d in range(x.ndim) if d != 1)


@rule("aten.expand", "aten.expand_as", "aten.broadcast_to", "aten.expand_copy")
def _expand(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    lead = out.ndim - x.ndim
    for d in range(lead):
        yield Free(out.axis(d))  # values are constant along a new dim
    for d in range(x.ndim):
        a, b = x.axis(d), out.axis(d + lead)
        if a.size == b.size:
            yield Tie(a, b, "expand")
        else:  # 1 -> n: constant along the expanded dim
            yield Free(a)
            yield Free(b)
    if op.tensor("other") is not None:
        yield from (Free(a) for a in op.tensor("other").axes)


@rule("aten.repeat")
def _repeat(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    reps = list(op.args["repeats"])
    lead = len(reps) - x.ndim
    for d in range(lead):
        yield Free(out.axis(d))
    for d in range(x.ndim):
        r = int(reps[lead + d])
        if r == 1:
            yield Tie(x.axis(d), out.axis(lead + d), "repeat")
        else:  # tiles: copy i of unit u sits at i * n + u, copies are identical
            yield Tie(out.axis(lead + d), Prod(Fresh(r, f"copies{d}"), x.axis(d)), "repeat: tiled copies")


@rule("aten.repeat_interleave.self_int")
def _repeat_interleave(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    r = int(op.args["repeats"])
    dim = op.args.get("dim")
    if dim is None:  # flattens first: unit (i, j, ..) becomes copies of one row-major index
        yield Tie(out.axis(0), Prod(*x.axes, Fresh(r, "copies")), "repeat_interleave: copies of each element")
        return
    dim = norm_dim(int(dim), x.ndim)
    for d in range(x.ndim):
        if d != dim or r == 1:
            yield Tie(x.axis(d), out.axis(d), "repeat_interleave")
        else:  # unit u becomes copies u * r .. u * r + r - 1, all identical
            yield Tie(out.axis(d), Prod(x.axis(d), Fresh(r, "copies")), "repeat_interleave: copies of each unit")


@rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(op: OpCall) -> Iterator[Constraint]:
    xs, out = op.tensors("tensors"), op.out
    dim = norm_dim(int(op.args.get("dim", 0)), out.ndim)
    parts = []
    for x in xs:
        if x is None:
            continue
        if x.ndim == 1 and x.shape[0] == 0 and out.ndim != 1:  # legacy empty tensor, skipped by cat
            yield Free(x.axis(0))
            continue
        for d in range(x.ndim):
            if d == dim:
                parts.append(x.axis(d))
            else:
                yield Tie(x.axis(d), out.axis(d), "cat: other dims")
    yield Tie(out.axis(dim), Cat(*parts), "cat: segments")


@rule("aten.stack")
def _stack(op: OpCall) -> Iterator[Constraint]:
    xs, out = op.tensors("tensors"), op.out
    dim = norm_dim(int(op.args.get("dim", 0)), out.ndim)
    yield Block(out.axis(dim), "stack: the stacked tensors sit at fixed positions")
    for x in xs:
        yield from tie_except(out, x, {dim}, "stack: other dims")


@rule("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split", "aten.unsafe_split", "aten.unsafe_chunk", "aten.split_copy")
def _split(op: OpCall) -> Iterator[Constraint]:
    x = op.tensor("self")
    dim = norm_dim(int(op.args.get("dim", 0)), x.ndim)
    parts = []
    for out in op.outputs:
        for d in range(x.ndim):
            if d == dim:
                parts.append(out.axis(d))
            else:
                yield Tie(x.axis(d), out.axis(d), "split: other dims")
    yield Tie(x.axis(dim), Cat(*parts), "split: segments")


@rule("aten.unbind")
def _unbind(op: OpCall) -> Iterator[Constraint]:
    x = op.tensor("self")
    dim = norm_dim(int(op.args.get("dim", 0)), x.ndim)
    yield Block(x.axis(dim), "unbind: each slice goes its own way")
    for out in op.outputs:
        yield from tie_except(x, out, {dim}, "unbind: other dims")


def _segment(op: OpCall, dim: int, start: int, stop: int) -> Iterator[Constraint]:
    """The output is units [start, stop) of the input along ``dim``; other dims tie."""
    x, out = op.tensor("self") or op.tensor("input"), op.out
    n = x.shape[dim]
    for d in range(x.ndim):
        if d != dim:
            yield Tie(x.axis(d), out.axis(d), "slice: other dims")
    seg = Cat(Fresh(start, "before"), out.axis(dim), Fresh(n - stop, "after"))
    yield Tie(x.axis(dim), seg, f"slice {start} to {stop} of {n}")


@rule("aten.slice", "aten.narrow")
def _slice(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self") or op.tensor("input"), op.out
    dim = norm_dim(int(op.args.get("dim", 0)), x.ndim)
    n = x.shape[dim]
    if op.name.startswith("aten.narrow"):
        start, step = int(op.args["start"]), 1
        start = start + n if start < 0 else start
    else:
        start = op.args.get("start")
        step = int(op.args.get("step") or 1)
        start = 0 if start is None else int(start)
        start = min(max(start + n if start < 0 else start, 0), n)
    if step != 1:
        for d in range(x.ndim):
            if d != dim:
                yield Tie(x.axis(d), out.axis(d), "slice: other dims")
        m = out.shape[dim]
        # the picks start + i * step (i < m) sit at phase k of m runs of `step` positions that
        # begin at start - k; any k in [0, step) that keeps the runs inside the axis will do
        k = max(0, start + m * step - n)
        if m > 0 and m * step <= n and k <= min(start, step - 1):
            s0 = start - k
            runs = Cat(Fresh(s0, "before"), Prod(out.axis(dim), Fresh(step, "phase")), Fresh(n - s0 - m * step, "after"))
            yield Tie(x.axis(dim), runs, f"slice every {step} from {start} of {n}")
            yield Block(Fresh(step, "phase"), f"slice every {step} from {start}, picks one position of every {step}")
        else:
            yield Block(x.axis(dim), f"slice every {step} from {start} of {n}, positions are picked by order")
            yield Block(out.axis(dim), f"slice every {step} from {start} of {n}, positions are picked by order")
        return
    yield from _segment(op, dim, start, start + out.shape[dim])


@rule("aten.select")
def _select(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    dim = norm_dim(int(op.args["dim"]), x.ndim)
    n = x.shape[dim]
    i = int(op.args["index"])
    i = i + n if i < 0 else i
    yield Tie(x.axis(dim), Cat(Fresh(i, "before"), Fresh(1, "picked"), Fresh(n - i - 1, "after")), f"select index {i} of {n}")
    yield from tie_except(x, out, {dim}, "select: other dims")


@rule("aten.index_select")
def _index_select(op: OpCall) -> Iterator[Constraint]:
    x, idx, out = op.tensor("self"), op.tensor("index"), op.out
    dim = norm_dim(int(op.args["dim"]), x.ndim)
    yield Block(x.axis(dim), "index_select: arbitrary indices along this dim")
    yield Block(out.axis(dim), "index_select: arbitrary indices along this dim")
    yield from (Block(a, "index_select: indices") for a in idx.axes)
    for d in range(x.ndim):
        if d != dim:
            yield Tie(x.axis(d), out.axis(d), "index_select: other dims")


@rule("aten.gather", "aten.take_along_dim")
def _gather(op: OpCall) -> Iterator[Constraint]:
    """``out[.., j, ..] = x[.., idx[.., j, ..], ..]`` along ``dim``: the positions picked along
    ``dim`` are arbitrary (blocked, reported), the picks follow the index's own positions,
    and every other dim pairs ``x``, ``idx`` and ``out`` element by element (``take_along_dim``
    broadcasts size-1 dims first)."""
    x, idx, out = op.tensor("self"), op.tensor("index") or op.tensor("indices"), op.out
    if op.args.get("dim", 0) is None or x.ndim != out.ndim or idx.ndim != out.ndim:  # flattened
        yield from (Block(a, "take_along_dim over the flattened tensor", True) for a in x.axes + idx.axes + out.axes)
        return
    dim = norm_dim(int(op.args["dim"]), x.ndim)
    yield Block(x.axis(dim), f"{op.name.split('.')[1]} picks arbitrary positions along dim {dim}", True)
    yield Tie(idx.axis(dim), out.axis(dim), "gather: one pick per index position")
    for d in range(x.ndim):
        if d == dim:
            continue
        if x.shape[d] in (1, out.shape[d]) and idx.shape[d] in (1, out.shape[d]):
            for t in (x, idx):  # a broadcast size-1 dim has nothing to permute
                yield Tie(t.axis(d), out.axis(d), "gather: other dims") if t.shape[d] == out.shape[d] else Free(t.axis(d))
        else:  # the index covers a prefix of this dim
            yield from (Block(a, f"gather: index shorter than the input along dim {d}") for a in (x.axis(d), idx.axis(d), out.axis(d)))


@rule("aten.roll")
def _roll(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    dims = [norm_dim(int(d), x.ndim) for d in (op.args.get("dims") or [])] or list(range(x.ndim))
    for d in range(x.ndim):
        if d in dims:  # a roll over every dim (dims=[]) acts on the flattened tensor
            yield Block(x.axis(d), "roll: shifts positions along this dim")
            yield Block(out.axis(d), "roll: shifts positions along this dim")
        else:
            yield Tie(x.axis(d), out.axis(d), "roll: other dims")


@rule("aten.index")
def _index(op: OpCall) -> Iterator[Constraint]:
    """``x[..., idx, ...]`` with index tensors: indexed dims are picked arbitrarily (blocked);
    dims before and after a contiguous run of indexed dims keep their place and tie."""
    x, out = op.tensor("self"), op.out
    idx = list(op.args["indices"])
    used, d = [], 0  # a boolean mask of k dims indexes k dims
    for i in idx:
        width = value_of_arg(i).ndim if i is not None and is_mask(i) else 1
        used.extend(range(d, d + width) if i is not None else ())
        d += width
    index_values = [t for t in op.tensors("indices") if t is not None]
    for t in index_values:
        yield from (Block(a, "index: index tensor") for a in t.axes)
    yield from (Block(x.axis(d), "index: arbitrary positions picked along this dim") for d in used)
    contiguous = used and used == list(range(used[0], used[-1] + 1))
    n_bcast = out.ndim - (x.ndim - len(used))
    if not contiguous or n_bcast < 0:
        yield from (Block(a, "index: non-contiguous advanced indexing", True) for a in x.axes + out.axes)
        return
    before, after = list(range(used[0])), list(range(used[-1] + 1, x.ndim))
    for d in before:
        yield Tie(x.axis(d), out.axis(d), "index: dims before the indexed ones")
    for k in range(n_bcast):
        yield Block(out.axis(len(before) + k), "index: picked positions")
    for j, d in enumerate(after):
        yield Tie(x.axis(d), out.axis(len(before) + n_bcast + j), "index: dims after the indexed ones")


@rule("aten.index_fill", "aten.index_copy", "aten.index_add")
def _index_write(op: OpCall) -> Iterator[Constraint]:
    """``index_fill / index_copy / index_add`` write at the positions ``index`` names along
    ``dim`` (blocked: they are picked by position); every other dim pairs the input, the
    written ``source`` and the output element by element."""
    x, out, idx = op.tensor("self"), op.out, op.tensor("index")
    dim = norm_dim(int(op.args["dim"]), x.ndim) if x.ndim else 0
    why = op.name.split(".")[1]
    if idx is not None:
        yield from (Block(a, f"{why}: indices") for a in idx.axes)
    source = op.tensor("source")
    value = op.tensor("value")
    if value is not None:
        yield from (Free(a) for a in value.axes)  # a 0-dim fill value
    for t in [x] + ([source] if source is not None else []):
        if t.ndim != out.ndim:
            yield from (Block(a, f"{why}: unexpected rank", True) for a in t.axes + out.axes)
            continue
        for d in range(t.ndim):
            if d == dim:
                yield Block(t.axis(d), f"{why}: positions along dim {d} are picked by index")
            else:
                yield Tie(t.axis(d), out.axis(d), f"{why}: other dims")
    if out.ndim:
        yield Block(out.axis(dim), f"{why}: positions along dim {dim} are picked by index")


@rule("aten.slice_scatter")
def _slice_scatter(op: OpCall) -> Iterator[Constraint]:
    """``out = self`` with positions ``start:end`` (step 1) along ``dim`` replaced by ``src``
    (what ``x[:, a:b] = y`` becomes in a functional graph): the kept positions of ``self``
    and the written ones of ``src`` are segments of ``out``; a strided write blocks."""
    x, src, out = op.tensor("self"), op.tensor("src"), op.out
    dim = norm_dim(int(op.args.get("dim", 0)), x.ndim)
    n, m = x.shape[dim], src.shape[dim]
    start = op.args.get("start")
    start = 0 if start is None else int(start)
    start = min(max(start + n if start < 0 else start, 0), n)
    step = int(op.args.get("step") or 1)
    for t in (x, src):
        for d in range(t.ndim):
            if d != dim:
                yield Tie(t.axis(d), out.axis(d), "slice_scatter: other dims")
    if step != 1 or start + m > n:
        yield from (Block(a, f"slice_scatter every {step}: positions are written by order") for a in
                    (x.axis(dim), src.axis(dim), out.axis(dim)))
        return
    before, after = Fresh(start, "before"), Fresh(n - start - m, "after")
    yield Tie(x.axis(dim), Cat(before, Fresh(m, "overwritten"), after), f"slice_scatter {start} to {start + m} of {n}")
    yield Tie(out.axis(dim), Cat(before, src.axis(dim), after), f"slice_scatter {start} to {start + m} of {n}")


@rule("aten.select_scatter")
def _select_scatter(op: OpCall) -> Iterator[Constraint]:
    """``out = self`` with index ``index`` along ``dim`` replaced by ``src`` (which lacks
    ``dim``): the other positions are kept, the written one stays put."""
    x, src, out = op.tensor("self"), op.tensor("src"), op.out
    dim = norm_dim(int(op.args["dim"]), x.ndim)
    n = x.shape[dim]
    i = int(op.args["index"])
    i = i + n if i < 0 else i
    before, after = Fresh(i, "before"), Fresh(n - i - 1, "after")
    yield Tie(x.axis(dim), Cat(before, Fresh(1, "overwritten"), after), f"select_scatter index {i} of {n}")
    yield Tie(out.axis(dim), Cat(before, Fresh(1, "written"), after), f"select_scatter index {i} of {n}")
    yield from (Tie(x.axis(d), out.axis(d), "select_scatter: other dims") for d in range(x.ndim) if d != dim)
    yield from tie_except(out, src, {dim}, "select_scatter: other dims")
