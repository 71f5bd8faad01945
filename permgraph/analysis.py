"""``analyze`` and ``infer``: trace, run the rules over every node, solve, and build the PermSpec.

`analyze` returns the whole `Analysis` (the traced program, the annotated graph, the report);
`infer` returns its `PermSpec` alone, the plain data every matcher, metric and file function
reads.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from permgraph.errors import InferArgumentError, TraceError, UnsupportedOpError
from permgraph.experts import EXPERT_MODES, split_per_expert
from permgraph.graph import build_graph, module_path
from permgraph.heads import HEAD_MODES, find_splits, occurrences, split_layouts
from permgraph.islands import infer_islands
from permgraph.naming import group_names
from permgraph.rules import (
    Axis,
    Block,
    Constraint,
    Free,
    Fresh,
    Prod,
    Term,
    Tie,
    constraints_for,
    lookup,
    op_name,
    value_of_arg,
    values_of,
)
from permgraph.spec import Group, Layout, Member, PermSpec, Unsupported
from permgraph.tracing import Traced, trace
from permgraph.unify import Leaf, Tree, Unifier
from permgraph.views import picks_through_views

__all__ = ["infer", "analyze", "Analysis", "block_reasons"]


class _Solver:
    """Feeds rule constraints into a `Unifier`, one variable per tensor axis."""

    def __init__(self) -> None:
        self.u = Unifier()
        self.axis_var: dict[tuple[tuple[str, int | None], int], int] = {}

    def var(self, a: Axis) -> int:
        key = (a.value, a.dim)
        v = self.axis_var.get(key)
        if v is None:
            v = self.axis_var[key] = self.u.new(a.size)
        return v

    def term(self, t: Term, fresh: dict[tuple[str, int], int], mentioned: set[Axis]) -> int:
        if isinstance(t, Axis):
            mentioned.add(t)
            return self.var(t)
        if isinstance(t, Fresh):
            key = (t.tag, t.size)
            if key not in fresh:
                fresh[key] = self.u.new(t.size)
            return fresh[key]
        kind = "prod" if isinstance(t, Prod) else "cat"
        return self.u.term(kind, [self.term(p, fresh, mentioned) for p in t.parts])

    def apply(self, constraints: Iterable[Constraint], where: str) -> tuple[set[Axis], list[str]]:
        """Feed one call's constraints; returns the axes they mention and the reasons of
        blocks the rule reported as not understood."""
        mentioned: set[Axis] = set()
        reported: list[str] = []
        fresh: dict[tuple[str, int], int] = {}
        for c in constraints:
            if isinstance(c, Tie):
                a, b = self.term(c.a, fresh, mentioned), self.term(c.b, fresh, mentioned)
                self.u.unify(a, b, f"{c.why} @ {where}")
            elif isinstance(c, Block):
                self.u.block(self.term(c.a, fresh, mentioned), f"{c.reason} @ {where}")
                if c.report and c.reason not in reported:
                    reported.append(c.reason)
            elif isinstance(c, Free):
                self.term(c.a, fresh, mentioned)
            else:  # pragma: no cover - rules are typed
                raise TypeError(f"a rule returned {c!r}, not a Tie/Block/Free")
        return mentioned, reported

    def block_value(self, node: torch.fx.Node, reason: str) -> None:
        for v in values_of(node):
            for a in v.axes:
                self.u.block(self.var(a), reason)


def _tensor_inputs(node: torch.fx.Node):
    seen = {}
    for a in node.all_input_nodes:
        tv = value_of_arg(a)
        if tv is not None:
            seen.setdefault(tv.value, tv)
        elif isinstance(a.meta.get("val"), (list, tuple)) and node.target is not operator.getitem:
            for tv in values_of(a):
                seen.setdefault(tv.value, tv)
    return list(seen.values())


def _run_rules(traced: Traced) -> tuple[_Solver, list[Unsupported], list[Unsupported]]:
    """Run every node's rule and collect the constraints in a solver; returns it, the
    report, and the part of the report that is layout conflicts."""
    s = _Solver()
    unsupported: list[Unsupported] = []
    nodes = list(traced.graph_module.graph.nodes)
    skipped, replaced = picks_through_views(traced.graph_module.graph)
    by_key: dict[str, torch.fx.Node] = {}
    conflicts: list[tuple[torch.fx.Node, int]] = []  # (node, index into s.u.conflicts)
    for node in nodes:
        seen = len(s.u.conflicts)
        _visit(node, traced, s, unsupported, nodes, skipped, replaced, by_key)
        conflicts += [(node, i) for i in range(seen, len(s.u.conflicts))]
    weights = s.u.reachable([s.var(a) for n in nodes if n.op == "placeholder" and n.name in traced.params
                             for v in values_of(n) for a in v.axes if a.size > 1])
    before = len(unsupported)
    _report_conflicts(s, unsupported, conflicts, weights)
    found = unsupported[before:]
    _report_pinning_constants(traced, s, unsupported, nodes, weights)
    s.u.finish()
    return s, unsupported, found


def block_reasons(traced: Traced) -> dict[str, list[list[str | None]]]:
    """Per node, per output tensor, per dim: why the axis is blocked (None when it is not,
    ``""`` when the rules never saw it: a view the picks read through). Re-runs the rules on
    ``traced`` (milliseconds: no trace)."""
    s, _, _ = _run_rules(traced)
    out: dict[str, list[list[str | None]]] = {}
    for node in traced.graph_module.graph.nodes:
        per = []
        for v in values_of(node):
            dims: list[str | None] = []
            for a in v.axes:
                var = s.axis_var.get((a.value, a.dim))
                dims.append("" if var is None else None if not s.u.is_blocked(var)
                            else s.u.block_reason(var) or "part of a blocked axis")
            per.append(dims)
        out[node.name] = per
    return out


def _report_conflicts(s: _Solver, unsupported: list[Unsupported], conflicts, weights: set[int]) -> None:
    """Two layouts of one axis that cannot both hold block the units involved (sound); where
    those are units of weights, the report says which op asked for what."""
    done: set[tuple[str, str]] = set()
    for node, i in conflicts:
        msg = s.u.conflicts[i]
        if (node.name, msg) in done or not any(s.u.find(v) in weights for v in s.u.conflict_vars[i]):
            continue
        done.add((node.name, msg))
        unsupported.append(Unsupported(node.name, _op_of(node), module_path(node),
                                       f"layout conflict, the units involved are blocked: {msg}"))


def _op_of(node: torch.fx.Node) -> str:
    return op_name(node.target) if node.op == "call_function" else node.op


def _report_pinning_constants(traced: Traced, s: _Solver, unsupported: list[Unsupported], nodes,
                              weights: set[int]) -> None:
    """A tensor that is not in the state_dict (a non-persistent buffer, a plain tensor
    attribute, a lifted constant) keeps its positions: where one of its axes is tied to
    units of a weight, those units are fixed, and the report says so."""
    for node in nodes:
        constant = (node.op == "placeholder" and node.name not in traced.params and node.name not in traced.user_inputs) \
            or node.op == "get_attr"
        if not constant:
            continue
        dims = [a.dim for v in values_of(node) for a in v.axes if a.size > 1 and s.u.find(s.var(a)) in weights]
        if dims:
            what = traced.not_in_state_dict.get(node.name, f"constant {node.target}")
            unsupported.append(Unsupported(node.name, _op_of(node), module_path(node),
                                           f"{what}: it cannot be permuted, so it fixes the units of weights it "
                                           f"meets along dim(s) {dims}. Register it as a persistent buffer (or "
                                           "a parameter) to let them move."))


def _visit(node, traced: Traced, s: _Solver, unsupported: list[Unsupported], nodes, skipped, replaced, by_key) -> None:
    """Feed one node's constraints into the solver (see `analyze`)."""
    if node.op == "placeholder":
        if node.name in traced.user_inputs:
            s.block_value(node, f"model input {node.name}")
        elif node.name not in traced.params:
            s.block_value(node, traced.not_in_state_dict.get(node.name, f"constant {node.name}"))
        else:
            for v in values_of(node):  # give every parameter axis a variable
                for a in v.axes:
                    s.var(a)
            # tied weights can reach the graph as several placeholders of one tensor:
            # they are one tensor, so they get one permutation
            first = next((by_key[k] for k in traced.params[node.name] if k in by_key), None)
            if first is not None:
                a_val, b_val = value_of_arg(first), value_of_arg(node)
                for a, b in zip(a_val.axes, b_val.axes):
                    s.u.unify(s.var(a), s.var(b), f"tied weights {first.name} = {node.name}")
            for k in traced.params[node.name]:
                by_key.setdefault(k, node)
    elif node.name in skipped:  # views whose picks are related to their source directly
        return
    elif node.name in replaced:
        s.apply(replaced[node.name], module_path(node) or node.name)
    elif node.op == "call_function":
        ins, outs = _tensor_inputs(node), values_of(node)
        if not ins and not outs:
            return
        where = module_path(node) or node.name
        fn = lookup(node.target)
        reason = None
        if fn is None:
            reason = "no rule for this op"
        else:
            try:
                mentioned, reported = s.apply(list(constraints_for(node, fn)), where)
            except Exception as exc:  # noqa: BLE001 - a rule that cannot read a call blocks it
                reason = f"the rule could not read this call ({type(exc).__name__}: {exc})"
            else:
                missed = [a for v in ins + outs for a in v.axes if a not in mentioned]
                for a in missed:
                    s.u.block(s.var(a), f"{op_name(node.target)} left this axis unexplained @ {where}")
                if missed:
                    reported.append(f"the rule left {len(missed)} axis/axes unexplained (blocked)")
                if reported:
                    unsupported.append(Unsupported(node.name, op_name(node.target), module_path(node), "; ".join(reported)))
        if reason is not None:
            for v in ins + outs:
                for a in v.axes:
                    s.u.block(s.var(a), f"{op_name(node.target)}: {reason} @ {where}")
            unsupported.append(Unsupported(node.name, op_name(node.target), module_path(node), reason))
    elif node.op == "output":
        for arg in torch.utils._pytree.tree_leaves(node.args):
            if not isinstance(arg, torch.fx.Node):
                continue
            if arg.name in traced.mutations:
                buf = next(n for n in nodes if n.name == traced.mutations[arg.name])
                bv, nv = value_of_arg(buf), value_of_arg(arg)
                if bv is not None and nv is not None and bv.shape == nv.shape:
                    for a, b in zip(bv.axes, nv.axes):
                        s.u.unify(s.var(a), s.var(b), f"buffer update @ {buf.name}")
                    continue
            s.block_value(arg, f"model output {arg.name}")
    elif node.op == "get_attr":
        s.block_value(node, f"attribute {node.target}")


