"""Reductions and ops along one dim.

A sum, mean, variance or max over a dim is invariant to any permutation of that dim, so
the reduced axis is free; the kept dims tie to the output. Ops whose result depends on
the order along a dim (argmax indices, cumulative sums) block it. Softmax is equivariant.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

from permgraph.rules import Block, Constraint, Free, OpCall, Tie, rule
from permgraph.rules._util import norm_dim


def _dims(op: OpCall, ndim: int) -> set[int]:
    dims = op.args.get("dim", None)
    if dims is None or dims == []:
        return set(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return {norm_dim(int(d), ndim) for d in dims}


def _reduce(op: OpCall, order_matters: bool) -> Iterator[Constraint]:
    x = op.tensor("self") or op.tensor("input")
    dims = _dims(op, x.ndim)
    keepdim = bool(op.args.get("keepdim", False))
    why = f"reduction {op.name}"
    for out in op.outputs:
        kept = [d for d in range(x.ndim) if keepdim or d not in dims]
        if len(kept) != out.ndim:
            yield from (Block(a, f"{why}: unexpected output rank", report=True) for a in x.axes + out.axes)
            return
        for dx, dy in zip(kept, range(out.ndim)):
            if dx in dims:
                yield Free(out.axis(dy))  # a kept size-1 dim
            else:
                yield Tie(x.axis(dx), out.axis(dy), why)
    for d in dims:
        if order_matters and x.shape[d] > 1:
            yield Block(x.axis(d), f"{why}: the result depends on the order along dim {d}")
        else:
            yield Free(x.axis(d))


@rule(
    "aten.sum", "aten.mean", "aten.amax", "aten.amin", "aten.var", "aten.std",
    "aten.var_mean", "aten.std_mean", "aten.prod", "aten.logsumexp", "aten.linalg_vector_norm",
    "aten.norm", "aten.any", "aten.all", "aten.count_nonzero", "aten.nansum", "aten.nanmean",
    "aten.aminmax",
)
def _invariant_reduce(op: OpCall) -> Iterator[Constraint]:
    yield from _reduce(op, order_matters=False)


@rule("aten.max", "aten.min")
def _max(op: OpCall) -> Iterator[Constraint]:
    # max.dim / min.dim also return indices, which depend on the order (when they are used)
    indices_used = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in op.node.users)
    yield from _reduce(op, order_matters=len(op.outputs) > 1 and indices_used)


@rule("aten.argmax", "aten.argmin")
def _argmax(op: OpCall) -> Iterator[Constraint]:
    yield from _reduce(op, order_matters=True)


@rule("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten.special_softmax")
def _softmax(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self") or op.tensor("input"), op.out
    for a, b in zip(x.axes, out.axes):
        yield Tie(a, b, "softmax: equivariant along every dim")


@rule("aten.sort", "aten.argsort", "aten.topk", "aten.msort")
def _sort(op: OpCall) -> Iterator[Constraint]:
    """Sorted values do not depend on the order of the input along ``dim`` (like a reduction);
    the indices do (they name its positions). The output's ``dim`` holds ranks: blocked."""
    x = op.tensor("self")
    dim = norm_dim(int(op.args.get("dim", -1 if not op.name.startswith("aten.msort") else 0)), x.ndim)
    if op.name.startswith("aten.argsort"):
        indices_used = True
    else:
        indices_used = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in op.node.users)
    if indices_used:
        yield Block(x.axis(dim), f"{op.name}: its indices name positions along dim {dim}", True)
    else:
        yield Free(x.axis(dim))
    for out in op.outputs:
        for d in range(x.ndim):
            if d == dim:
                yield Block(out.axis(d), f"{op.name}: ranks along dim {d}")
            else:
                yield Tie(x.axis(d), out.axis(d), op.name)


@rule("aten.cumsum", "aten.cumprod", "aten.logcumsumexp", "aten.cummax", "aten.cummin")
def _cumulative(op: OpCall) -> Iterator[Constraint]:
    x = op.tensor("self")
    dim = norm_dim(int(op.args["dim"]), x.ndim)
    for out in op.outputs:
        for d, (a, b) in enumerate(zip(x.axes, out.axes)):
            if d == dim:
                yield Block(a, f"{op.name}: accumulates along dim {d} in order")
                yield Block(b, f"{op.name}: accumulates along dim {d} in order")
            else:
                yield Tie(a, b, op.name)


@rule("aten.diff")
def _diff(op: OpCall) -> Iterator[Constraint]:
    x, out = op.tensor("self"), op.out
    dim = norm_dim(int(op.args.get("dim", -1)), x.ndim)
    for t in (x, op.tensor("prepend"), op.tensor("append"), out):
        if t is None:
            continue
        for d in range(t.ndim):
            if d == dim:
                yield Block(t.axis(d), "diff: differences of neighbours along this dim")
            else:
                yield Tie(t.axis(d), x.axis(d), "diff: other dims")
