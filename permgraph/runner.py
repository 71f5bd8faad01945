"""One runner: a model's exported program run on batches, with a hook per node.

Activation matching and REPAIR read (and REPAIR rewrites) the values of chosen graph nodes
while data flows through the model. Both run here, through ``torch.fx.Interpreter``:

- `runner_for(model)` gives the model's `Runner` (kept while the model lives, in a weak
  dictionary: nothing is written into the model, the spec or its analysis);
- `Runner.analysis` finds the graph a spec's groups sit on: the spec's own `Analysis` when
  it came from `permgraph.infer`, else the model's, analysed once on an example batch and
  matched to the spec's groups by their members (so a spec read back with
  `PermSpec.from_dict` drives activation matching and REPAIR, given the model);
- `Runner.run` / `Runner.run_pair` run one batch through one model (or two, node by node in
  lockstep), passing each hooked node's value through its hook.

Programs: the analysis' own program serves batches shaped like its example; other shapes
are served by one export with a dynamic batch dimension (dim 0 of every input tensor of the
batch's size). Where that export fails, specialises the batch dimension, or gives a graph
whose tensor ops are not those of the analysis' one by one (then its nodes cannot be paired
with the analysis' soundly: Hugging Face models and ViTs compute extra tensors from symbolic
sizes), the batch's shape is exported statically, once per shape.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.export.graph_signature import InputKind

from permgraph.errors import MergeError, PermGraphError, SpecMismatchError, TraceError, UntraceableModelError
from permgraph.tracing import Traced, as_args, trace

__all__ = ["Runner", "runner_for", "batch_inputs", "device_of", "to_device", "input_signature"]

Hook = Callable[[Any], Any]


def batch_inputs(batch: Any, inputs: Callable[[Any], Any] | None = None, *,
                 error: type[PermGraphError] = MergeError) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split a batch into the model's ``(args, kwargs)``, like ``infer``'s example inputs.

    Args:
        batch: a Tensor (the one input), a tuple or list of positional arguments, or a dict
            of keyword arguments.
        inputs: applied to the batch first, to pick the model's inputs out of it (for
            ``(x, y)`` batches: ``inputs=lambda b: b[0]``).
        error: the error class to raise (the caller's).

    Raises:
        MergeError: (or ``error``) a batch of another type.
    """
    if inputs is not None:
        batch = inputs(batch)
    if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
        raise error(
            f"cannot read a batch of type {type(batch).__name__}: pass a Tensor, a tuple of positional arguments "
            "or a dict of keyword arguments (use inputs=... to pick them out of each batch)"
        )
    return as_args(dict(batch) if isinstance(batch, Mapping) else batch)


def device_of(model: torch.nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model without any."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def to_device(x: Any, device: torch.device | None) -> Any:
    """Every tensor in ``x`` (a pytree) on ``device`` (None: as it is)."""
    if device is None:
        return x
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def _signature(leaves: list[Any]) -> tuple[Any, ...]:
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("const", repr(x)) for x in leaves)


def input_signature(traced: Traced) -> tuple[Any, ...]:
    """The shapes and dtypes of a program's user inputs (what its example batch was)."""
    return _signature(_user_values(traced))


def _user_values(traced: Traced) -> list[Any]:
    ph = {n.name: n for n in traced.graph_module.graph.nodes if n.op == "placeholder"}
    return [ph[n].meta.get("val") for n in traced.user_inputs]