def _occurrences(t: Leaf | Tree, offset: int, scale: int, repeats: tuple[tuple[int, int], ...], out: list,
                 above: tuple[int, ...] = ()) -> None:
    """Walk a resolved layout tree: every unblocked leaf of >1 unit is a group occurrence,
    recorded as ``(root, layout, roots of the refined variables above it)``."""
    if isinstance(t, Leaf):
        if not t.blocked and t.size > 1:
            out.append((t.root, Layout(offset, scale, repeats), above))
        return
    above = above + (t.root,)
    if t.kind == "cat":
        start = 0
        for p in t.parts:
            _occurrences(p, offset + start * scale, scale, repeats, out, above)
            start += p.size
        return
    sizes = [p.size for p in t.parts]
    for i, p in enumerate(t.parts):
        left = math.prod(sizes[:i])
        right = math.prod(sizes[i + 1:])
        reps = repeats + (((left, sizes[i] * right * scale),) if left > 1 else ())
        _occurrences(p, offset, scale * right, reps, out, above)


def _build_spec(traced: Traced, s: _Solver, unsupported: list[Unsupported],
                heads: str = "shared", experts: str = "shared") -> tuple[PermSpec, dict[Any, str], dict[int, int]]:
    order = {k: i for i, k in enumerate(traced.state_shapes)}
    found: dict[Any, list[Member]] = {}
    parents: dict[Any, set[int]] = {}
    nodes = {n.name: n for n in traced.graph_module.graph.nodes}
    done: set[str] = set()
    carried: dict[int, list] = {}  # root -> [(keys, axis, tree)] of the parameters holding it
    for ph, keys in traced.params.items():
        val = value_of_arg(nodes[ph])
        if val is None or done.issuperset(keys):
            continue  # a tied weight already read through another placeholder
        done.update(keys)
        for a in val.axes:
            occ: list = []
            tree = s.u.tree(s.var(a))
            _occurrences(tree, 0, 1, (), occ)
            for root, layout, above in occ:
                parents.setdefault(root, set()).update(above)
                carried.setdefault(root, []).append((keys, a.dim, tree))
                for key in keys:
                    found.setdefault(root, []).append(Member(key, a.dim, layout))
    splits: dict[int, int] = {}
    if heads == "independent":
        within = {r: v for r, v in carried.items() if any(m.layout.repeats for m in found[r])}
        for r, index in find_splits(traced, s, within).items():
            per_head: dict[tuple[int, int], list[Member]] = {}
            for keys, dim, tree in dict.fromkeys((tuple(k), d, t) for k, d, t in carried[r]):
                for o in occurrences(tree, r):
                    lays = split_layouts(o, index)
                    if lays is None:  # a parameter whose heads are no layout: keep it shared
                        per_head = {}
                        break
                    for i, lay in enumerate(lays):
                        per_head.setdefault((r, i), []).extend(Member(key, dim, lay) for key in keys)
                else:
                    continue
                break
            if per_head:
                splits[r] = index
                found.update(per_head)
                for k in per_head:
                    parents[k] = parents.get(r, set()) | {index}
                del found[r]
    if experts == "independent":
        split_per_expert(traced, s, found, parents)
    ranked = []
    for root, members in found.items():
        members.sort(key=lambda m: (order.get(m.key, 1 << 30), m.axis, m.layout.offset))
        # a head's own units come after the groups that move whole heads (see permgraph.heads)
        ranked.append((order.get(members[0].key, 1 << 30), members[0].axis, members[0].layout.offset,
                       isinstance(root, tuple), root, members))
    ranked.sort(key=lambda r: r[:4])
    groups: list[Group] = []
    roots: dict[Any, str] = {}
    names = group_names(traced, s, [(root, members) for *_, root, members in ranked], splits)
    for *_, root, members in ranked:
        r = root[0] if isinstance(root, tuple) else root
        # a part of a refined axis (heads, groups of a grouped conv) was tied through it
        whys = list(s.u.why(r))
        for p in sorted(parents.get(root, ())):
            whys += s.u.why(p)
        why = tuple(dict.fromkeys(whys))
        groups.append(Group(names[root], s.u.size(r), tuple(members), why))
        roots[root] = names[root]
    return PermSpec(tuple(groups), tuple(unsupported), dict(traced.state_shapes)), roots, splits


