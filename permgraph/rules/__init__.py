"""Per-op rules: how each ATen op constrains the permutations of its tensors' axes.

A rule is a plain function ``rule(op: OpCall) -> Iterable[Constraint]`` registered for one or
more op names with `rule`. It reads one graph node and *returns* constraints between
axes; it never mutates anything. The constraints:

* ``Tie(a, b)``: ``a`` and ``b`` receive the same permutation. Either side may be an
  `Axis` or a layout built from axes: ``Prod(...)`` (row-major product, as a reshape
  merges axes) or ``Cat(...)`` (concatenation, as ``torch.cat`` or a slice sees it).
* ``Block(a, reason)``: ``a`` must never be permuted (the op orders or mixes its units).
* ``Free(a)``: the op does not care how ``a`` is permuted (a reduction sums over it, or the
  values are constant along it).

Every axis of every tensor input and output must be mentioned by one of these; an axis a
rule leaves out is blocked, and an op without a rule blocks all its axes and is reported.

Example: a rule for a hypothetical ``mylib::scale(Tensor x, Tensor s)`` that multiplies each
channel of ``x`` (dim 1) by ``s``::

    from permgraph.rules import rule, Tie

    @rule("mylib.scale")
    def _scale(op):
        x, s, out = op.tensor("x"), op.tensor("s"), op.out
        for d in range(x.ndim):
            yield Tie(x.axis(d), out.axis(d))
        yield Tie(s.axis(0), x.axis(1))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

__all__ = [
    "Axis",
    "Prod",
    "Cat",
    "Fresh",
    "Tie",
    "Block",
    "Free",
    "Constraint",
    "TensorValue",
    "OpCall",
    "Rule",
    "rule",
    "lookup",
    "REGISTRY",
]


@dataclass(frozen=True)
class Axis:
    """One dimension of one tensor value of the graph."""

    value: tuple[str, int | None]  # (fx node name, index into a tuple output or None)
    dim: int
    size: int


@dataclass(frozen=True)
class Fresh:
    """A new axis-like unknown of ``size`` units that no other op sees (e.g. an expanded axis)."""

    size: int
    tag: str = ""


@dataclass(frozen=True)
class Prod:
    """Row-major product of parts: ``Prod(a, b)`` indexes unit ``(i, j)`` at ``i * |b| + j``."""

    parts: tuple[Term, ...]

    def __init__(self, *parts: Term) -> None:
        object.__setattr__(self, "parts", tuple(parts))


@dataclass(frozen=True)
class Cat:
    """Concatenation of parts along one axis."""

    parts: tuple[Term, ...]

    def __init__(self, *parts: Term) -> None:
        object.__setattr__(self, "parts", tuple(parts))


Term = Axis | Fresh | Prod | Cat


@dataclass(frozen=True)
class Tie:
    """``a`` and ``b`` receive the same permutation; ``why`` is recorded as provenance."""

    a: Term
    b: Term
    why: str = ""


@dataclass(frozen=True)
class Block:
    """``a`` must never be permuted. ``report=True`` marks a use the rule does not
    understand (rather than an op that orders its units by nature): the op is then listed
    in ``spec.unsupported``."""

    a: Term
    reason: str
    report: bool = False


@dataclass(frozen=True)
class Free:
    """The op does not care how ``a`` is permuted."""

    a: Term


Constraint = Tie | Block | Free


@dataclass(frozen=True)
class TensorValue:
    """A tensor flowing through the graph: its identity, shape and axes."""

    value: tuple[str, int | None]
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Number of dims."""
        return len(self.shape)

    def axis(self, d: int) -> Axis:
        """Dim ``d`` (negative counts from the end)."""
        d = d + self.ndim if d < 0 else d
        if not 0 <= d < self.ndim:
            raise IndexError(f"dim {d} out of range for a tensor of shape {self.shape}")
        return Axis(self.value, d, self.shape[d])

    @property
    def axes(self) -> list[Axis]:
        """Every dim, in order."""
        return [self.axis(d) for d in range(self.ndim)]


