"""Merging two aligned models: linear interpolation, BatchNorm statistics reset and REPAIR.

Interpolating two networks, even aligned ones, shrinks the spread of their hidden units:
the average of two unit activations that are not perfectly correlated has a smaller
variance than either. Two corrections undo that collapse:

- `reset_batchnorm`: a network with BatchNorm recomputes its running statistics on data
  (the interpolated running statistics are not the statistics of the interpolated network).
- `repair` (Jordan et al. 2023, *REPAIR*): every interpolated unit is rescaled and shifted
  so that its mean and standard deviation on data equal the interpolation of the
  endpoints' (``(1-α)·stat_A + α·stat_B``). It works without BatchNorm, and is generic over
  a `PermSpec`: the units it corrects are the groups' units, found through ``spec.graph``.

A batch, wherever this module takes ``batches``, is what the model's forward takes, as for
``infer``'s example inputs and the matchers: a Tensor (one input), a tuple of positional
arguments or a dict of keyword arguments. For a ``DataLoader`` of ``(x, y)`` pairs, pass
``inputs=lambda batch: batch[0]``.

Data parallel: under ``torch.distributed`` (``torchrun``), `reset_batchnorm` and `repair`
take each rank's own shard of the batches and sum their statistics over the process group
(``process_group=``), so every rank ends with the same model, the one a single process
gets on all the batches (see :mod:`permgraph.distributed`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from permgraph import distributed as _dist
from permgraph.errors import (
    MergeError,
    SpecMismatchError,
)
from permgraph.spec import PermSpec

__all__ = ["MergeError", "interpolate", "reset_batchnorm", "repair", "RepairReport", "Correction", "batch_inputs"]


# -- interpolation ---------------------------------------------------------------------

def _check_alpha(alpha: Any) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError) as exc:
        raise MergeError(f"alpha must be a number, got {type(alpha).__name__}") from exc
    if not math.isfinite(a):
        raise MergeError(f"alpha must be finite, got {alpha!r}")
    return a


def interpolate(state_a: Mapping[str, Any], state_b: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """The state_dict ``(1 - alpha) * A + alpha * B``.

    Floating-point (and complex) tensors are interpolated; integer and boolean tensors
    (``num_batches_tracked``, index buffers) and non-tensor entries are taken from A. The
    endpoints are exact: ``alpha=0`` gives A's values bit for bit, ``alpha=1`` B's (as new
    tensors; the inputs are never modified). Low-precision tensors (float16, bfloat16) are
    interpolated in float32 and rounded once. ``alpha`` outside ``[0, 1]`` extrapolates.

    Args:
        state_a: the first state_dict (``alpha=0``).
        state_b: the second (``alpha=1``), usually B aligned to A: ``spec.apply(perm, state_b)``.
        alpha: the interpolation weight of B.

    Returns:
        A new state_dict with A's keys, in A's order.

    Raises:
        SpecMismatchError: the keys, shapes or dtypes of A and B differ (the first difference
            is named).
        MergeError: ``alpha`` is not a finite number.

    Examples:
        >>> import torch
        >>> from permgraph.merge import interpolate
        >>> a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
        >>> b = {"w": torch.tensor([1.0, 4.0]), "n": torch.tensor(7)}
        >>> interpolate(a, b, 0.25)
        {'w': tensor([0.2500, 2.5000]), 'n': tensor(3)}
    """
    a_ = _check_alpha(alpha)
    missing = [k for k in state_a if k not in state_b]
    extra = [k for k in state_b if k not in state_a]
    if missing or extra:
        raise SpecMismatchError(
            f"the two state_dicts have different keys: only in A {missing[:5]}, only in B {extra[:5]}; "
            "interpolate state_dicts of the same architecture"
        )
    out: dict[str, Any] = {}
    for key, ta in state_a.items():
        tb = state_b[key]
        if not isinstance(ta, torch.Tensor):
            out[key] = ta
            continue
        if not isinstance(tb, torch.Tensor) or tb.shape != ta.shape:
            got = tuple(tb.shape) if isinstance(tb, torch.Tensor) else type(tb).__name__
            raise SpecMismatchError(f"{key!r} has shape {tuple(ta.shape)} in A but {got} in B")
        if tb.dtype != ta.dtype:
            raise SpecMismatchError(f"{key!r} is {ta.dtype} in A but {tb.dtype} in B; convert one of them first")
        ta = ta.detach()
        tb = tb.detach().to(ta.device)
        if not (ta.is_floating_point() or ta.is_complex()):
            out[key] = ta.clone()
        elif a_ == 0.0:
            out[key] = ta.clone()
        elif a_ == 1.0:
            out[key] = tb.clone()
        else:
            wide = ta.dtype if ta.dtype in (torch.float32, torch.float64) or ta.is_complex() else torch.float32
            out[key] = torch.lerp(ta.to(wide), tb.to(wide), a_).to(ta.dtype)
    return out


# -- batches ----------------------------------------------------------------------------

def batch_inputs(batch: Any, inputs: Callable[[Any], Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split a batch into the model's ``(args, kwargs)``, like ``infer``'s example inputs.

    Args:
        batch: a Tensor (the one input), a tuple or list of positional arguments, or a dict
            of keyword arguments.
        inputs: applied to the batch first, to pick the model's inputs out of it (for
            ``(x, y)`` batches: ``inputs=lambda b: b[0]``).

    Raises:
        MergeError: a batch of another type.
    """
    from permgraph.trace import as_args

    if inputs is not None:
        batch = inputs(batch)
    if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
        raise MergeError(
            f"cannot read a batch of type {type(batch).__name__}: pass a Tensor, a tuple of positional arguments "
            "or a dict of keyword arguments (use inputs=... to pick them out of each batch)"
        )
    return as_args(dict(batch) if isinstance(batch, Mapping) else batch)


