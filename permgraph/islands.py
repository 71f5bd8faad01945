"""Islands: a model ``torch.export`` cannot trace whole, analysed as its largest submodules that export.

When the whole model does not export (data-dependent box selection in a detector, sliding-window
attention), `infer_islands` runs it eagerly once on the example inputs, recording with forward
hooks what every submodule was called with, and with a ``TorchFunctionMode`` which ops read
which parameter or buffer while which modules were in their forward. It then walks the module
tree top-down: a submodule that exports on every input it was called with is an *island* and is
analysed like a whole model (its inputs and outputs blocked); one that does not is reported and
its children are tried. The islands' groups, renamed to the whole model's state_dict keys, make
one `PermSpec`.

A group is kept only if it is a symmetry of the whole model:

- every tensor it permutes is read only by ops that ran inside the forward of the island that
  owns it (a parent reading ``self.child.weight``, a weight tied to code outside the island, drops
  every group with a member on that tensor: whole groups, never single members);
- a module called on several distinct signatures (shapes, dtypes, Python arguments) is analysed
  on each, and only the groups found identical on every one are kept;
- state_dict keys elsewhere that hold the same tensor as an island's member are permuted with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from permgraph.errors import IslandsWarning, TraceError
from permgraph.spec import Group, PermSpec, Unsupported
from permgraph.tracing import as_args, module_modes, restore_modes

__all__ = ["infer_islands"]

# ops that read a tensor's metadata only (never its values): not a use of its values
_METADATA = frozenset({
    "shape", "dtype", "device", "size", "dim", "ndim", "ndimension", "numel", "nelement", "is_floating_point",
    "is_complex", "requires_grad", "is_cuda", "is_sparse", "is_quantized", "is_meta", "layout", "element_size",
    "stride", "is_contiguous", "__len__", "get_device", "names", "is_leaf", "grad_fn", "__hash__", "is_nested",
    "is_mps", "is_xpu", "is_cpu", "itemsize", "nbytes", "storage_offset",
})


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property getter: Tensor.shape.__get__
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name


class _Recorder(TorchFunctionMode):
    """Records, for every parameter and buffer, the stacks of modules in their forward
    (outermost first, as module ids) under which an op read it."""

    def __init__(self, owned: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.owned = owned
        self.stack: list[int] = []
        self.uses: dict[int, set[tuple[int, ...]]] = {}
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and _func_name(func) not in _METADATA:
            for x in tree_flatten((args, kwargs))[0]:
                if isinstance(x, torch.Tensor) and id(x) in self.owned:
                    self.uses.setdefault(id(x), set()).add(tuple(self.stack))
        return func(*args, **kwargs)


def _signature(args: tuple, kwargs: dict) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    sig: list[Any] = [repr(spec)]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("tensor", tuple(x.shape), x.dtype, str(x.device)))
        elif isinstance(x, (int, float, bool, str, type(None))):
            sig.append((type(x).__name__, x))
        else:
            sig.append(("object", id(x)))  # not comparable: every call its own signature
    return tuple(sig)


def _snapshot(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _record(model: torch.nn.Module, args: tuple, kwargs: dict):
    """Run ``model`` once, eagerly, recording each submodule's distinct call signatures
    (``module -> {signature: (args, kwargs)}``) and the `_Recorder`'s reads of its tensors."""
    owned = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    rec = _Recorder(owned)
    calls: dict[torch.nn.Module, dict[tuple, tuple[tuple, dict]]] = {}

    def pre(mod, a, kw):
        rec.paused = True
        try:
            sig = _signature(a, kw)
            seen = calls.setdefault(mod, {})
            if sig not in seen:
                seen[sig] = tree_map(_snapshot, (tuple(a), dict(kw)))
        finally:
            rec.paused = False
        rec.stack.append(id(mod))

    def post(mod, a, kw, out):
        if rec.stack and rec.stack[-1] == id(mod):
            rec.stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        with torch.no_grad(), rec:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, rec