def _annotate(graph, traced: Traced, s: _Solver, roots: dict[Any, str], splits: dict[int, int]) -> None:
    """Write each node's ``groups`` (per output dim, the names of the groups that permute it)
    and ``layouts`` (per output dim, ``(group name, Layout)`` pairs). A per-head group has
    layouts where its head is an outer factor of the dim (``[..., H*D]``), none where the
    head is a dim of its own (no layout of one dim says where a head's units are)."""
    for node in traced.graph_module.graph.nodes:
        names, layouts = [], []
        for v in values_of(node):
            dims_n, dims_l = [], []
            for a in v.axes:
                occ: list = []
                _occurrences(s.u.tree(s.var(a)), 0, 1, (), occ)
                pairs = [(roots[r], lay) for r, lay, _ in occ if r in roots]
                tree = s.u.tree(s.var(a))
                for r in dict.fromkeys(r for r, _, _ in occ if r in splits):
                    for o in occurrences(tree, r):
                        pairs += [(roots[(r, i)], lay) for i, lay in enumerate(split_layouts(o, splits[r]) or ())]
                dims_l.append(tuple(pairs))
                dims_n.append(tuple(dict.fromkeys(n for n, _ in dims_l[-1])))
            names.append(tuple(dims_n))
            layouts.append(tuple(dims_l))
        if node.name in graph.nodes:
            tup = isinstance(node.meta.get("val"), (list, tuple))
            graph.nodes[node.name]["groups"] = tuple(names) if tup else (names[0] if names else ())
            graph.nodes[node.name]["layouts"] = tuple(layouts) if tup else (layouts[0] if layouts else ())


