"""Embedding, pooling, padding, resizing, tuple access and constant factories."""

from __future__ import annotations

import re
from collections.abc import Iterator

from permgraph.rules import Block, Cat, Constraint, Free, Fresh, OpCall, Prod, TensorValue, Tie, rule
from permgraph.rules._util import block_all


@rule("operator.getitem")
def _getitem(op: OpCall) -> Iterator[Constraint]:
    src, i = op.node.args
    if not op.outputs:
        return
    elem = TensorValue((src.name, int(i)), op.out.shape)
    for a, b in zip(elem.axes, op.out.axes):
        yield Tie(a, b, "getitem")


@rule("aten.embedding")
def _embedding(op: OpCall) -> Iterator[Constraint]:
    w, idx, out = op.tensor("weight"), op.tensor("indices"), op.out
    yield Block(w.axis(0), "embedding: rows are looked up by index")
    yield Tie(w.axis(1), out.axis(-1), "embedding: features")
    for d in range(idx.ndim):
        yield Tie(idx.axis(d), out.axis(d), "embedding: index dims")


@rule("aten.embedding_bag", "aten._embedding_bag")
def _embedding_bag(op: OpCall) -> Iterator[Constraint]:
    """Each bag reduces its rows (sum, mean or max) feature by feature: features tie to the
    output's (and to the argmax output's); rows, indices and bags keep their order."""
    w = op.tensor("weight")
    yield Block(w.axis(0), "embedding_bag: rows are looked up by index")
    for t in op.inputs():
        if t.value != w.value:
            yield from (Block(a, "embedding_bag: indices, offsets and bags") for a in t.axes)
    for out in op.outputs:
        if out.ndim == 2 and out.shape[1] == w.shape[1]:  # the bags' features, and their argmax rows
            yield Tie(w.axis(1), out.axis(1), "embedding_bag: features")
            yield Block(out.axis(0), "embedding_bag: bags")
        else:
            yield from (Block(a, "embedding_bag: bookkeeping") for a in out.axes)


def _spatial(op: OpCall, k: int, why: str) -> Iterator[Constraint]:
    """Last ``k`` dims are spatial (ordered, blocked); leading dims tie to every output."""
    x = op.tensor("self") or op.tensor("input")
    for out in op.outputs:
        lead = x.ndim - k
        if out.ndim != x.ndim:
            yield from block_all([x, out], f"{why}: unexpected output rank", report=True)
            continue
        for d in range(lead):
            yield Tie(x.axis(d), out.axis(d), why)
        for d in range(lead, x.ndim):
            yield Block(out.axis(d), f"{why}: spatial positions are ordered")
    for d in range(x.ndim - k, x.ndim):
        yield Block(x.axis(d), f"{why}: spatial positions are ordered")


_POOL = {
    f"aten.{kind}{n}d{suffix}": n
    for n in (1, 2, 3)
    for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "_adaptive_avg_pool", "lp_pool")
    for suffix in ("", "_with_indices")
}
_RESIZE = {
    f"aten.{kind}": int(re.search(r"(\d)d", kind).group(1))
    for kind in (
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d",
        "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
        "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
    )
}
_SPATIAL = {**_POOL, **_RESIZE}


def _spatial_rule(op: OpCall) -> Iterator[Constraint]:
    packet = op.name.rsplit(".", 1)[0]
    yield from _spatial(op, _SPATIAL[packet], packet.split(".")[1])


rule(*_SPATIAL)(_spatial_rule)


def _channels_into_space(many: TensorValue, few: TensorValue, k: int, space: int, why: str) -> Iterator[Constraint]:
    """``many``'s channel dim (dim ``-space - 1``) is ``few``'s channels times ``k`` sub-positions
    that move into space: those and every spatial dim are ordered, the channels may move."""
    c = many.ndim - space - 1
    if few.ndim != many.ndim or many.shape[c] != few.shape[c] * k:
        yield from block_all([many, few], f"{why}: unexpected shapes", report=True)
        return
    sub = Fresh(k, "sub-positions")
    yield Block(sub, f"{why}: sub-positions map to space")
    yield Tie(many.axis(c), Prod(few.axis(c), sub), f"{why}: channel x sub-positions")
    for d in range(c):
        yield Tie(many.axis(d), few.axis(d), why)
    for t in (many, few):
        yield from (Block(t.axis(d), f"{why}: spatial positions are ordered") for d in range(c + 1, t.ndim))


@rule("aten.pixel_shuffle")
def _pixel_shuffle(op: OpCall) -> Iterator[Constraint]:
    r = int(op.args["upscale_factor"])
    yield from _channels_into_space(op.tensor("self"), op.out, r * r, 2, "pixel_shuffle")


@rule("aten.pixel_unshuffle")
def _pixel_unshuffle(op: OpCall) -> Iterator[Constraint]:
    r = int(op.args["downscale_factor"])
    yield from _channels_into_space(op.out, op.tensor("self"), r * r, 2, "pixel_unshuffle")