class _Call(torch.nn.Module):
    """``m(*args, **kwargs)`` with both as inputs (keys gain the prefix ``m.``)."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return self.m(*args, **kwargs)


def _has_state(m: torch.nn.Module) -> bool:
    return any(t.numel() > 1 for t in [*m.parameters(), *m.buffers()])


def _short(exc: BaseException, limit: int = 300) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _infer_calls(infer: Callable[[torch.nn.Module, Any], PermSpec], mod: torch.nn.Module,
                 sigs: dict[tuple, tuple[tuple, dict]]) -> list[PermSpec]:
    """The spec of ``mod`` on each distinct call, keys as in ``mod.state_dict()``."""
    specs = []
    for args, kwargs in sigs.values():
        if kwargs:
            spec = infer(_Call(mod), (args, kwargs))
            spec = _rekey(spec, _unwrap)
        else:
            spec = infer(mod, args)
        specs.append(spec)
    return specs


def _unwrap(name: str) -> str:
    """A key or module path of ``_Call(m)`` as one of ``m``."""
    return name[2:] if name.startswith("m.") else "" if name == "m" else name


def _rekey(spec: PermSpec, key: Callable[[str], str]) -> PermSpec:
    """``spec`` with every state_dict key, group name and module path mapped through ``key``."""
    groups = tuple(Group(key(g.name), g.size,
                         tuple(replace(m, key=key(m.key)) for m in g.members), g.why) for g in spec.groups)
    unsupported = tuple(Unsupported(u.node, u.op, key(u.module), u.reason) for u in spec.unsupported)
    return PermSpec(groups, unsupported, {key(k): v for k, v in spec.shapes.items()})


def _common(specs: list[PermSpec]) -> tuple[list[Group], int]:
    """The groups found identically on every call (and how many others were dropped)."""
    def ident(g: Group) -> tuple:
        return g.size, frozenset(g.members)

    shared = set.intersection(*({ident(g) for g in s.groups} for s in specs))
    kept = [g for g in specs[0].groups if ident(g) in shared]
    return kept, len(specs[0].groups) - len(kept)


def infer_islands(model: torch.nn.Module, example_inputs: Any, error: TraceError,
                  infer: Callable[[torch.nn.Module, Any], PermSpec]) -> PermSpec:
    """The groups of ``model`` found on its largest submodules that ``torch.export`` traces
    (see the module docstring).

    Args:
        model: the model whose whole trace failed with ``error``.
        example_inputs: as for `infer`.
        error: the `TraceError` of the whole model, re-raised when the model does not run
            eagerly on the inputs or no island gives a group (with a note naming the islands).
        infer: the per-model analysis (`infer` without the fallback), run on each island.

    Returns:
        A `PermSpec` over the whole model's state_dict keys and shapes, without an analysis
        (``spec.analysis`` None); ``unsupported`` names what was left out and why.
    """
    if not isinstance(model, torch.nn.Module):
        raise error
    args, kwargs = as_args(example_inputs)
    modes = module_modes(model)
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    saved = {k: v.detach().clone() for k, v in own.items() if isinstance(v, torch.Tensor)}
    model.eval()
    try:
        try:
            calls, rec = _record(model, args, kwargs)
        except Exception:  # noqa: BLE001 - the model does not run: the trace error says so
            raise error from None
        finally:
            with torch.no_grad():  # a forward that updated a buffer leaves the model as it was
                for k, t in own.items():
                    s = saved.get(k)
                    if s is not None and not torch.equal(t.detach(), s):
                        t.detach().copy_(s)
        islands: list[tuple[str, torch.nn.Module, PermSpec, int]] = []
        failed: list[tuple[str, torch.nn.Module, str]] = [("", model, _short(error))]
        visited: set[int] = {id(model)}

        def search(path: str, mod: torch.nn.Module) -> None:
            if id(mod) in visited or not _has_state(mod):
                return
            visited.add(id(mod))
            sigs = calls.get(mod)
            if sigs:
                try:
                    specs = _infer_calls(infer, mod, sigs)
                except TraceError as exc:
                    failed.append((path, mod, _short(exc)))
                else:
                    kept, dropped = _common(specs)
                    spec = PermSpec(tuple(kept), tuple(dict.fromkeys(u for s in specs for u in s.unsupported)), specs[0].shapes)
                    islands.append((path, mod, spec, dropped if len(specs) > 1 else 0))
                    return
            for name, child in mod.named_children():
                search(_join(path, name), child)

        for name, child in model.named_children():
            search(name, child)
    finally:
        restore_modes(model, modes)
    spec = _merge(model, islands, failed, rec, calls)
    if not spec.groups:  # nothing gained: the trace error says more than an empty spec
        names = ", ".join(p for p, *_ in islands[:6]) or "none"
        error.add_note(f"permgraph also tried the submodules with weights that export on their own (islands: "
                       f"{names}); none of them gave a group.")
        raise error
    _warn(model, islands, spec)
    return spec


def _merge(model, islands, failed, rec: _Recorder, calls) -> PermSpec:
    state = model.state_dict(keep_vars=True)
    order = {k: i for i, k in enumerate(state)}
    aliases: dict[int, list[str]] = {}
    for k, t in state.items():
        if isinstance(t, torch.Tensor):
            aliases.setdefault(id(t), []).append(k)
    unsupported: list[Unsupported] = []
    groups: list[Group] = []
    for path, mod, spec, dropped in islands:
        spec = _rekey(spec, lambda k, p=path: _join(p, k))
        outside: list[str] = []
        for g in spec.groups:
            members = list(g.members)
            bad = False
            for m in g.members:
                t = state[m.key]
                if any(id(mod) not in stack for stack in rec.uses.get(id(t), ())):
                    bad = True
                    outside.append(m.key)
                for k in aliases.get(id(t), ()):
                    twin = replace(m, key=k)
                    if twin not in members:  # the same tensor under another key moves with it
                        members.append(twin)
            if not bad:
                members.sort(key=lambda m: (order.get(m.key, 1 << 30), m.axis, m.layout.offset))
                groups.append(Group(g.name, g.size, tuple(members), g.why))
        unsupported += spec.unsupported
        sigs = len(calls.get(mod, ()))
        if outside:
            names = sorted(set(outside), key=lambda k: order.get(k, 0))
            unsupported.append(Unsupported(path, type(mod).__name__, path,
                                           f"island {path}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                                           "read by ops outside this island's forward; the groups permuting them are dropped"))
        if dropped:
            unsupported.append(Unsupported(path, type(mod).__name__, path,
                                           f"island {path} was called with {sigs} distinct signatures; {dropped} group(s) "
                                           "that did not hold identically on every call are dropped"))
    covered = {k for path, *_ in islands for k in state if k == path or k.startswith(path + ".")}
    for path, mod, reason in failed:
        direct = [_join(path, k) for k, v in mod.state_dict().items() if "." not in k]
        left = [k for k in direct if k not in covered]
        what = f"; its own tensors {', '.join(left[:5])} are in no group" if left else ""
        unsupported.append(Unsupported(path or "(whole model)", type(mod).__name__, path,
                                       f"torch.export could not trace this module, its submodules were tried as "
                                       f"islands{what}: {reason}"))
    groups.sort(key=lambda g: (order.get(g.members[0].key, 1 << 30), g.members[0].axis, g.members[0].layout.offset))
    shapes = {k: tuple(int(s) for s in v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return PermSpec(tuple(groups), tuple(unsupported), shapes)


def _warn(model: torch.nn.Module, islands, spec: PermSpec) -> None:
    names = [p for p, *_ in islands]
    warnings.warn(
        f"torch.export could not trace {type(model).__name__} whole; {len(names)} submodule(s) that export were "
        f"analysed as islands ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}), each with its inputs and "
        f"outputs blocked: {len(spec.groups)} group(s). What was left out and why is in spec.unsupported; spec.analysis is "
        "None (activation matching and REPAIR need a whole trace).",
        IslandsWarning,
        stacklevel=4,
    )