@dataclass(eq=False)
class Analysis:
    """The result of `analyze`: the groups and what they were derived from.

    Attributes:
        spec: the `PermSpec` (plain data; ``spec.analysis`` is this object).
        traced: the `permgraph.tracing.Traced` program the rules ran on.
        graph: the ``networkx`` graph of the program (see `permgraph.graph`), each node
            annotated with the groups (``groups``) and layouts (``layouts``) of its output dims.
        conflicts: the layout conflicts found (also in ``spec.unsupported``).
    """

    spec: PermSpec
    traced: Traced
    graph: Any
    conflicts: tuple[Unsupported, ...] = ()

    @property
    def unsupported(self) -> tuple[Unsupported, ...]:
        """The ops whose axes were blocked (``spec.unsupported``)."""
        return self.spec.unsupported

    @property
    def program(self) -> torch.export.ExportedProgram:
        """The exported program (``traced.program``)."""
        return self.traced.program


def analyze(model: torch.nn.Module, example_inputs: Any = None, *, strict: bool = False,
            heads: str = "shared", experts: str = "shared") -> Analysis:
    """`infer`, keeping what the groups were derived from: the traced program and the graph.

    Args and Raises: as `infer`.

    Examples:
        >>> import torch, permgraph
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> a = permgraph.analyze(mlp, torch.randn(3, 4))
        >>> a.spec.names, a.graph.nodes["relu"]["groups"]
        (['0'], ((), ('0',)))
    """
    if isinstance(model, Traced):  # the old analyze(traced) -> (solver, unsupported)
        import warnings

        warnings.warn("analyze(traced) is deprecated: analyze(model, example_inputs) returns an Analysis; "
                      "block_reasons(traced) reads why axes are blocked", DeprecationWarning, stacklevel=2)
        return _run_rules(model)[:2]  # type: ignore[return-value]
    if heads not in HEAD_MODES:
        raise InferArgumentError(f"infer(heads={heads!r}): expected one of {', '.join(map(repr, HEAD_MODES))}")
    if experts not in EXPERT_MODES:
        raise InferArgumentError(f"infer(experts={experts!r}): expected one of {', '.join(map(repr, EXPERT_MODES))}")
    traced = trace(model, example_inputs)
    t0 = time.perf_counter()
    s, unsupported, conflicts = _run_rules(traced)
    spec, roots, splits = _build_spec(traced, s, unsupported, heads, experts)
    graph = build_graph(traced)
    _annotate(graph, traced, s, roots, splits)
    traced.extra["rules_seconds"] = time.perf_counter() - t0
    if strict and unsupported:
        raise UnsupportedOpError(
            f"{len(unsupported)} op(s) have no rule and were blocked:\n  "
            + "\n  ".join(map(str, unsupported))
            + "\nRegister a rule for them (see 'Write a rule for your own op' in the docs), or pass strict=False."
        )
    result = Analysis(spec, traced, graph, tuple(conflicts))
    spec._analysis = result
    return result