class _Hooked(torch.fx.Interpreter):
    """An ``fx.Interpreter`` whose placeholders are given by name and whose hooked nodes'
    values pass through their hook (a tuple value: its first element)."""

    def __init__(self, gm: torch.fx.GraphModule, values: Mapping[str, Any], hooks: Mapping[str, Hook]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.values, self.hooks = values, hooks

    def run_node(self, n: torch.fx.Node) -> Any:
        out = self.values[n.name] if n.op == "placeholder" else super().run_node(n)
        hook = self.hooks.get(n.name)
        if hook is None:
            return out
        if isinstance(out, (tuple, list)):
            return type(out)([hook(out[0]), *out[1:]])
        return hook(out)

    def steps(self) -> Iterable[tuple[torch.fx.Node, Any]]:
        """Run node by node, yielding each node and its value (the output node is not run)."""
        for node in self.graph.nodes:
            if node.op == "output":
                return
            value = self.env[node] = self.run_node(node)
            yield node, value
            for dead in self.user_to_last_uses.get(node, ()):
                del self.env[dead]


class Runner:
    """The programs of one architecture, and how to run them on batches (see the module
    docstring). Get it with `runner_for`."""

    def __init__(self) -> None:
        self._analysis: Any = None  # the model's own Analysis, made on first need
        self._dynamic: Traced | None | bool = None  # None: not tried; False: failed
        self._static: dict[tuple[Any, ...], Traced] = {}
        self._names: dict[int, dict[str, str]] = {}  # id(program) -> analysis node name -> its node name

    # -- the graph of a spec ---------------------------------------------------------
    def analysis(self, spec: Any, model: torch.nn.Module, batches: Iterable[Any], inputs: Callable[[Any], Any] | None,
                 error: type[PermGraphError]) -> tuple[Any, Iterable[Any]]:
        """The `Analysis` whose graph carries ``spec``'s groups under their names, and the
        batches (the first one is read, and put back, when the model must be analysed).

        Raises:
            error: the model cannot be traced whole (weight matching still works), or a group
                of the spec is not one of the model's.
        """
        if spec.analysis is not None:
            return spec.analysis, batches
        if self._analysis is None:
            it = iter(batches)
            first = next(it, _END)
            if it is batches:  # a one-pass iterator: put the first batch back
                batches = itertools.chain(() if first is _END else [first], it)
            if first is _END:
                raise error("batches is empty: the model is analysed on the first batch (the spec has no analysis)")
            from permgraph.analysis import analyze

            args, kwargs = batch_inputs(first, inputs, error=error)
            try:
                self._analysis = analyze(model, kwargs if kwargs and not args else args)
            except TraceError as exc:
                raise UntraceableModelError(
                    f"this needs the model's traced graph (the spec has none), and torch.export cannot trace "
                    f"{type(model).__name__} whole: {exc}\n"
                    "Weight matching (permgraph.weight_matching) reads the weights alone and still works."
                ) from exc
        return _relabel(self._analysis, spec, error), batches

    # -- programs ------------------------------------------------------------------------
    def program(self, analysis: Any, model: torch.nn.Module, leaves: list[Any], batch: Any,
                expect: Iterable[str], error: type[PermGraphError]) -> Traced:
        """The program to run a batch (its flat ``leaves``) on, with every node of ``expect``
        (names in ``analysis.graph``) present and of the same op."""
        ref = analysis.traced
        sig = _signature(leaves)
        example = _user_values(ref)
        if sig == _signature(example) or (len(example) != len(leaves) and _signature(
                [x for x in leaves if isinstance(x, torch.Tensor)]) == _signature(example)):
            return ref  # the example's shapes (non-tensor inputs are no placeholders)
        if sig in self._static:
            return self._static[sig]
        if self._dynamic is None:
            self._dynamic = _export_dynamic(model, batch) or False
        if self._dynamic and _fits(self._dynamic, leaves) and self._align(self._dynamic, analysis, expect):
            return self._dynamic
        try:
            traced = trace(model, batch)
        except PermGraphError as exc:
            raise error(f"a batch of another shape than the example inputs could not be traced: {exc}") from exc
        if not _same_names(traced, analysis, expect):
            raise error(
                "the graph traced for a batch of another shape differs from the spec's; pass batches shaped "
                "like the example inputs, or infer the spec again on such a batch"
            )
        self._static[sig] = traced
        return traced

    def _align(self, traced: Traced, analysis: Any, expect: Iterable[str]) -> bool:
        """Find every node of ``expect`` in ``traced``. Names cannot be trusted across exports:
        a dynamic one adds symbolic-size arithmetic (``sym_size``, ``mul`` on SymInts) whose
        nodes shift the counter-based names. So the tensor-valued calls of both graphs are
        paired in order, and must be the same ops throughout."""
        expect = list(expect)
        known = self._names.get(id(traced))
        if known is not None and all(n in known for n in expect):
            return True
        mine, theirs = _tensor_calls(analysis.traced), _tensor_calls(traced)
        if len(mine) != len(theirs) or any(str(a.target) != str(b.target) for a, b in zip(mine, theirs)):
            return False
        names = self._names.setdefault(id(traced), {})
        names.update((a.name, b.name) for a, b in zip(mine, theirs))
        return all(n in names for n in expect)

    # -- running -------------------------------------------------------------------------
    def flatten(self, analysis: Any, batch: Any, inputs: Callable[[Any], Any] | None,
                error: type[PermGraphError]) -> tuple[list[Any], Any]:
        """The batch's flat inputs in the traced order, and the batch (kwargs in that order)."""
        args, kwargs = batch_inputs(batch, inputs, error=error)
        in_spec = analysis.traced.program.call_spec.in_spec
        try:
            from torch.export._tree_utils import reorder_kwargs

            kwargs = reorder_kwargs(kwargs, in_spec)
        except Exception:  # noqa: BLE001 - a mismatch is reported below
            pass
        flat, tree = torch.utils._pytree.tree_flatten((args, kwargs))
        if in_spec is not None and tree != in_spec:
            raise error(
                f"a batch is structured differently from the example inputs the spec was traced with "
                f"(got {tree}, expected {in_spec}); pass each batch as a Tensor, tuple of positional "
                "arguments or dict of keyword arguments, like infer's example_inputs"
            )
        return flat, (kwargs if kwargs else args)

    def _values(self, traced: Traced, model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                leaves: list[Any], error: type[PermGraphError]) -> dict[str, Any]:
        """Every placeholder's value: parameters from ``state``, buffers from ``model``, the
        rest from the program; the user inputs from ``leaves`` (on the model's device)."""
        device = device_of(model)
        ep = traced.program
        buffers = dict(model.named_buffers(remove_duplicate=False))
        specs = {getattr(s.arg, "name", None): s for s in ep.graph_signature.input_specs}
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        user = iter(to_device(tensors if len(traced.user_inputs) != len(leaves) else leaves, device))
        out: dict[str, Any] = {}
        for node in traced.graph_module.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in traced.user_inputs:
                out[node.name] = next(user)
                continue
            if node.name in traced.params:
                out[node.name] = state[traced.params[node.name][0]]
                continue
            s = specs.get(node.name)
            target = getattr(s, "target", None)
            if s is not None and s.kind == InputKind.BUFFER and target in buffers:
                value = buffers[target]
            elif target in ep.constants:
                value = ep.constants[target]
            elif target in ep.state_dict:
                value = ep.state_dict[target]
            else:
                raise error(f"cannot find the value of graph input {node.name} ({target}); infer the spec from this model")
            out[node.name] = to_device(value, device)
        return out

    def run(self, traced: Traced, model: torch.nn.Module, state: Mapping[str, torch.Tensor], leaves: list[Any],
            hooks: Mapping[str, Hook], error: type[PermGraphError] = MergeError) -> None:
        """Run one batch through ``model``'s architecture with the weights ``state``,
        passing each hooked node's value through its hook."""
        names = self._names.get(id(traced), {})
        hooks = {names.get(k, k): h for k, h in hooks.items()}
        with torch.no_grad():
            for _ in _Hooked(traced.graph_module, self._values(traced, model, state, leaves, error), hooks).steps():
                pass

    def run_pair(self, traced: Traced, models: tuple[torch.nn.Module, torch.nn.Module],
                 states: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], leaves: list[Any],
                 hook: Callable[[str, Any, Any], None], hooked: Iterable[str],
                 error: type[PermGraphError] = MergeError) -> None:
        """Run one batch through two models in lockstep, node by node; ``hook(name, a, b)``
        sees the values of every node in ``hooked`` (then they may be freed)."""
        names = self._names.get(id(traced), {})
        back = {names.get(k, k): k for k in hooked}  # node name here -> in the analysis graph
        runs = [_Hooked(traced.graph_module, self._values(traced, m, s, leaves, error), {}).steps()
                for m, s in zip(models, states)]
        with torch.no_grad():
            for (node, va), (_, vb) in zip(*runs):
                if node.name in back:
                    hook(back[node.name], va, vb)


