"""Trace an ``nn.Module`` into an fx graph of ATen ops with ``torch.export`` (non-strict).

Every parameter and buffer is an explicit graph input, named back to its state_dict key, so
no tensor can be forgotten; every node carries its shape (``meta["val"]``) and module path
(``meta["nn_module_stack"]``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import tree_leaves

from permgraph.errors import TraceError

__all__ = ["Traced", "trace", "as_args", "functionalize", "module_modes", "restore_modes"]

ExampleInputs = Any  # a Tensor, a tuple of positional args, or a dict of keyword args


def as_args(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split example inputs into ``(args, kwargs)``.

    A Tensor is one positional argument, a tuple/list is the positional arguments and a
    dict the keyword arguments.
    """
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


@dataclass
class Traced:
    """The result of `trace`.

    Attributes:
        program: the ``torch.export.ExportedProgram``.
        graph_module: its ``fx.GraphModule`` (a graph of ATen ops).
        params: placeholder name -> state_dict keys of that parameter/buffer (tied weights
            have several keys).
        not_in_state_dict: placeholder name -> why (non-persistent buffer, lifted constant).
        user_inputs: placeholder names of the model's inputs.
        user_outputs: node names returned to the caller.
        mutations: output node name -> placeholder name of the buffer it updates.
        state_shapes: every state_dict key -> shape.
        seconds: time spent in ``torch.export``.
    """

    program: ExportedProgram
    graph_module: torch.fx.GraphModule
    params: dict[str, tuple[str, ...]]
    not_in_state_dict: dict[str, str]
    user_inputs: list[str]
    user_outputs: list[str]
    mutations: dict[str, str]
    state_shapes: dict[str, tuple[int, ...]]
    seconds: float
    method: str = "torch.export (non-strict)"
    extra: dict[str, Any] = field(default_factory=dict)


