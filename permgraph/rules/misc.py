"""Embedding, pooling, padding, resizing, tuple access and constant factories."""

from __future__ import annotations

import re
from collections.abc import Iterator

from permgraph.rules import Block, Constraint, Free, OpCall, TensorValue, Tie, rule
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
_SPATIAL = {**_POOL, **_RESIZE, "aten.pixel_shuffle": 0, "aten.pixel_unshuffle": 0}


def _spatial_rule(op: OpCall) -> Iterator[Constraint]:
    packet = op.name.rsplit(".", 1)[0]
    k = _SPATIAL[packet]
    if k == 0:  # pixel shuffle moves channels into space: nothing may move
        yield from block_all([op.tensor("self"), *op.outputs], f"{packet}: mixes channels and space")
        return
    yield from _spatial(op, k, packet.split(".")[1])


rule(*_SPATIAL)(_spatial_rule)


@rule("aten.constant_pad_nd", "aten.pad", "aten.reflection_pad1d", "aten.reflection_pad2d",
      "aten.reflection_pad3d", "aten.replication_pad1d", "aten.replication_pad2d",
      "aten.replication_pad3d", "aten.circular_pad1d", "aten.circular_pad2d", "aten.circular_pad3d")
def _pad(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self") or op.tensor("input"), op.out
    pad = list(op.args.get("pad") or op.args.get("padding"))
    padded = {x.ndim - 1 - i // 2 for i, p in enumerate(pad) if int(p) != 0}
    for d in range(x.ndim):
        if d in padded:
            yield Block(x.axis(d), "padding: positions are ordered")
            yield Block(out.axis(d), "padding: positions are ordered")
        else:
            yield Tie(x.axis(d), out.axis(d), "padding: unpadded dim")


# Tensors whose values are the same everywhere: any permutation of their axes is harmless.
@rule("aten.zeros", "aten.ones", "aten.full", "aten.empty", "aten.zeros_like", "aten.ones_like",
      "aten.full_like", "aten.empty_like", "aten.new_zeros", "aten.new_ones", "aten.new_full",
      "aten.new_empty", "aten.scalar_tensor", "aten.fill", "aten.zero", "aten.empty_strided",
      "aten.empty_permuted", "aten.new_empty_strided", "aten._assert_tensor_metadata")
def _constant(op: OpCall) -> Iterator[Constraint]:
    if op.name.startswith(("aten.fill", "aten.zero")):  # in-place fill_/zero_ return their input
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



@rule("aten.arange", "aten.linspace", "aten.logspace", "aten.eye", "aten.randn", "aten.rand",
      "aten.randint", "aten.randn_like", "aten.rand_like", "aten.randint_like", "aten.randperm")
def _varying(op: OpCall) -> Iterator[Constraint]:
    """New tensors whose values differ along their axes (ranges, random draws): they stay put."""
    yield from (Free(a) for x in op.inputs() for a in x.axes)  # read for shape/dtype only
    yield from block_all(op.outputs, f"{op.name}: values depend on position")