_END = object()
_RUNNERS: weakref.WeakKeyDictionary[torch.nn.Module, Runner] = weakref.WeakKeyDictionary()


def check_unsliced(spec: Any, what: str, error: type[PermGraphError]) -> None:
    """Raise ``error`` if a group of ``spec`` has a member on one slice of a tensor
    (`permgraph.spec.Member` ``at``: one expert's units in a stacked mixture-of-experts tensor):
    ``what`` reads each group's units off the activations, and those units are no axis of any."""
    for g in spec.groups:
        m = next((m for m in g.members if m.at), None)
        if m is not None:
            raise error(
                f"{what} reads each group's units off the activations, but group {g.name!r} permutes units inside "
                f"one slice of a stacked tensor ({m}), and those are no axis of any activation. Align such a model "
                "with weight_matching, or infer the spec with infer(..., experts=\"shared\") (one group for the "
                "units of every expert)"
            )


def runner_for(model: torch.nn.Module) -> Runner:
    """The `Runner` of ``model`` (made once, dropped with the model)."""
    runner = _RUNNERS.get(model)
    if runner is None:
        runner = _RUNNERS[model] = Runner()
    return runner


def _relabel(analysis: Any, spec: Any, error: type[PermGraphError]) -> Any:
    """``analysis`` with its graph's group names those of ``spec`` (groups matched by size
    and members; the analysis' other groups dropped)."""
    mine = analysis.spec
    if mine.groups == spec.groups:
        return analysis
    from permgraph.analysis import Analysis

    by_members = {(g.size, frozenset(g.members)): g.name for g in mine.groups}
    names: dict[str, str] = {}
    for g in spec.groups:
        old = by_members.get((g.size, frozenset(g.members)))
        if old is None:
            raise SpecMismatchError(
                f"group {g.name!r} of the spec ({g.size} units, {', '.join(map(str, g.members[:3]))}) is not a group "
                "this model's analysis finds: the spec is of another architecture, or was edited. Infer it again "
                "with permgraph.infer(model, example_inputs)"
            )
        names[old] = g.name
    graph = analysis.graph.copy()
    for _, data in graph.nodes(data=True):
        for attr in ("groups", "layouts"):
            if attr in data:
                data[attr] = _rename(data[attr], names, attr == "layouts")
    return Analysis(spec, analysis.traced, graph, analysis.conflicts)