def _short(exc: BaseException, limit: int = 1200) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def trace(model: torch.nn.Module, example_inputs: ExampleInputs, *, dynamic_shapes: Any = None) -> Traced:
    """Export ``model`` (in eval mode; every submodule's mode is restored) on
    ``example_inputs``, then functionalize the program (see `functionalize`).
    ``dynamic_shapes`` is passed to ``torch.export.export`` (default: every shape static).

    Raises:
        TraceError: the model fails on the inputs, or ``torch.export`` cannot trace it; the
            message carries the underlying error and what to try.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(
            f"expected an nn.Module, got {type(model).__name__}; wrap a function in an nn.Module "
            "whose forward calls it, with its weights as parameters or buffers"
        )
    args, kwargs = as_args(example_inputs)
    modes = module_modes(model)
    model.eval()
    t0 = time.perf_counter()
    # a failed export logs the fake-tensor traceback at ERROR level; the TraceError below says it better
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        try:
            program = _export(model, args, kwargs, dynamic_shapes)
        except Exception as exc:  # noqa: BLE001 - diagnose, then re-raise as TraceError
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
            except Exception as eager:  # noqa: BLE001
                raise TraceError(
                    f"{type(model).__name__} fails when called on the example inputs "
                    f"({_describe(args, kwargs)}): {_short(eager)}\n"
                    "Pass inputs the model accepts: a Tensor, a tuple of positional arguments "
                    "or a dict of keyword arguments, with the shapes and dtypes it expects."
                ) from eager
            raise TraceError(
                f"torch.export could not trace {type(model).__name__} "
                f"(the model itself runs on these inputs): {_short(exc)}\n"
                "What to try: remove data-dependent Python control flow or .item() calls from "
                "forward, pass Python flags as constants rather than inputs, or trace a submodule."
            ) from exc
        program, note = functionalize(program)
    finally:
        restore_modes(model, modes)
        fake_log.setLevel(level)
    seconds = time.perf_counter() - t0

    by_id: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for key, t in state.items():
        by_id.setdefault(id(t), []).append(key)
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))

    sig = program.graph_signature
    params: dict[str, tuple[str, ...]] = {}
    not_in_state: dict[str, str] = {}
    user_inputs: list[str] = []
    for spec in sig.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            if spec.kind == InputKind.BUFFER and spec.persistent is False:
                not_in_state[name] = f"non-persistent buffer {spec.target} (not in the state_dict)"
                continue
            t = named.get(spec.target)
            keys = by_id.get(id(t), []) if t is not None else []
            if spec.target not in keys:
                keys = [spec.target, *keys] if spec.target in state else keys
            if not keys:
                not_in_state[name] = f"{spec.target} is not in the state_dict"
                continue
            params[name] = tuple(keys)
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
        else:
            not_in_state[name] = f"{spec.kind.name.lower()} {spec.target}"
    user_outputs: list[str] = []
    mutations: dict[str, str] = {}
    buffer_placeholder = {s.target: s.arg.name for s in sig.input_specs if s.kind == InputKind.BUFFER}
    for spec in sig.output_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in buffer_placeholder:
            mutations[name] = buffer_placeholder[spec.target]
        else:
            user_outputs.append(name)
    shapes = {k: tuple(int(s) for s in v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    traced = Traced(program, program.graph_module, params, not_in_state, user_inputs, user_outputs, mutations, shapes, seconds)
    if note:
        traced.extra["functionalization"] = note
    return traced


def module_modes(model: torch.nn.Module) -> dict[torch.nn.Module, bool]:
    """The ``training`` flag of every submodule (``train(flag)`` on the root would overwrite
    submodules whose mode differs from it)."""
    return {m: m.training for m in model.modules()}


def restore_modes(model: torch.nn.Module, modes: dict[torch.nn.Module, bool]) -> None:
    """Put back the modes `module_modes` recorded, through ``train()`` (so a module that
    overrides it, as timm's LeViT does to drop a cache of derived tensors, sees the call)."""
    model.train(modes.get(model, model.training))
    for m in model.modules():  # parents before children: a child's own mode wins
        flag = modes.get(m)
        if flag is not None and m.training != flag:
            m.train(flag)


def _export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any = None) -> ExportedProgram:
    """``torch.export`` in non-strict mode. Where the model returns objects torch does not know
    how to flatten (a Hugging Face ``DynamicCache``, a user's dataclass), export again with the
    output replaced by the tuple of every tensor inside it, so those tensors stay outputs."""
    try:
        return _export_no_grad(model, args, kwargs, dynamic_shapes)
    except Exception as first:  # noqa: BLE001 - retried once with flat outputs
        handle = model.register_forward_hook(lambda _m, _i, out: tuple(tensors_in(out)))
        try:
            return _export_no_grad(model, args, kwargs, dynamic_shapes)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            raise first from None
        finally:
            handle.remove()


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Export without recording each node's Python stack trace (``meta["stack_trace"]``,
    which nothing here reads). Measured on fresh models, best of 5 alternating: infer
    0.70 s instead of 0.84 s on ResNet-50, 0.97 s instead of 1.12 s on ViT-B/16, no clear
    change on GPT-2. A torch without the switch records them as before."""
    cfg = torch.fx.config
    if not hasattr(cfg, "do_not_emit_stack_traces"):
        yield
        return
    old, cfg.do_not_emit_stack_traces = cfg.do_not_emit_stack_traces, True
    try:
        yield
    finally:
        cfg.do_not_emit_stack_traces = old


def _export_no_grad(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    dynamic_shapes: Any = None) -> ExportedProgram:
    # with grad off, a ``torch.no_grad()`` block inside forward (rotary embeddings) is a no-op
    # rather than an opaque ``wrap_with_set_grad_enabled`` sub-graph that would block its axes
    # torch prints the partial graph of a failed export to stderr (thousands of lines for a
    # detector's data-dependent box selection); the TraceError raised for it names the cause,
    # so that dump is dropped and everything else written meanwhile is passed on
    captured = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(captured), _no_stack_traces():
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        dump = getattr(exc, "partial_fx_graph", None)
        if dump is not None:
            captured = io.StringIO(captured.getvalue().replace(f"{dump}\n", ""))
        raise
    finally:
        sys.stderr.write(captured.getvalue())


def _mutates(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and getattr(schema, "is_mutable", False))


def _aliases(target: Any) -> bool:
    """Whether an op's result may share memory with an argument (a view, an in-place op)."""
    schema = getattr(target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _twin(target: Any) -> Any:
    """The functional twin of an in-place overload that writes its first argument only
    (``aten.relu_.default`` -> ``aten.relu.default``), or None."""
    schema = getattr(target, "_schema", None)
    if not isinstance(target, torch._ops.OpOverload) or schema is None:
        return None
    name = schema.name.split("::", 1)[1]
    args = schema.arguments
    if not name.endswith("_") or name.endswith("__") or not args or args[0].alias_info is None \
            or not args[0].alias_info.is_write or any(a.alias_info is not None and a.alias_info.is_write for a in args[1:]):
        return None
    packet = getattr(getattr(torch.ops, target.namespace, None), name[:-1], None)
    twin = getattr(packet, target._overloadname, None) if packet is not None else None
    if twin is None or [a.name for a in twin._schema.arguments] != [a.name for a in args] or _aliases(twin):
        return None
    return twin


def _rewrite_fresh_in_place(gm: torch.fx.GraphModule) -> bool:
    """Functionalize the common case in the graph itself, cheaply: in-place ops (``relu_``,
    ``add_``, ...) that write a tensor computed in forward which nothing else aliases (no
    view of it, not a graph input or output) become their functional twins, and every later
    reader reads the new value. Returns False, changing nothing, unless every in-place op of
    the graph is of that kind (then `functionalize` runs torch's functionalization)."""
    nodes = list(gm.graph.nodes)
    storage: dict[torch.fx.Node, torch.fx.Node] = {}  # in-place result -> the tensor it writes
    plan = []
    for n in nodes:
        if n.op != "call_function" or not _mutates(n.target):
            continue
        twin = _twin(n.target)
        base = n.args[0] if n.args else None
        if twin is None or not isinstance(base, torch.fx.Node):
            return False
        base = storage.get(base, base)
        fresh = base.op == "call_function" and not _aliases(base.target) and not _mutates(base.target) and (
            base.target is not operator.getitem or not _aliases(base.args[0].target))
        if not fresh:
            return False
        storage[n] = base
        plan.append((n, twin, base))
    members: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n, base in storage.items():
        members.setdefault(base, [base]).append(n)
    for group in members.values():
        for m in group:
            for u in m.users:
                if u.op == "output" or (u.op == "call_function" and u not in storage and _aliases(u.target)):
                    return False  # a view or an output would see the write
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    new_of: dict[torch.fx.Node, tuple[Any, torch.fx.Node]] = {n: (twin, base) for n, twin, base in plan}
    for n in nodes:
        if n.op == "output":
            continue
        n.args = torch.fx.node.map_arg(n.args, lambda a: env.get(a, a))
        n.kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env.get(a, a))
        if n in new_of:
            twin, base = new_of[n]
            with gm.graph.inserting_before(n):
                f = gm.graph.call_function(twin, n.args, n.kwargs)
            f.meta = dict(n.meta)
            for m in members[base]:
                env[m] = f
    for n in reversed(nodes):
        if n in new_of:
            n.replace_all_uses_with(env[n])
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return True