def dim_size(s: Any) -> int:
    """The size of one dim. A data-dependent size (the rows ``nonzero`` returns, a symbol
    ``u0`` of the exported graph) gets a stand-in far larger than any real axis, the same
    for the same expression: ties between such dims stay consistent, and a tie of one with a
    real axis is a size conflict (blocked)."""
    if isinstance(s, int):
        return s
    try:
        return int(s)
    except Exception:  # noqa: BLE001 - an unbacked symbol has no value to read
        expr = s.node.expr
        stand_in = {sym: (1 << 40) + 104729 * (int(str(sym)[1:]) if str(sym)[1:].isdigit() else 0)
                    for sym in sorted(expr.free_symbols, key=str)}
        return int(expr.subs(stand_in))


def _as_value(obj: Any, index: int | None, node_name: str) -> TensorValue | None:
    if isinstance(obj, torch.Tensor):
        return TensorValue((node_name, index), tuple(dim_size(s) for s in obj.shape))
    return None


def values_of(node: torch.fx.Node) -> list[TensorValue]:
    """The tensor values a node produces (one, several for tuple outputs, or none)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [TensorValue((node.name, None), tuple(dim_size(s) for s in val.shape))]
    if isinstance(val, (list, tuple)):
        out = []
        for i, v in enumerate(val):
            tv = _as_value(v, i, node.name)
            if tv is not None:
                out.append(tv)
        return out
    return []


def value_of_arg(arg: Any) -> TensorValue | None:
    """The tensor value an argument refers to (an fx Node with tensor meta), if any."""
    if isinstance(arg, torch.fx.Node):
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            return TensorValue((arg.name, None), tuple(dim_size(s) for s in val.shape))
    return None


@dataclass
class OpCall:
    """What a rule sees of one call: arguments by schema name and tensor values.

    Attributes:
        node: the fx node.
        name: the op's name, e.g. ``"aten.linear.default"``.
        args: arguments by schema name, defaults filled in (fx Nodes for tensors).
        outputs: the tensor values this call produces.
    """

    node: torch.fx.Node
    name: str
    args: dict[str, Any]
    outputs: list[TensorValue] = field(default_factory=list)

    @property
    def out(self) -> TensorValue:
        """The single tensor output (the first one for tuple-returning ops)."""
        if not self.outputs:
            raise KeyError(f"{self.name} at node {self.node.name} produces no tensor")
        return self.outputs[0]

    def output(self, i: int) -> TensorValue | None:
        """Tensor output number ``i`` (of a tuple-returning op), or None."""
        for v in self.outputs:
            if v.value[1] == i or (v.value[1] is None and i == 0):
                return v
        return None

    def tensor(self, name: str) -> TensorValue | None:
        """The tensor passed as argument ``name``, or None when absent or not a tensor."""
        return value_of_arg(self.args.get(name))

    def tensors(self, name: str) -> list[TensorValue | None]:
        """The tensors of a list argument (e.g. ``cat``'s ``tensors``)."""
        return [value_of_arg(a) for a in (self.args.get(name) or [])]

    def inputs(self) -> list[TensorValue]:
        """Every tensor this call reads (deduplicated, in argument order)."""
        seen: dict[tuple[str, int | None], TensorValue] = {}
        for a in self.node.all_input_nodes:
            tv = value_of_arg(a)
            if tv is not None:
                seen.setdefault(tv.value, tv)
        return list(seen.values())


class Rule(Protocol):
    """A rule: reads one call, returns its constraints."""

    def __call__(self, op: OpCall) -> Iterable[Constraint]: ...


REGISTRY: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for ops named like ``"aten.linear"`` (every overload) or
    ``"aten.add.Tensor"`` (one overload)."""

    def deco(fn: Rule) -> Rule:
        for n in names:
            if n in REGISTRY and REGISTRY[n] is not fn:
                raise ValueError(f"a rule for {n!r} is already registered ({REGISTRY[n]!r})")
            REGISTRY[n] = fn
        return fn

    return deco


def op_name(target: Any) -> str:
    """``"aten.add.Tensor"`` for ``torch.ops.aten.add.Tensor``; ``"operator.getitem"`` etc.

    Examples:
        >>> import operator, torch
        >>> op_name(torch.ops.aten.add.Tensor), op_name(operator.getitem)
        ('aten.add.Tensor', 'operator.getitem')
    """
    try:
        if isinstance(target, torch._ops.OpOverload):
            ns = target.namespace
            pkt = target._schema.name.split("::", 1)[1]
            return f"{ns}.{pkt}.{target._overloadname}"
        mod = getattr(target, "__module__", None) or ""
        mod = "operator" if mod in ("_operator", "operator") else mod
        return f"{mod}.{getattr(target, '__name__', None) or type(target).__name__}"
    except Exception:  # noqa: BLE001 - an odd target (a proxy, a broken object) still gets a name
        return f"<{type(target).__name__}>"


def _mutates(target: Any) -> bool:
    """Whether an op writes into one of its arguments (``add_``, ``index_fill_``, ``out=``
    variants). The traced graph is functionalized, so these only reach the rules when torch
    could not functionalize a program; they have no rule (their writes alias other values)."""
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and getattr(schema, "is_mutable", False))


def lookup(target: Any) -> Rule | None:
    """The rule for an fx call target: exact overload, then the op packet, then the
    random-op rule for ops ATen tags ``nondeterministic_seeded``, then the pointwise rule for
    ops ATen tags pointwise. An op that writes into its arguments has no
    rule (None: its axes are blocked and reported). Never raises: a target that cannot be
    read has no rule either.

    Examples:
        >>> import torch
        >>> lookup(torch.ops.aten.linear.default).__name__
        '_linear'
        >>> lookup(torch.ops.aten.mul_.Tensor) is None  # in-place: blocked, not guessed
        True
    """
    try:
        if _mutates(target):
            return None
        name = op_name(target)
        if name in REGISTRY:
            return REGISTRY[name]
        packet = name.rsplit(".", 1)[0]
        if packet in REGISTRY:
            return REGISTRY[packet]
        tags = getattr(target, "tags", ()) if isinstance(target, torch._ops.OpOverload) else ()
        if torch.Tag.nondeterministic_seeded in tags:  # one policy for random ops (rules/elementwise.py)
            return REGISTRY["<random>"]
        if torch.Tag.pointwise in tags:
            return REGISTRY["<pointwise>"]
    except Exception:  # noqa: BLE001 - an unreadable target is an op without a rule
        return None
    return None


def bind_args(node: torch.fx.Node) -> dict[str, Any]:
    """Arguments of a call by schema name, with defaults filled in.

    ``torch.fx.operator_schemas.normalize_function`` binds them to the op's schema; its
    signature calls the first argument ``input`` where the schema says ``self``, so the
    values are named from the schema itself. It gives up (``None``) on a schema argument
    without default that the call leaves out, on positional-only or varargs schemas; those
    are bound by hand (a missing argument is ``None``). Targets without a schema (Python
    functions such as ``operator.getitem``) are keyed by position and keyword.
    """
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    try:
        pair = normalize_function(target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - an ambiguous or unreadable schema: bound by hand below
        pair = None
    if pair is not None and len(pair.kwargs) == len(schema.arguments):
        return dict(zip((a.name for a in schema.arguments), pair.kwargs.values()))
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def constraints_for(node: torch.fx.Node, fn: Rule) -> Iterator[Constraint]:
    op = OpCall(node, op_name(node.target), bind_args(node), values_of(node))
    yield from fn(op)


# Register the rule families (import for side effects, in a fixed order).
from permgraph.rules import (  # noqa: E402,F401
    attention,
    conv,
    elementwise,
    linear,
    misc,
    norm,
    reduce,
    routing,
    shape,
)
