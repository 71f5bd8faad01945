"""REPAIR (Jordan et al. 2023): give every interpolated unit the interpolated statistics.

Interpolating two aligned networks shrinks the spread of their hidden units; `repair`
rescales and shifts every interpolated unit so that its mean and standard deviation on data
equal the interpolation of the endpoints'. It is generic over a `PermSpec`: the units it
corrects are the groups' units, found through the graph of the spec's analysis (a spec read
back with `PermSpec.from_dict` gets the model's, from `permgraph.runner`), and the models
run through `permgraph.runner` with a hook on each corrected op.

Batches and data parallelism: as in `permgraph.merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from permgraph import distributed as _dist
from permgraph.errors import MergeError
from permgraph.merge import check_alpha, no_batches
from permgraph.runner import check_unsliced, device_of, runner_for
from permgraph.spec import PermSpec

__all__ = ["repair", "RepairReport", "Correction", "AFFINE_OPS"]


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
        node: the fx node name in the graph of the spec's analysis.
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
    node: str  # node name in the analysis graph
    op: str
    module: str
    groups: tuple[str, ...]
    mask: torch.Tensor  # bool (channels,): the channels some group covers
    scale_key: str
    shift_key: str
    scale_keys: tuple[str, ...]
    shift_keys: tuple[str, ...]
    affine: _Affine


def _param_keys(traced: Any, node: torch.fx.Node) -> tuple[str, ...] | None:
    if isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in traced.params:
        return traced.params[node.name]
    return None


def _call_key(traced: Any, node: torch.fx.Node) -> tuple[Any, ...]:
    """An op call's target and parameter keys: two calls with one key share parameters."""
    keys = tuple(k[0] for a in node.all_input_nodes if (k := _param_keys(traced, a)) is not None)
    return (str(node.target), keys)


def _find_producers(spec: PermSpec, analysis: Any) -> tuple[list[_Producer], list[Correction]]:
    """Every op of `AFFINE_OPS` whose output channels carry some group's units."""
    from permgraph.rules import op_name

    traced, graph = analysis.traced, analysis.graph
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
        sig = _call_key(traced, node)
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
        sig = _call_key(traced, node)
        if signatures[sig] > 1:
            skip("its parameters are used by several calls of this op; one call cannot be corrected alone")
            continue
        producers.append(_Producer(
            node.name, op, module, groups, mask, scale_keys[0], shift_keys[0], scale_keys, shift_keys, affine,
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

    The producers are found through the graph of the spec's analysis: an op of ``AFFINE_OPS`` whose output
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
        spec: the `PermSpec` of the architecture: from `permgraph.infer`, or read back with
            `PermSpec.from_dict` (then ``model_interp`` is analysed on the first batch).
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
        MergeError: the batches are empty (on every rank), a batch has a single value per channel, or ``alpha`` is not finite.
        SpecMismatchError: a model's state_dict does not match the spec (or a group of a spec
            without an analysis is not one of the model's).
        UntraceableModelError: the spec has no analysis and the model cannot be exported whole.
        DistributedError: in a distributed run, the ranks' specs, models or options differ
            (`RankMismatchError`), another rank failed (`RankFailedError`) or did not arrive
            within ``timeout`` (`RankTimeoutError`).

    Examples:
        >>> import torch, permgraph
        >>> from torch import nn
        >>> from permgraph import interpolate, repair
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
        a_ = check_alpha(alpha)
        check_unsliced(spec, "repair", MergeError)
        states = {}
        for what, m in (("model_a", model_a), ("model_b", model_b), ("model_interp", model_interp)):
            sd = m.state_dict()
            spec.check_state_dict(sd, f"{what}.state_dict()")
            states[what] = {k: v.detach() for k, v in sd.items()}
        runner = runner_for(model_interp)
        analysis, batches = runner.analysis(spec, model_interp, batches, inputs, MergeError)
        producers, skipped = _find_producers(spec, analysis)
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

    def stream(model: nn.Module, what: str, hooks: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
               stats: Mapping[str, _Stats]) -> int:
        """Run the batches through ``model`` with ``hooks``; sum the ranks' ``stats`` (after
        a handshake); the total number of batches."""
        state, device = states[what], device_of(model)
        seen = 0
        try:
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                flat, canonical = runner.flatten(analysis, batch, inputs, MergeError)
                traced = runner.program(analysis, model_interp, flat, canonical, hooks, MergeError)
                runner.run(traced, model, state, flat, hooks, MergeError)
                seen += 1
        except Exception as exc:
            _dist.agree(group, f"repair ({what}, after the data)", failure=exc, timeout=timeout)
            raise
        if group is not None:
            _dist.agree(group, f"repair ({what}, after the data)", timeout=timeout)
            tensors = [torch.tensor([float(seen)], dtype=torch.float64)]
            for p in producers:
                tensors += stats[p.node].tensors(p.mask.numel(), device)
            _dist.all_reduce_sum(tensors, group, timeout=timeout, what=f"repair ({what}, summing the statistics)")
            for i, p in enumerate(producers):
                stats[p.node].n = int(round(float(tensors[1 + 3 * i])))
            seen = int(tensors[0])
        if seen == 0:
            raise no_batches(f"repair ({what})" + (" (on every rank)" if group is not None else ""))
        return seen

    def measure(model: nn.Module, what: str) -> dict[str, _Stats]:
        stats = {p.node: _Stats() for p in producers}

        def hook(p: _Producer) -> Callable[[torch.Tensor], torch.Tensor]:
            def f(y: torch.Tensor) -> torch.Tensor:
                stats[p.node].add(y, p.affine.channel(y.ndim))
                return y
            return f

        report.batches = stream(model, what, {p.node: hook(p) for p in producers}, stats)
        return stats

    if producers:
        stats_a = measure(model_a, "model_a")
        stats_b = measure(model_b, "model_b")
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
        stream(model_interp, "model_interp", {p.node: correcting(p) for p in producers}, stats_i)

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