@rule("aten.im2col")  # F.unfold: [N, C, H, W] -> [N, C * kh * kw, L]
def _im2col(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    k = int(out.shape[-2]) // int(x.shape[-3])
    yield from _unfold(x, out, k, "im2col")


@rule("aten.col2im")  # F.fold: [N, C * kh * kw, L] -> [N, C, H, W]
def _col2im(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    k = int(x.shape[-2]) // int(out.shape[-3])
    yield from _unfold(out, x, k, "col2im")


def _unfold(img: TensorValue, cols: TensorValue, k: int, why: str) -> Iterator[Constraint]:
    lead = img.ndim - 3
    if cols.ndim != lead + 2 or cols.shape[lead] != img.shape[lead] * k:
        yield from block_all([img, cols], f"{why}: unexpected shapes", report=True)
        return
    sub = Fresh(k, "kernel positions")
    yield Block(sub, f"{why}: kernel positions are ordered")
    yield Tie(cols.axis(lead), Prod(img.axis(lead), sub), f"{why}: channel x kernel positions")
    yield from (Tie(img.axis(d), cols.axis(d), why) for d in range(lead))
    yield from (Block(img.axis(d), f"{why}: spatial positions are ordered") for d in range(lead + 1, img.ndim))
    yield Block(cols.axis(lead + 1), f"{why}: patch positions are ordered")


@rule("aten.max_unpool2d", "aten.max_unpool3d")
def _max_unpool(op: OpCall) -> Iterator[Constraint]:
    """Each channel's values go back to the positions its indices name, channel by channel."""
    x, idx, out = op.tensor("self"), op.tensor("indices"), op.out
    k = 2 if "2d" in op.name else 3
    for t in (x, idx, out):
        for d in range(t.ndim - k):
            yield Tie(t.axis(d), out.axis(d), "max_unpool: channel by channel")
        yield from (Block(t.axis(d), "max_unpool: spatial positions are ordered") for d in range(t.ndim - k, t.ndim))


@rule("aten.constant_pad_nd", "aten.pad", "aten.reflection_pad1d", "aten.reflection_pad2d",
      "aten.reflection_pad3d", "aten.replication_pad1d", "aten.replication_pad2d",
      "aten.replication_pad3d", "aten.circular_pad1d", "aten.circular_pad2d", "aten.circular_pad3d")
def _pad(op: OpCall) -> Iterator[Constraint]:
    """Constant padding (negative amounts crop) adds units of one constant value before and
    after the kept units of an axis: the kept units are a segment of both the input and the
    output axis, and may move (a padded channel axis keeps its channel group); the added
    units stay put. Reflection, replication and circular padding copy units by position:
    their padded axes are blocked."""
    x, out = op.tensor("self") or op.tensor("input"), op.out
    pad = [int(p) for p in (op.args.get("pad") or op.args.get("padding"))]
    constant = op.name.startswith("aten.constant_pad_nd") or (
        op.name.startswith("aten.pad") and op.args.get("mode", "constant") == "constant"
    )
    amounts = {x.ndim - 1 - i // 2: (pad[i], pad[i + 1] if i + 1 < len(pad) else 0) for i in range(0, len(pad), 2)}
    for d in range(x.ndim):
        lo, hi = amounts.get(d, (0, 0))
        if lo == 0 and hi == 0:
            yield Tie(x.axis(d), out.axis(d), "padding: unpadded dim")
            continue
        kept = x.shape[d] - max(-lo, 0) - max(-hi, 0)
        if not constant or kept < 0 or out.shape[d] != kept + max(lo, 0) + max(hi, 0):
            yield Block(x.axis(d), "padding: positions are ordered")
            yield Block(out.axis(d), "padding: positions are ordered")
            continue
        mid = Fresh(kept, f"kept {d}")
        added = [Fresh(max(lo, 0), f"pad before {d}"), Fresh(max(hi, 0), f"pad after {d}")]
        yield Tie(x.axis(d), Cat(Fresh(max(-lo, 0), f"cropped before {d}"), mid, Fresh(max(-hi, 0), f"cropped after {d}")),
                  f"constant padding of dim {d}: kept units")
        yield Tie(out.axis(d), Cat(added[0], mid, added[1]), f"constant padding of dim {d}: kept units")
        yield from (Block(a, "padding: the padded positions hold a constant") for a in added if a.size)


# Tensors whose values are the same everywhere: any permutation of their axes is harmless.
@rule("aten.zeros", "aten.ones", "aten.full", "aten.empty", "aten.zeros_like", "aten.ones_like",
      "aten.full_like", "aten.empty_like", "aten.new_zeros", "aten.new_ones", "aten.new_full",
      "aten.new_empty", "aten.scalar_tensor", "aten.fill", "aten.zero", "aten.empty_strided",
      "aten.empty_permuted", "aten.new_empty_strided", "aten._assert_tensor_metadata")
def _constant(op: OpCall) -> Iterator[Constraint]:
    if op.name.startswith(("aten.fill", "aten.zero")):  # fill(x, v) / zero(x): x read for its shape
        yield from (Free(a) for x in op.inputs() for a in x.axes if x.value != op.out.value)
    else:
        yield from (Free(a) for x in op.inputs() for a in x.axes)  # read for shape/dtype only
    for out in op.outputs:
        yield from (Free(a) for a in out.axes)


@rule("aten.tril", "aten.triu")
def _triangle(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    for d in range(x.ndim):
        if d >= x.ndim - 2:
            yield Block(x.axis(d), f"{op.name}: the triangle depends on positions")
            yield Block(out.axis(d), f"{op.name}: the triangle depends on positions")
        else:
            yield Tie(x.axis(d), out.axis(d), op.name)



@rule("aten.arange", "aten.linspace", "aten.logspace", "aten.eye")
def _varying(op: OpCall) -> Iterator[Constraint]:
    """New tensors whose values differ along their axes (ranges): they stay put. Random
    draws follow the random-op policy (see `permgraph.rules.elementwise`)."""
    yield from (Free(a) for x in op.inputs() for a in x.axes)  # read for shape/dtype only
    yield from block_all(op.outputs, f"{op.name}: values depend on position")