def _to(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def _device_of(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _empty(what: str) -> MergeError:
    return MergeError(
        f"{what}: the batches yielded nothing. Pass a non-empty list of batches or a DataLoader "
        "(a generator can be iterated only once, and this needs several passes)"
    )


# -- BatchNorm reset --------------------------------------------------------------------

def reset_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    inputs: Callable[[Any], Any] | None = None,
    process_group: Any = None,
    timeout: float | timedelta | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer of ``model`` on data.

    Each ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) that tracks running
    statistics is reset, then, with ``momentum=None`` (a cumulative average over batches)
    and only the BatchNorm layers in training mode (dropout and the rest stay in eval
    mode), the batches run forward without gradients. Modes and momenta are restored
    afterwards. The model is modified in place.

    Args:
        model: the (interpolated) model.
        batches: the data (see the module docstring); a few dozen batches are plenty.
        max_batches: stop after this many batches (per rank, in a distributed run).
        inputs: picks the model's inputs out of each batch (e.g. ``lambda b: b[0]``).
        process_group: under ``torch.distributed``, each rank passes its own shard of the
            batches and every layer's cumulative averages are combined over the group
            (``None``: the default group when initialised; a ``ProcessGroup``; ``False``:
            this rank's batches only): every rank ends with the statistics of one process on
            all the batches. ``SyncBatchNorm`` layers then run as local BatchNorm layers (their
            averages are combined here, once, instead of at every batch).
        timeout: seconds each rank waits for the others (default 30 minutes).

    Returns:
        The number of BatchNorm layers reset.

    Raises:
        MergeError: the model has no BatchNorm layer that tracks running statistics, or the
            batches are empty (on every rank).
        DistributedError: in a distributed run, the ranks' models differ
            (`RankMismatchError`), another rank failed (`RankFailedError`) or did not arrive
            within ``timeout`` (`RankTimeoutError`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from permgraph.merge import reset_batchnorm
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> reset_batchnorm(net, [torch.randn(8, 3) for _ in range(4)])
        1
        >>> int(net[1].num_batches_tracked)
        4
    """
    group = _dist.resolve_group(process_group)
    step = "reset_batchnorm"
    try:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            raise MergeError(
                f"{type(model).__name__} has no BatchNorm layer with running statistics to reset; "
                "for a network without BatchNorm use repair()"
            )
        items: dict[str, Any] = {}
        if group is not None:
            items = {**_dist.model_items("model", model.state_dict()),
                     "statistics": [(n, tuple(m.running_mean.shape)) for n, m in model.named_modules() if m in norms]}
    except Exception as exc:
        _dist.agree(group, f"{step} (before the data)", failure=exc, timeout=timeout)
        raise
    _dist.agree(group, f"{step} (before the data)", items, timeout=timeout, warn_only=("model bits",))
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    device = _device_of(model)
    seen = 0
    local = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
            if local and isinstance(m, nn.SyncBatchNorm):
                # a SyncBatchNorm would all-reduce every batch (and needs a GPU to): run it as
                # the BatchNorm it is; the combination over ranks follows below
                m.forward = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, m)  # type: ignore[method-assign]
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                args, kwargs = batch_inputs(batch, inputs)
                model(*_to(args, device), **_to(kwargs, device))
                seen += 1
    except Exception as exc:
        _dist.agree(group, f"{step} (after the data)", failure=exc, timeout=timeout)
        raise
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
            if "forward" in vars(m):
                del m.forward
        for m, mode in modes.items():
            m.training = mode
    if group is not None:
        _dist.agree(group, f"{step} (after the data)", timeout=timeout)
        seen = _combine_norms(norms, seen, group, timeout)
    if seen == 0:
        raise _empty("reset_batchnorm" + (" (on every rank)" if group is not None else ""))
    return len(norms)


def _combine_norms(norms: list[nn.Module], seen: int, group: Any, timeout: float | timedelta | None) -> int:
    """Combine every rank's cumulative averages: a layer that averaged ``k_r`` batches on
    rank ``r`` gets ``Σ k_r·avg_r / Σ k_r`` (the average of all the batches' statistics),
    and ``num_batches_tracked = Σ k_r``. Returns the total number of batches."""
    sums: list[torch.Tensor] = [torch.tensor([float(seen)], dtype=torch.float64)]
    for m in norms:
        k = float(m.num_batches_tracked)
        sums += [torch.tensor([k], dtype=torch.float64, device=m.running_mean.device),
                 m.running_mean.double() * k, m.running_var.double() * k]
    _dist.all_reduce_sum(sums, group, timeout=timeout, what="reset_batchnorm (summing the statistics)")
    with torch.no_grad():
        for i, m in enumerate(norms):
            k, mean, var = sums[1 + 3 * i], sums[2 + 3 * i], sums[3 + 3 * i]
            total = float(k)
            if total > 0:
                m.running_mean.copy_(mean / total)
                m.running_var.copy_(var / total)
                m.num_batches_tracked.fill_(int(round(total)))
    return int(sums[0])


# -- REPAIR -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Affine:
    """How an op's output channels depend on its per-channel parameters:
    ``out[c] = scale_param[c] * (...) + shift_param[c]``."""

    scale: int  # argument index of the parameter whose axis 0 scales each output channel
    shift: int  # argument index of the per-channel additive parameter
    channel: Callable[[int], int]  # output ndim -> the channel dim


def _conv_channel(ndim: int) -> int:
    return 1 if ndim >= 3 else 0  # batched (N, C, ...) or unbatched (C, ...)


#: The ops whose output channels REPAIR can rescale and shift through their parameters.
AFFINE_OPS: dict[str, _Affine] = {
    "aten.linear.default": _Affine(1, 2, lambda nd: nd - 1),
    "aten.conv1d.default": _Affine(1, 2, _conv_channel),
    "aten.conv2d.default": _Affine(1, 2, _conv_channel),
    "aten.conv3d.default": _Affine(1, 2, _conv_channel),
    "aten.conv1d.padding": _Affine(1, 2, _conv_channel),
    "aten.conv2d.padding": _Affine(1, 2, _conv_channel),
    "aten.conv3d.padding": _Affine(1, 2, _conv_channel),
    "aten.batch_norm.default": _Affine(1, 2, lambda nd: 1),
    "aten._native_batch_norm_legit_no_training.default": _Affine(1, 2, lambda nd: 1),
    "aten.layer_norm.default": _Affine(2, 3, lambda nd: nd - 1),
    "aten.group_norm.default": _Affine(2, 3, lambda nd: 1),
}


@dataclass(frozen=True)
class Correction:
    """One op whose output channels `repair` corrected (or could not).

    Attributes:
        node: the fx node name in ``spec.graph``.
        op: the ATen op.
        module: the module path that called it.
        groups: the groups whose units sit on its output channels.
        keys: the state_dict keys modified (scale parameter, shift parameter).
        reason: why it was not corrected; empty when it was.
    """

    node: str
    op: str
    module: str
    groups: tuple[str, ...]
    keys: tuple[str, ...] = ()
    reason: str = ""

    def __str__(self) -> str:
        where = f"{self.module or '<root>'} ({self.op}, group{'s' if len(self.groups) > 1 else ''} {', '.join(self.groups)})"
        what = f"set {', '.join(self.keys)}" if not self.reason else self.reason
        return f"{where}: {what}"


@dataclass
class RepairReport:
    """What `repair` did.

    Attributes:
        alpha: the interpolation weight of B.
        corrected: the ops whose output channels were rescaled and shifted.
        skipped: producers of group units that could not be corrected, with the reason.
        uncovered: groups with no corrected producer (their units keep their statistics),
            with the reason.
        batches: number of batches read per model.
        std_ratio: per corrected node, the mean over its units of
            ``std_interpolated / std_target`` before the correction (below 1: the variance
            collapse REPAIR undoes).
    """

    alpha: float
    corrected: list[Correction] = field(default_factory=list)
    skipped: list[Correction] = field(default_factory=list)
    uncovered: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    std_ratio: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"REPAIR at alpha={self.alpha:g}: {len(self.corrected)} op(s) corrected over {self.batches} batches"]
        for c in self.corrected:
            ratio = self.std_ratio.get(c.node)
            lines.append(f"  {c}" + (f"  (std was {ratio:.2f}x the target)" if ratio is not None else ""))
        if self.skipped:
            lines.append(f"not corrected ({len(self.skipped)}):")
            lines += [f"  {c}" for c in self.skipped]
        if self.uncovered:
            lines.append(f"groups left as they are ({len(self.uncovered)}):")
            lines += [f"  {g}: {why}" for g, why in self.uncovered.items()]
        return "\n".join(lines)


@dataclass
class _Producer:
    node: str  # node name in spec.graph / spec.traced
    op: str
    module: str
    groups: tuple[str, ...]
    mask: torch.Tensor  # bool (channels,): the channels some group covers
    scale_key: str
    shift_key: str
    scale_keys: tuple[str, ...]
    shift_keys: tuple[str, ...]
    signature: tuple[Any, ...]  # (target, parameter keys) to find the node in another trace
    affine: _Affine


def _param_keys(traced: Any, node: torch.fx.Node) -> tuple[str, ...] | None:
    if isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in traced.params:
        return traced.params[node.name]
    return None


def _signature(traced: Any, node: torch.fx.Node) -> tuple[Any, ...]:
    keys = tuple(k[0] for a in node.all_input_nodes if (k := _param_keys(traced, a)) is not None)
    return (str(node.target), keys)


def _find_producers(spec: PermSpec) -> tuple[list[_Producer], list[Correction]]:
    """Every op of `AFFINE_OPS` whose output channels carry some group's units."""
    from permgraph.rules import op_name

    traced, graph = spec.traced, spec.graph
    gm = traced.graph_module
    nodes = list(gm.graph.nodes)
    producers: list[_Producer] = []
    skipped: list[Correction] = []
    uses: dict[str, int] = {}  # state_dict key -> how many op inputs read it (tied copies included)
    for node in nodes:
        for k in _param_keys(traced, node) or ():
            uses[k] = uses.get(k, 0) + len(node.users)
    signatures: dict[tuple[Any, ...], int] = {}
    for node in nodes:
        if node.op != "call_function":
            continue
        sig = _signature(traced, node)
        signatures[sig] = signatures.get(sig, 0) + 1
    for node in nodes:
        if node.op != "call_function":
            continue
        op = op_name(node.target)
        affine = AFFINE_OPS.get(op)
        if affine is None or node.name not in graph.nodes:
            continue
        attrs = graph.nodes[node.name]
        shape, layouts = attrs.get("shape"), attrs.get("layouts") or ()
        if shape and isinstance(shape[0], tuple):  # a tuple output: its first element is the result
            shape, layouts = shape[0], (layouts[0] if layouts else ())
        if not shape:
            continue
        ch = affine.channel(len(shape))
        if not 0 <= ch < len(layouts):
            continue
        occ = layouts[ch]
        if not occ:
            continue  # no group on the channels: nothing was aligned there
        groups = tuple(dict.fromkeys(g for g, _ in occ))
        mask = torch.zeros(shape[ch], dtype=torch.bool)
        for g, lay in occ:
            mask[lay.positions(spec[g].size).reshape(-1)] = True
        module = attrs.get("module", "")

        def skip(reason: str, node=node, op=op, module=module, groups=groups) -> None:
            skipped.append(Correction(node.name, op, module, groups, (), reason))

        args = node.args
        scale = args[affine.scale] if len(args) > affine.scale else None
        shift = args[affine.shift] if len(args) > affine.shift else None
        scale_keys = _param_keys(traced, scale)
        shift_keys = _param_keys(traced, shift)
        if scale_keys is None:
            skip("no per-channel scale parameter (weight)" if scale is None
                 else "its scale parameter is computed, not a state_dict tensor")
            continue
        if shift_keys is None:
            skip("no additive parameter (bias) to shift the mean with" if shift is None
                 else "its additive parameter is computed, not a state_dict tensor")
            continue
        if spec.shapes.get(shift_keys[0], ()) != (shape[ch],):
            skip(f"its additive parameter has shape {spec.shapes.get(shift_keys[0])}, not ({shape[ch]},)")
            continue
        if len(spec.shapes.get(scale_keys[0], ())) < 1 or spec.shapes[scale_keys[0]][0] != shape[ch]:
            skip("its scale parameter's axis 0 is not the output channel axis")
            continue
        shared = [k for k in (scale_keys[0], shift_keys[0]) if uses.get(k, 0) > 1]
        if shared:
            skip(f"{shared[0]} is also read by other ops or calls (a tied or shared parameter); "
                 "changing it would change them too")
            continue
        sig = _signature(traced, node)
        if signatures[sig] > 1:
            skip("its parameters are used by several calls of this op; one call cannot be corrected alone")
            continue
        producers.append(_Producer(
            node.name, op, module, groups, mask, scale_keys[0], shift_keys[0], scale_keys, shift_keys, sig, affine,
        ))
    # an op without a bias that feeds straight into a corrected one (a convolution before its
    # BatchNorm) needs no correction of its own: say so
    by_name = {n.name: n for n in nodes}
    corrected = {p.node: p for p in producers}
    for i, c in enumerate(skipped):
        users = list(by_name[c.node].users)
        if len(users) == 1 and users[0].name in corrected:
            nxt = corrected[users[0].name]
            skipped[i] = Correction(c.node, c.op, c.module, c.groups, (),
                                    f"{c.reason}; not needed: {nxt.op} in {nxt.module or '<root>'} right after it is corrected")
    return producers, skipped


class _Observer(torch.fx.Interpreter):
    """Runs a traced program and passes chosen nodes' outputs through hooks."""

    def __init__(self, gm: torch.fx.GraphModule, hooks: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.hooks = hooks

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        hook = self.hooks.get(n.name)
        if hook is None:
            return out
        if isinstance(out, (tuple, list)):
            return type(out)([hook(out[0]), *out[1:]])
        return hook(out)


class _Runner:
    """Runs a model's traced program on any state_dict of it, batch by batch; traces again
    (once per input shape) when the batches do not have the example input's shapes."""

    def __init__(self, model: nn.Module, spec: PermSpec, producers: list[_Producer],
                 inputs: Callable[[Any], Any] | None) -> None:
        self.model = model
        self.inputs = inputs
        self.spec = spec
        self.producers = producers
        self._cache: dict[Any, tuple[Any, dict[str, str]]] = {}

    @staticmethod
    def _shape_key(leaves: list[Any]) -> tuple[Any, ...]:
        return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("const", repr(x)) for x in leaves)

    def _program(self, args: tuple[Any, ...], kwargs: dict[str, Any], leaves: list[Any]) -> tuple[Any, dict[str, str]]:
        key = self._shape_key(leaves)
        if key in self._cache:
            return self._cache[key]
        # programs traced for other input shapes are kept with the spec's own program, so that
        # repeated calls (a curve over alphas) trace each shape once
        kept = self.spec.traced.extra.setdefault("merge.traced_by_shape", {})
        from permgraph.trace import trace

        traced = self.spec.traced
        placeholders = {n.name: n for n in traced.graph_module.graph.nodes if n.op == "placeholder"}
        example = [placeholders[n].meta.get("val") for n in traced.user_inputs]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        same = len(example) == len(tensors) and all(
            isinstance(e, torch.Tensor) and tuple(e.shape) == tuple(t.shape) and e.dtype == t.dtype
            for e, t in zip(example, tensors)
        )
        if not same:
            if key not in kept:
                kept[key] = trace(self.model, kwargs if kwargs and not args else args)
            traced = kept[key]
        by_sig: dict[tuple[Any, ...], str] = {}
        for node in traced.graph_module.graph.nodes:
            if node.op == "call_function":
                by_sig[_signature(traced, node)] = node.name
        names: dict[str, str] = {}
        for p in self.producers:
            if p.signature not in by_sig:
                raise MergeError(
                    f"REPAIR lost track of {p.op} in {p.module or '<root>'} when tracing the model on a batch "
                    f"of another shape; pass batches with the example input's shapes"
                )
            names[p.node] = by_sig[p.signature]
        self._cache[key] = (traced, names)
        return self._cache[key]

    def run(self, state: Mapping[str, torch.Tensor], batch: Any,
            hooks: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], device: torch.device | None) -> None:
        args, kwargs = batch_inputs(batch, self.inputs)
        args, kwargs = _to(args, device), _to(kwargs, device)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        traced, names = self._program(args, kwargs, leaves)
        program = traced.program
        sig = {s.arg.name: s for s in program.graph_signature.input_specs if getattr(s.arg, "name", None)}
        user = iter([x for x in leaves if isinstance(x, torch.Tensor)]
                    if len(traced.user_inputs) != len(leaves) else leaves)
        feeds = []
        for node in traced.graph_module.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in traced.params:
                feeds.append(state[traced.params[node.name][0]])
            elif node.name in traced.user_inputs:
                feeds.append(next(user))
            else:
                target = sig[node.name].target
                value = program.constants.get(target)
                if value is None:
                    value = program.state_dict.get(target)
                feeds.append(value if device is None or not isinstance(value, torch.Tensor) else value.to(device))
        renamed = {names[k]: h for k, h in hooks.items()}
        with torch.no_grad():
            _Observer(traced.graph_module, renamed).run(*feeds)


class _Stats:
    """Per-channel sums for a mean and a standard deviation, in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def add(self, y: torch.Tensor, ch: int) -> None:
        flat = y.detach().movedim(ch, -1).reshape(-1, y.shape[ch]).double()
        s, ss = flat.sum(0), flat.square().sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += flat.shape[0]

    def tensors(self, channels: int, device: torch.device | None) -> list[torch.Tensor]:
        """``[n, Σy, Σy²]`` in float64 (zeros when nothing was seen), to sum over ranks."""
        if self.s is None or self.ss is None:
            self.s = torch.zeros(channels, dtype=torch.float64, device=device)
            self.ss = torch.zeros(channels, dtype=torch.float64, device=device)
        return [torch.tensor([float(self.n)], dtype=torch.float64, device=self.s.device), self.s, self.ss]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.ss / self.n - mean.square()).clamp_min(0.0)
        return mean, var.sqrt()


def repair(
    model_a: nn.Module,
    model_b: nn.Module,
    model_interp: nn.Module,
    batches: Iterable[Any],
    spec: PermSpec,
    alpha: float,
    *,
    max_batches: int | None = None,
    inputs: Callable[[Any], Any] | None = None,
    eps: float = 1e-5,
    process_group: Any = None,
    timeout: float | timedelta | None = None,
) -> RepairReport:
    """REPAIR (Jordan et al. 2023): give every interpolated unit the interpolated statistics.

    For each op that produces group units through per-channel parameters (``AFFINE_OPS``:
    linear, convolutions, batch/layer/group norm), the mean ``μ`` and standard deviation
    ``σ`` of each output channel are measured on data in A, in B and in the interpolated
    model; the interpolated model's parameters are then changed so that each channel has
    mean ``(1-α)·μ_A + α·μ_B`` and standard deviation ``(1-α)·σ_A + α·σ_B``: with
    ``s = σ_target / σ_interp``, the scale parameter's slice of that channel (a weight row,
    a norm's weight) is multiplied by ``s`` and the shift parameter (the bias) becomes
    ``s·b + μ_target - s·μ_interp``. Nothing is inserted into the model.

    The producers are found through ``spec.graph``: an op of ``AFFINE_OPS`` whose output
    channel axis carries some group's units (channels that no group covers, such as the
    logits, keep their values). In the interpolated model the ops are corrected in one pass,
    in graph order, each seeing the already-corrected ops before it: while the data flows,
    each producer's output is normalised with the batch's statistics (as REPAIR's reference
    implementation does with BatchNorm layers in training mode), and its population
    statistics are accumulated; the parameters are then fused with those. The models run as
    traced, in eval mode: dropout off, BatchNorm on its running statistics. Attention's
    query, key and value projections are linear ops like any other: they are corrected too.

    Handled: a producer with a per-channel additive parameter (a bias, a norm's shift)
    that no other op reads. Reported and left as they are (`RepairReport.skipped`): ops
    without a bias (a convolution followed by BatchNorm: the BatchNorm after it is corrected
    instead), parameters shared with other ops or other calls (tied weights), parameters
    computed in the forward. Groups that end with no corrected producer are listed in
    `RepairReport.uncovered`.

    Args:
        model_a: endpoint A.
        model_b: endpoint B, aligned to A (same architecture).
        model_interp: the interpolated model ``(1-α)·A + α·B``; its parameters are changed
            in place.
        batches: the data (see the module docstring), iterated three times (A, B, the
            interpolated model); every batch needs at least two values per channel.
        spec: the `PermSpec` of the architecture, from `permgraph.infer` (it must carry
            its graph and traced program).
        alpha: the interpolation weight of B that ``model_interp`` was built with.
        max_batches: read at most this many batches per model (per rank, in a distributed run).
        inputs: picks the model's inputs out of each batch (e.g. ``lambda b: b[0]``).
        eps: added to the variance before dividing by a standard deviation.
        process_group: under ``torch.distributed``, each rank passes its own shard of the
            batches; the per-channel sums of A, of B and of the interpolated model are summed
            over the group (``None``: the default group when initialised; a
            ``ProcessGroup``; ``False``: this rank's batches only), so every rank sets the same
            parameters, those of one process on all the batches. `RepairReport.batches` is
            then the total over the ranks.
        timeout: seconds each rank waits for the others (default 30 minutes).

    Returns:
        A `RepairReport`: what was corrected, what was not and why.

    Raises:
        MergeError: the spec has no graph (it was rebuilt from a dict), the batches are empty
            (on every rank), a batch has a single value per channel, or ``alpha`` is not finite.
        SpecMismatchError: a model's state_dict does not match the spec.
        DistributedError: in a distributed run, the ranks' specs, models or options differ
            (`RankMismatchError`), another rank failed (`RankFailedError`) or did not arrive
            within ``timeout`` (`RankTimeoutError`).

    Examples:
        >>> import torch, permgraph
        >>> from torch import nn
        >>> from permgraph.merge import interpolate, repair
        >>> def make():
        ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> a, b, merged = make(), make(), make()
        >>> x = torch.randn(64, 4)
        >>> spec = permgraph.infer(a, x)
        >>> _ = merged.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.5))
        >>> report = repair(a, b, merged, [x], spec, 0.5)
        >>> [(c.module, c.keys) for c in report.corrected]
        [('0', ('0.weight', '0.bias'))]
    """
    group = _dist.resolve_group(process_group)
    try:
        a_ = _check_alpha(alpha)
        if spec.graph is None or spec.traced is None:
            raise MergeError(
                "repair needs the spec's graph and traced program; this spec has none (it was loaded "
                "from a dict or file). Infer it again with permgraph.infer(model, example_inputs)"
            )
        states = {}
        for what, m in (("model_a", model_a), ("model_b", model_b), ("model_interp", model_interp)):
            sd = m.state_dict()
            spec.check_state_dict(sd, f"{what}.state_dict()")
            states[what] = {k: v.detach() for k, v in sd.items()}
        producers, skipped = _find_producers(spec)
        items: dict[str, Any] = {}
        if group is not None:
            items = {"alpha": a_, "eps": float(eps), "spec": [(g.name, g.size) for g in spec.groups],
                     "statistics": [(p.node, p.mask.numel()) for p in producers]}
            for what, sd in states.items():
                items.update(_dist.model_items(what, sd))
    except Exception as exc:
        _dist.agree(group, "repair (before the data)", failure=exc, timeout=timeout)
        raise
    _dist.agree(group, "repair (before the data)", items, timeout=timeout,
                warn_only=[f"{what} bits" for what in states])
    report = RepairReport(a_, skipped=skipped)
    runner = _Runner(model_interp, spec, producers, inputs)

    def reduce(stats: Mapping[str, _Stats], seen: int, device: torch.device | None, what: str) -> int:
        """Sum the ranks' sums (after a handshake); the total number of batches."""
        if group is None:
            return seen
        _dist.agree(group, f"repair ({what}, after the data)", timeout=timeout)
        tensors = [torch.tensor([float(seen)], dtype=torch.float64)]
        for p in producers:
            tensors += stats[p.node].tensors(p.mask.numel(), device)
        _dist.all_reduce_sum(tensors, group, timeout=timeout, what=f"repair ({what}, summing the statistics)")
        for i, p in enumerate(producers):
            st = stats[p.node]
            st.n = int(round(float(tensors[1 + 3 * i])))
        return int(tensors[0])

    def guarded(fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except Exception as exc:
            _dist.agree(group, f"repair ({what}, after the data)", failure=exc, timeout=timeout)
            raise

    def measure(state: Mapping[str, torch.Tensor], device: torch.device | None, what: str) -> dict[str, _Stats]:
        stats = {p.node: _Stats() for p in producers}

        def hook(p: _Producer) -> Callable[[torch.Tensor], torch.Tensor]:
            def f(y: torch.Tensor) -> torch.Tensor:
                stats[p.node].add(y, p.affine.channel(y.ndim))
                return y
            return f

        hooks = {p.node: hook(p) for p in producers}

        def stream() -> int:
            seen = 0
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                runner.run(state, batch, hooks, device)
                seen += 1
            return seen

        seen = reduce(stats, guarded(stream, what), device, what)
        if seen == 0:
            raise _empty(f"repair ({what})" + (" (on every rank)" if group is not None else ""))
        report.batches = seen
        return stats

    if producers:
        stats_a = measure(states["model_a"], _device_of(model_a), "model_a")
        stats_b = measure(states["model_b"], _device_of(model_b), "model_b")
        target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for p in producers:
            (ma, sa), (mb, sb) = stats_a[p.node].mean_std(), stats_b[p.node].mean_std()
            target[p.node] = ((1 - a_) * ma + a_ * mb, (1 - a_) * sa + a_ * sb)

        stats_i = {p.node: _Stats() for p in producers}

        def correcting(p: _Producer) -> Callable[[torch.Tensor], torch.Tensor]:
            def f(y: torch.Tensor) -> torch.Tensor:
                ch = p.affine.channel(y.ndim)
                stats_i[p.node].add(y, ch)
                moved = y.movedim(ch, -1)
                flat = moved.reshape(-1, y.shape[ch])
                if flat.shape[0] < 2:
                    raise MergeError(
                        f"a batch gives {flat.shape[0]} value per channel at {p.op} in {p.module or '<root>'}; "
                        "REPAIR needs batches of at least two samples"
                    )
                mean = flat.mean(0)
                std = flat.var(0, unbiased=False).add(eps).sqrt()
                mu_t, sd_t = (t.to(y.dtype) for t in target[p.node])
                m = p.mask.to(y.device)
                fixed = torch.where(m, (moved - mean) / std * sd_t + mu_t, moved)
                return fixed.movedim(-1, ch)
            return f

        interp = states["model_interp"]
        hooks = {p.node: correcting(p) for p in producers}

        def stream_interp() -> int:
            seen = 0
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                runner.run(interp, batch, hooks, _device_of(model_interp))
                seen += 1
            return seen

        seen = reduce(stats_i, guarded(stream_interp, "model_interp"), _device_of(model_interp), "model_interp")
        if seen == 0:
            raise _empty("repair (model_interp)" + (" (on every rank)" if group is not None else ""))

        new: dict[str, torch.Tensor] = {}
        for p in producers:
            mu_i, sd_i = stats_i[p.node].mean_std()
            mu_t, sd_t = target[p.node]
            s = sd_t / (sd_i.square() + eps).sqrt()
            shift = mu_t - s * mu_i
            keep = ~p.mask.to(s.device)
            s = torch.where(keep, torch.ones_like(s), s)
            shift = torch.where(keep, torch.zeros_like(shift), shift)
            covered = p.mask.to(s.device)
            report.std_ratio[p.node] = float((sd_i[covered] / sd_t[covered].clamp_min(1e-12)).mean())
            keys: list[str] = []
            w = interp[p.scale_key]
            new[p.scale_key] = (w.double() * s.reshape(-1, *([1] * (w.ndim - 1)))).to(w.dtype)
            keys.append(p.scale_key)
            b = interp[p.shift_key]
            new[p.shift_key] = (b.double() * s + shift).to(b.dtype)
            keys.append(p.shift_key)
            report.corrected.append(Correction(p.node, p.op, p.module, p.groups, tuple(keys)))
        # tied keys name one tensor: write the new value under each of them
        full = dict(interp)
        for p in producers:
            for k in p.scale_keys:
                full[k] = new[p.scale_key]
            for k in p.shift_keys:
                full[k] = new[p.shift_key]
        with torch.no_grad():
            model_interp.load_state_dict(full)

    done = {g for c in report.corrected for g in c.groups}
    for g in spec.groups:
        if g.name in done:
            continue
        reasons = [c.reason for c in report.skipped if g.name in c.groups]
        report.uncovered[g.name] = ("; ".join(dict.fromkeys(reasons)) if reasons
                                    else "no op with per-channel scale and shift parameters (linear, convolution, "
                                         "batch/layer/group norm) writes its units")
    return report
