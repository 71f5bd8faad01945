"""Routing: the ops a mixture of experts uses to send tokens to experts and back.

Counting values (``histc``, ``bincount``), grouped matrix products (``_grouped_mm`` and the
grouped-mm fallback custom op Hugging Face registers), writes at named positions
(``index_put``, ``scatter``), coordinates of non-zeros (``nonzero``) and ``one_hot``.

None of them can move the expert axis: an expert id is a *value* that names a position (a
row of the router, a slab of stacked expert weights, a bin of a histogram), and permgraph
permutes positions, not values. So every axis that such a value names is blocked, and so is
every axis whose positions are chosen by values (the sorted token-expert pairs, the rows an
index writes to). What stays free is what each row carries: the features a grouped product
contracts (its input units, tied to the weights' input axis) and produces (its output
units, tied to the weights' output axis). That is what gives the experts' hidden units a
group, shared by every expert of a stacked weight (each expert keeps its own weights, the
same permutation applies to all). See "Experts" in docs/how-groups-are-derived.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from permgraph.rules import Block, Constraint, Free, OpCall, Tie, rule, value_of_arg
from permgraph.rules._util import block_all, is_mask, norm_dim


@rule("aten.histc")
def _histc(op: OpCall) -> Iterator[Constraint]:
    """A histogram counts values: any reordering of the input leaves the counts unchanged
    (its axes are free); the bins are ordered by value (blocked)."""
    yield from (Free(a) for a in op.tensor("self").axes)
    yield from block_all(op.outputs, "histc: bins are ordered by value")


@rule("aten.bincount")
def _bincount(op: OpCall) -> Iterator[Constraint]:
    """``out[v] = sum of weights[i] where self[i] == v``: reordering the (value, weight)
    pairs together leaves the counts unchanged; the bins are ordered by value."""
    x, w = op.tensor("self"), op.tensor("weights")
    if w is None:
        yield from (Free(a) for a in x.axes)
    elif w.shape == x.shape:
        yield from (Tie(a, b, "bincount: each weight goes with its value") for a, b in zip(x.axes, w.axes))
    else:
        yield from block_all([x, w], "bincount: weights and values differ in shape", report=True)
    yield from block_all(op.outputs, "bincount: bins are ordered by value")


def _grouped(op: OpCall, x, w, offs, bias, why: str) -> Iterator[Constraint]:
    """``out[s] = x[s] @ w[g(s)]`` where rows ``offs[g-1]:offs[g]`` of ``x`` belong to group
    ``g`` (``x``: ``[S, K]``, ``w``: ``[G, K, N]``): the contracted units ``K`` of ``x`` and
    ``w`` move together, the output units ``N`` of ``w`` (and of a bias ``[G, N]``) are the
    output's; which row meets which group depends on its position (rows blocked) and on the
    order of the groups (blocked, as are the offsets)."""
    out = op.out
    if offs is None or x.ndim != 2 or w.ndim != 3 or out.ndim != 2 or offs.ndim != 1 or offs.shape[0] != w.shape[0]:
        yield from block_all([x, w, offs, bias, out], f"{why}: only [S, K] x [G, K, N] with offsets is understood", True)
        return
    yield Tie(x.axis(1), w.axis(1), f"{why}: contracted units")
    yield Tie(w.axis(2), out.axis(1), f"{why}: output units")
    yield Block(w.axis(0), f"{why}: groups are taken in order, their rows named by the offsets")
    yield Block(x.axis(0), f"{why}: a row's group depends on its position")
    yield Block(out.axis(0), f"{why}: a row's group depends on its position")
    yield from block_all([offs], f"{why}: offsets")
    if bias is not None:
        if bias.shape != (w.shape[0], w.shape[2]):
            yield from block_all([bias], f"{why}: unexpected bias shape", True)
        else:
            yield Block(bias.axis(0), f"{why}: groups are taken in order")
            yield Tie(bias.axis(1), out.axis(1), f"{why}: output units")


@rule("aten._grouped_mm")
def _grouped_mm(op: OpCall) -> Iterator[Constraint]:
    x, w, offs, out = op.tensor("self"), op.tensor("mat2"), op.tensor("offs"), op.out
    if offs is None and x.ndim == 3 and w.ndim == 3 and out.ndim == 3 and x.shape[0] == w.shape[0]:
        # a batched product, group by group: like bmm
        yield Tie(x.axis(0), w.axis(0), "grouped_mm: batch")
        yield Tie(x.axis(0), out.axis(0), "grouped_mm: batch")
        yield Tie(x.axis(1), out.axis(1), "grouped_mm: rows")
        yield Tie(x.axis(2), w.axis(1), "grouped_mm: contracted units")
        yield Tie(w.axis(2), out.axis(2), "grouped_mm: output units")
        bias = op.tensor("bias")
        if bias is not None:
            yield from block_all([bias], "grouped_mm: bias of a batched product", True)
        return
    yield from _grouped(op, x, w, offs, op.tensor("bias"), "grouped_mm")


@rule("transformers.grouped_mm_fallback")
def _grouped_mm_fallback(op: OpCall) -> Iterator[Constraint]:
    """The loop Hugging Face runs where ``_grouped_mm`` is unavailable (and under export):
    ``out[a:b] = input[a:b] @ weight[g]`` for consecutive offsets ``a, b``."""
    yield from _grouped(op, op.tensor("input"), op.tensor("weight"), op.tensor("offs"), None, "grouped_mm_fallback")


@rule("aten.index_put", "aten._unsafe_index_put")
def _index_put(op: OpCall) -> Iterator[Constraint]:
    """``out = self; out[idx] = values`` (or ``+=``): the indexed dims are positions named by
    values (blocked, in ``self``, the output and the index-shaped dims of ``values``); dims
    before and after a contiguous run of indexed dims pair ``self``, ``values`` and the
    output element by element (``values`` broadcasts from the right)."""
    x, vals, out = op.tensor("self"), op.tensor("values"), op.out
    idx = list(op.args["indices"])
    index_values = [t for t in op.tensors("indices") if t is not None]
    yield from block_all(index_values, "index_put: index tensor")
    # a boolean mask indexes as many dims as it has (its true positions, in row-major order)
    masks = [i is not None and is_mask(i) for i in idx]
    used: list[int] = []
    d = 0
    for i, entry in enumerate(idx):
        width = value_of_arg(entry).ndim if masks[i] else 1
        if entry is not None:
            used.extend(range(d, d + width))
        d += width
    entries = [i for i in idx if i is not None]
    contiguous = bool(used) and used == list(range(used[0], used[-1] + 1)) and len(index_values) == len(entries)
    shapes = {(None,) if is_mask(i) else value_of_arg(i).shape for i in entries}
    if not contiguous or len(shapes) != 1 or x.shape != out.shape or (any(masks) and len(index_values) != 1):
        yield from block_all([x, vals, out], "index_put: non-contiguous or broadcast advanced indexing", True)
        return
    (ishape,) = shapes
    before, after = list(range(used[0])), list(range(used[-1] + 1, x.ndim))
    for d in used:
        yield Block(x.axis(d), "index_put: positions along this dim are named by the index")
        yield Block(out.axis(d), "index_put: positions along this dim are named by the index")
    for d in before + after:
        yield Tie(x.axis(d), out.axis(d), "index_put: dims not indexed")
    # the shape ``values`` broadcasts to: before + index shape + after; ``None`` marks index dims
    target = [x.axis(d) for d in before] + [None] * len(ishape) + [x.axis(d) for d in after]
    if vals.ndim > len(target):
        yield from block_all([vals], "index_put: values have more dims than the indexed result", True)
        return
    for k in range(1, vals.ndim + 1):
        va, ta = vals.axis(-k), target[-k]
        if va.size == 1:
            yield Free(va)
        elif ta is None:
            yield Block(va, "index_put: values written at positions named by the index")
        elif ta.size == va.size:
            yield Tie(va, ta, "index_put: dims not indexed")
        else:
            yield Block(va, f"index_put: size {va.size} does not broadcast to {ta.size}", True)


@rule("aten.scatter", "aten.scatter_add", "aten.scatter_reduce")
def _scatter(op: OpCall) -> Iterator[Constraint]:
    """``out = self`` with ``out[.., idx[.., j, ..], ..] = src[.., j, ..]`` along ``dim`` (or
    combined with a reduction): positions along ``dim`` of ``self`` and the output are named
    by values (blocked), and so are the index's and the source's (a write that is not a sum
    keeps the last of duplicate indices, so their order is kept too). Every other dim pairs
    ``self``, index, source and output element by element where their sizes agree."""
    x, idx, src, out = op.tensor("self"), op.tensor("index"), op.tensor("src"), op.out
    dim = norm_dim(int(op.args["dim"]), x.ndim) if x.ndim else 0
    why = op.name.split(".")[1]
    parts = [t for t in (idx, src) if t is not None]
    if x.shape != out.shape or any(t.ndim != x.ndim for t in parts):
        yield from block_all([x, *parts, out], f"{why}: unexpected ranks", True)
        return
    for t in (x, out, *parts):
        if t.ndim:
            yield Block(t.axis(dim), f"{why}: positions along dim {dim} are named by the index")
    for d in range(x.ndim):
        if d == dim:
            continue
        yield Tie(x.axis(d), out.axis(d), f"{why}: other dims")
        for t in parts:
            if t.shape[d] == x.shape[d]:
                yield Tie(t.axis(d), x.axis(d), f"{why}: other dims")
            else:  # the index covers a prefix of this dim
                yield Block(t.axis(d), f"{why}: index shorter than the input along dim {d}")
                yield Block(x.axis(d), f"{why}: index shorter than the input along dim {d}")


@rule("aten.nonzero", "aten.argwhere", "aten.nonzero_static", "aten.nonzero_numpy", "aten.where.default")
def _nonzero(op: OpCall) -> Iterator[Constraint]:
    """The coordinates of the non-zero elements, in row-major order (``torch.where(cond)``
    returns them one tensor per dim): its values name the input's positions along every dim
    (all blocked), and its rows are in that order."""
    x = op.tensor("self") or op.tensor("condition")
    why = op.name.split(".")[1]
    yield from block_all([x], f"{why}: its values name positions along every dim")
    yield from block_all(op.outputs, f"{why}: coordinates, in row-major order")


@rule("aten.sym_size", "aten.sym_numel", "aten.sym_stride", "aten.sym_storage_offset")
def _sym_size(op: OpCall) -> Iterator[Constraint]:
    """A data-dependent size read as a number: the tensor is read for its shape only."""
    yield from (Free(a) for x in op.inputs() for a in x.axes)
    yield from block_all(op.outputs, f"{op.name}: a number")


@rule("aten.one_hot")
def _one_hot(op: OpCall) -> Iterator[Constraint]:
    """``out[.., c] = (self[..] == c)``: every dim of ``self`` ties to the output's; the
    class dim is named by values (blocked)."""
    x, out = op.tensor("self"), op.out
    yield from (Tie(a, b, "one_hot: element by element") for a, b in zip(x.axes, out.axes))
    yield Block(out.axis(-1), "one_hot: classes are named by the input's values")