def _rename(value: Any, names: Mapping[str, str], pairs: bool) -> Any:
    """Group names in a node's ``groups`` / ``layouts`` attribute mapped, unknown ones dropped."""
    if not isinstance(value, tuple):
        return value
    if pairs and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
        return tuple((names[g], lay) for g, lay in value if g in names)
    if not pairs and value and all(isinstance(v, str) for v in value):
        return tuple(names[g] for g in value if g in names)
    return tuple(_rename(v, names, pairs) for v in value)


def _same_names(traced: Traced, analysis: Any, expect: Iterable[str]) -> bool:
    """Whether every node of ``expect`` is in ``traced`` under its name, with the same op (a
    static export of another shape names its nodes as the analysis' export does)."""
    from permgraph.rules import op_name

    nodes = {n.name: n for n in traced.graph_module.graph.nodes}
    for name in expect:
        node = nodes.get(name)
        want = str(analysis.graph.nodes[name].get("target")) if name in analysis.graph.nodes else None
        if node is None or node.op != "call_function" or want not in (str(node.target), op_name(node.target)):
            return False
    return True


def _tensor_calls(traced: Traced) -> list[torch.fx.Node]:
    """The calls whose value is a tensor (or a tuple holding one), in graph order."""
    def tensor(v: Any) -> bool:
        return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v))

    return [n for n in traced.graph_module.graph.nodes if n.op == "call_function" and tensor(n.meta.get("val"))]


def _export_dynamic(model: torch.nn.Module, batch: Any) -> Traced | None:
    """The model exported once on ``batch`` with dim 0 of every input tensor of the batch's
    size dynamic (``Dim.AUTO``: torch keeps it symbolic where the model allows), or None
    where the export fails or specialises every batch dimension. torch.export graphs are
    otherwise shape-specialised; then the caller exports each batch shape statically."""
    args, kwargs = as_args(batch)
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.ndim]
    if not tensors or int(tensors[0].shape[0]) < 2:
        return None  # a batch of one: 0/1 specialisation, nothing to generalise from
    size = int(tensors[0].shape[0])
    shapes = torch.utils._pytree.tree_map(
        lambda t: {0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == size else None,
        (args, kwargs))
    try:
        traced = trace(model, batch, dynamic_shapes=shapes[1] if kwargs and not args else shapes[0])
    except Exception:  # noqa: BLE001 - the per-shape exports still serve every batch
        return None
    vals = _user_values(traced)
    if not any(isinstance(v, torch.Tensor) and v.ndim and not isinstance(v.shape[0], int) for v in vals):
        return None
    return traced


def _fits(traced: Traced, leaves: list[Any]) -> bool:
    """Whether a batch's flat inputs fit a program with symbolic batch dimensions."""
    vals = _user_values(traced)
    if len(vals) != len(leaves):
        return False
    symbols: dict[str, int] = {}
    for v, x in zip(vals, leaves):
        if not isinstance(v, torch.Tensor):
            if isinstance(x, torch.Tensor) or repr(v) != repr(x):
                return False
            continue
        if not isinstance(x, torch.Tensor) or x.dtype != v.dtype or x.ndim != v.ndim:
            return False
        for want, got in zip(v.shape, x.shape):
            if isinstance(want, int):
                if want != got:
                    return False
            elif got < 2 or symbols.setdefault(str(want), int(got)) != got:
                return False
    return True