def infer(model: torch.nn.Module, example_inputs: Any, *, strict: bool = False, islands: bool = True,
          heads: str = "shared", experts: str = "shared") -> PermSpec:
    """Find every group of hidden units of ``model`` that can be reordered without changing
    what it computes.

    Args:
        model: any ``nn.Module``; traced in eval mode (its mode is restored).
        example_inputs: a Tensor, a tuple of positional arguments or a dict of keyword
            arguments, as the model's forward takes them.
        strict: raise `UnsupportedOpError` if any op had to be
            blocked for want of a rule, instead of reporting it in ``spec.unsupported``.
        islands: when ``torch.export`` cannot trace the model whole, analyse its largest
            submodules that export instead (see `permgraph.islands`; warns `IslandsWarning`);
            False raises the `TraceError`.
        heads: ``"shared"`` (default): the units within attention heads are one group shared
            by every head. ``"independent"``: each head's units are a group of its own
            (``....qk.h3``) wherever every op on them is proven to act head by head, else
            they stay shared (see "Per-head units" in the docs).
        experts: ``"shared"`` (default): the hidden units of experts stacked in one weight
            (``[E, 2I, H]``, run as grouped products) are one group shared by every expert.
            ``"independent"``: each expert's units are a group of its own (``....e3``, members
            restricted to the expert's slice: `permgraph.spec.Member` ``at``) wherever the
            proof of `permgraph.experts` holds, else they stay shared. Weight matching,
            Sinkhorn and ``apply`` serve such groups; activation matching and REPAIR do not
            (see "Experts" in the docs).

    Returns:
        The `PermSpec`. ``spec.analysis`` holds the `Analysis` (traced program and networkx
        graph, each node's ``groups`` attribute naming the groups that permute each output
        dim); `analyze` returns it directly.

    Raises:
        TraceError: the model cannot be traced on these inputs (and, with ``islands``, none of
            its submodules that export gives a group).
        UnsupportedOpError: with ``strict=True``, when an op has no rule.

    Examples:
        >>> import torch, permgraph
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> [(g.name, g.size) for g in spec.groups]
        [('0', 8)]
        >>> spec.verify(mlp, torch.randn(3, 4)) < 1e-5
        True
    """
    try:
        return analyze(model, example_inputs, strict=strict, heads=heads, experts=experts).spec
    except TraceError as exc:
        if not islands:
            raise
        return infer_islands(model, example_inputs, exc,
                             lambda m, x: infer(m, x, strict=strict, islands=False, heads=heads, experts=experts))
