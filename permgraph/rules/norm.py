"""Normalisations: batch/instance norm (per channel), layer/RMS norm (over trailing dims,
whose statistics are invariant to a permutation), group norm (groups of channels)."""

from __future__ import annotations

from collections.abc import Iterator

from permgraph.rules import Block, Constraint, Free, Fresh, OpCall, Prod, Tie, rule
from permgraph.rules._util import broadcast, tie_all


@rule(
    "aten.batch_norm", "aten.instance_norm", "aten._native_batch_norm_legit_no_training",
    "aten._native_batch_norm_legit", "aten._native_batch_norm_legit_functional",
    "aten.native_batch_norm", "aten._batch_norm_with_update", "aten._batch_norm_no_update",
    "aten.cudnn_batch_norm", "aten.miopen_batch_norm",
)
def _batch_norm(op: OpCall) -> Iterator[Constraint]:
    x = op.tensor("input")
    out = op.output(0)
    why = f"{op.name.split('.')[1]}: per-channel"
    yield from tie_all(x, out, why)
    ch = x.axis(1) if x.ndim > 1 else x.axis(0)
    for name in ("weight", "bias", "running_mean", "running_var"):
        p = op.tensor(name)
        if p is not None:
            yield Tie(p.axis(0), ch, f"{why} {name}")
    for extra in op.outputs[1:]:  # saved / updated statistics: one per channel, or empty
        if extra.ndim == 1 and extra.shape[0] == ch.size:
            yield Tie(extra.axis(0), ch, f"{why} statistics")
        elif extra.ndim == 1 and extra.shape[0] == 0:
            yield Free(extra.axis(0))
        else:
            yield from (Block(a, f"{why}: statistics of unexpected shape", True) for a in extra.axes)


def _trailing_norm(op: OpCall, shape_arg: str, why: str) -> Iterator[Constraint]:
    x = op.tensor("input")
    k = len(op.args[shape_arg])
    yield from tie_all(x, op.output(0), why)
    for name in ("weight", "bias"):
        p = op.tensor(name)
        if p is not None:
            for d in range(p.ndim):
                yield Tie(p.axis(d), x.axis(x.ndim - k + d), f"{why} {name}")
    for extra in op.outputs[1:]:  # mean / rstd: normalised dims have size 1
        for d, a in enumerate(extra.axes):
            if a.size == 1:
                yield Free(a)
            elif d < x.ndim and a.size == x.shape[d]:
                yield Tie(a, x.axis(d), f"{why} statistics")
            else:
                yield Block(a, f"{why}: statistics of unexpected shape", True)


@rule("aten._weight_norm")
def _weight_norm(op: OpCall) -> Iterator[Constraint]:
    """``w = g * v / ||v||``, the norm over every dim but ``dim`` (invariant under permutations
    of those dims), ``g`` sized along ``dim`` only: ``v``, ``g`` and ``w`` broadcast together."""
    yield from broadcast([op.tensor("v"), op.tensor("g")], op.out, "weight_norm")


@rule("aten.layer_norm", "aten.native_layer_norm")
def _layer_norm(op: OpCall) -> Iterator[Constraint]:
    yield from _trailing_norm(op, "normalized_shape", "layer_norm")


@rule("aten.rms_norm", "aten._fused_rms_norm")
def _rms_norm(op: OpCall) -> Iterator[Constraint]:
    yield from _trailing_norm(op, "normalized_shape", "rms_norm")


@rule("aten.group_norm", "aten.native_group_norm")
def _group_norm(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("input"), op.output(0)
    groups = int(op.args.get("num_groups") or op.args.get("group"))
    c = x.shape[1]
    why = f"group_norm ({groups} groups)"
    g = Fresh(groups, "groups")
    yield Tie(x.axis(1), Prod(g, Fresh(c // groups, "within")), f"{why}: channels in groups")
    yield from tie_all(x, out, why)
    for name in ("weight", "bias"):
        p = op.tensor(name)
        if p is not None:
            yield Tie(p.axis(0), x.axis(1), f"{why} {name}")
    for extra in op.outputs[1:]:  # mean / rstd of shape [N, groups]
        if extra.ndim == 2:
            yield Tie(extra.axis(0), x.axis(0), why)
            yield Tie(extra.axis(1), g, f"{why}: statistics per group")
        else:
            yield from (Block(a, f"{why}: statistics of unexpected shape", True) for a in extra.axes)
