"""Merging two aligned models: linear interpolation, BatchNorm statistics reset and REPAIR.

Interpolating two networks, even aligned ones, shrinks the spread of their hidden units:
the average of two unit activations that are not perfectly correlated has a smaller
variance than either. Two corrections undo that collapse:

- `reset_batchnorm`: a network with BatchNorm recomputes its running statistics on data
  (the interpolated running statistics are not the statistics of the interpolated network).
- `repair` (Jordan et al. 2023, *REPAIR*, in `permgraph.repairing`): every interpolated unit
  is rescaled and shifted so that its mean and standard deviation on data equal the
  interpolation of the endpoints' (``(1-α)·stat_A + α·stat_B``). It works without BatchNorm,
  and is generic over a `PermSpec`: the units it corrects are the groups' units.

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
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from permgraph import distributed as _dist
from permgraph.errors import (
    MergeError,
    SpecMismatchError,
)
from permgraph.runner import batch_inputs, device_of, to_device

__all__ = ["MergeError", "interpolate", "reset_batchnorm", "batch_inputs", "check_alpha", "no_batches"]


def __getattr__(name: str) -> Any:
    """REPAIR lives in `permgraph.repairing`; its names are still importable from here."""
    if name in ("repair", "RepairReport", "Correction", "AFFINE_OPS"):
        from permgraph import repairing

        return getattr(repairing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- interpolation ---------------------------------------------------------------------

def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float; `MergeError` unless it is a finite number."""
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
    a_ = check_alpha(alpha)
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

def no_batches(what: str) -> MergeError:
    """The error of a merge step whose batches yielded nothing."""
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
    device = device_of(model)
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
                model(*to_device(args, device), **to_device(kwargs, device))
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
        raise no_batches("reset_batchnorm" + (" (on every rank)" if group is not None else ""))
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