def functionalize(program: ExportedProgram) -> tuple[ExportedProgram, str]:
    """The program without in-place ops. A program with none is returned as it is; else
    ``run_decompositions({})`` (an empty table) keeps
    ``linear``, ``conv2d``, ``scaled_dot_product_attention`` and the other ops whole while
    functionalizing it, so an in-place update becomes a fresh value and a buffer updated in
    forward becomes an explicit ``BUFFER_MUTATION`` output.

    Returns:
        ``(program, note)``: the functional program, or the original one when torch cannot
        functionalize it (then ``note`` says why; its in-place ops have no rule and block).
    """
    if not any(_mutates(n.target) for n in program.graph.nodes if n.op == "call_function"):
        return program, ""  # functional already: nothing to do (and tracing again costs seconds)
    if _rewrite_fresh_in_place(program.graph_module):
        return program, ""
    try:
        with torch.no_grad():
            return program.run_decompositions({}), ""
    except Exception as exc:  # noqa: BLE001 - fall back to the graph as exported (sound: in-place ops block)
        return program, f"functionalization failed, in-place ops are blocked: {_short(exc, 300)}"


def tensors_in(obj: Any, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj``, in order, each as often as it is reached.

    The leaves of ``obj``'s pytree (``torch.utils._pytree``: containers, named tuples and
    every registered output class); then, through the leaves pytree does not know (a user's
    dataclass, a ``DynamicCache``, a dict or tuple subclass), their items or attributes.
    Plain ``tree_leaves`` is not enough: export is retried with these tensors as the outputs
    precisely when the model returns objects pytree cannot flatten. Objects are visited
    once (``seen``, by id), so cycles end.
    """
    seen = set() if seen is None else seen
    out: list[torch.Tensor] = []
    for leaf in tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
            continue
        if id(leaf) in seen or isinstance(leaf, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
            continue
        seen.add(id(leaf))
        if isinstance(leaf, dict):
            items: Any = list(leaf.values())
        elif isinstance(leaf, (list, tuple)):
            items = list(leaf)
        elif hasattr(leaf, "__dict__"):
            items = list(vars(leaf).values())
        else:
            slots = getattr(leaf, "__slots__", ())
            items = [getattr(leaf, a, None) for a in ([slots] if isinstance(slots, str) else slots)]
        out += tensors_in(items, seen)
    return out


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
        return type(x).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"
