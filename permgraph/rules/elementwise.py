"""Element-wise ops: every input broadcasts against the output, dims tie one to one.

Random ops follow one policy. A symmetry must hold for every draw, and a draw is made by
position: the same seed puts the same noise (the same dropout mask) at the same position
whatever the weights are, so moving the units moves them against their noise. So every op
ATen tags ``nondeterministic_seeded`` (dropout in training mode, ``rand_like``, ``bernoulli``,
``randperm``, RReLU in training mode, ...) fixes the axes of what it draws and of what the
draw is applied to, and is reported in ``spec.unsupported``; this is what the seeded oracle
(`PermSpec.verify`) checks. Dropout and RReLU that do not draw (eval mode, ``p = 0``) are
element-wise. A random tensor read only for its shape (``randn_like(x)``) does not fix
``x``.
"""

from __future__ import annotations

from collections.abc import Iterator

from permgraph.rules import Cat, Constraint, Free, OpCall, Tie, rule
from permgraph.rules._util import block_all, broadcast, tie_all

# Ops that act element by element but that ATen does not tag ``pointwise``
# (ops tagged pointwise reach ``_pointwise`` through `lookup`).
_ELEMENTWISE = (
    "aten.hardswish", "aten.hardsigmoid", "aten.relu6", "aten.hardtanh", "aten.silu",
    "aten.mish", "aten.softplus", "aten.elu", "aten.selu", "aten.celu", "aten.gelu",
    "aten.leaky_relu", "aten.softshrink", "aten.hardshrink", "aten.threshold",
    "aten.log_sigmoid", "aten.log_sigmoid_forward", "aten.clamp", "aten.clamp_min",
    "aten.clamp_max", "aten.clone", "aten.contiguous",
    "aten.detach", "aten.alias", "aten.lift_fresh_copy", "aten._to_copy", "aten.to",
    "aten._to_dim_order_copy", "aten.copy", "aten.masked_fill",
    "aten.where", "aten.nan_to_num", "aten.lerp", "aten.addcmul", "aten.addcdiv",
    "aten.pow", "aten.float_power", "aten.square", "aten.positive", "aten.__and__", "aten.__or__",
    "aten.__xor__", "aten.__invert__", "aten.logical_not", "aten.min.other", "aten.max.other",
    "aten.real", "aten.imag", "aten.conj", "aten.conj_physical", "aten.resolve_conj", "aten.resolve_neg",
    # aliases of pointwise ops (the functional twins of ``multiply_``, ``greater_``, ...)
    "aten.multiply", "aten.divide", "aten.subtract", "aten.true_divide", "aten.floor_divide", "aten.rsub",
    "aten.greater", "aten.greater_equal", "aten.less", "aten.less_equal", "aten.not_equal", "aten.negative",
    "aten.absolute", "aten.arccos", "aten.arcsin", "aten.arctan", "aten.arctan2", "aten.arccosh", "aten.arcsinh",
    "aten.arctanh", "aten.fix", "aten.special_expit", "aten.special_exp2", "aten.special_expm1",
    "aten.special_log1p", "aten.special_erf", "aten.special_erfc", "aten.special_erfinv", "aten.special_round",
    "aten.special_sinc", "aten.special_ndtr", "aten.special_logit", "aten.special_xlogy", "aten.special_psi",
    "aten.special_digamma", "aten.special_i0",
)


@rule("<pointwise>", *_ELEMENTWISE)
def _pointwise(op: OpCall) -> Iterator[Constraint]:
    ins = op.inputs()
    for out in op.outputs:
        if out.ndim == 0:
            for x in ins:
                yield from (Free(a) for a in x.axes if a.size == 1)
            continue
        yield from broadcast(ins, out, f"element-wise {op.name.split('.')[1]}")


@rule("aten.type_as")
def _type_as(op: OpCall) -> Iterator[Constraint]:
    """``self`` cast to the dtype of ``other``, which is read for its dtype only."""
    x, other = op.tensor("self"), op.tensor("other")
    yield from tie_all(x, op.out, "element-wise type_as")
    if other is not None and other.value != x.value:
        yield from (Free(a) for a in other.axes)


@rule("aten.prelu")
def _prelu(op: OpCall) -> Iterator[Constraint]:
    x, w, out = op.tensor("self"), op.tensor("weight"), op.out
    yield from tie_all(x, out, "prelu")
    if w is not None and w.ndim == 1:
        if w.shape[0] == 1:
            yield Free(w.axis(0))
        else:
            yield Tie(w.axis(0), x.axis(1 if x.ndim > 1 else 0), "prelu: one slope per channel")


@rule("aten.glu")
def _glu(op: OpCall) -> Iterator[Constraint]:
    """glu(x, dim) = a * sigmoid(b) for the two halves a, b of x: unit i of the output reads
    unit i of each half, so the input axis is the output's layout twice."""
    x, out = op.tensor("self"), op.out
    dim = op.args["dim"] % x.ndim
    for d in range(x.ndim):
        if d == dim:
            yield Tie(x.axis(d), Cat(out.axis(d), out.axis(d)), "glu: halves gate each other")
        else:
            yield Tie(x.axis(d), out.axis(d), "glu")


def _draws(op: OpCall) -> bool:
    """Whether a call of a random-tagged op actually draws (dropout and RReLU in eval mode,
    or dropout with ``p = 0``, do not)."""
    name = op.name.split(".")[1]
    if "dropout" in name:
        train = op.args.get("train", op.args.get("training", True))
        return bool(train) and float(op.args.get("p", 0.5) or 0.0) > 0.0
    if name.startswith("rrelu"):
        return bool(op.args.get("training", False))
    return True


@rule("<random>")
def _random(op: OpCall) -> Iterator[Constraint]:
    """Ops tagged ``nondeterministic_seeded`` (see the module docstring)."""
    if not _draws(op):
        outs = op.outputs[:1] if "dropout" in op.name else op.outputs
        yield from broadcast(op.inputs(), outs[0], f"{op.name.split('.')[1]} (not drawing)")
        for extra in op.outputs[len(outs):]:  # native_dropout's mask: all ones
            yield from (Free(a) for a in extra.axes)
        return
    why = f"{op.name.split('.')[1]} draws random values by position; the same seed puts the same draw at the same position"
    if op.name.split(".")[1].endswith("_like") or op.name.startswith("aten.randperm"):
        yield from (Free(a) for x in op.inputs() for a in x.axes)  # read for shape and dtype only
    else:
        yield from block_all(op.inputs(), why, report=True)
    yield from block_all(op.outputs, why, report=True)
