"""Shared pieces of the matchers that learn from a loss (Sinkhorn, STE, gradient matching):
argument checks, the ``(inputs, targets)`` batches, and the loss of a model at given weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from permgraph.errors import MatchError

__all__ = ["positive_int", "positive_float", "Batches", "check_batch", "call", "batch_loss", "midpoint",
           "default_loss"]


def positive_int(value: Any, what: str) -> int:
    """``value`` if it is an int >= 1; :class:`MatchError` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MatchError(f"{what} must be a positive int, got {value!r}")
    return value


def positive_float(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite number > 0; :class:`MatchError` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MatchError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def check_batch(batch: Any) -> tuple[Any, Any]:
    """``batch`` as an ``(inputs, targets)`` pair; :class:`MatchError` if it is not one."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise MatchError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    return batch[0], batch[1]


class Batches:
    """Cycles over a re-iterable of ``(inputs, targets)`` batches moved to ``device``; counts passes."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        if batches is None or isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
            raise MatchError(
                "batches must be a re-iterable of (inputs, targets) pairs, such as a list or a DataLoader, "
                f"got {type(batches).__name__}"
            )
        self.batches = batches
        self.device = device
        self.it: Iterator[Any] = iter(batches)
        self.epochs = 0
        self.seen = 0

    def __iter__(self) -> Iterator[Any]:  # one pass
        for batch in self.batches:
            self.seen += 1
            yield self._check(batch)

    def _check(self, batch: Any) -> Any:
        check_batch(batch)
        return _to(batch, self.device)

    def next(self) -> Any:
        """The next batch; a new pass starts (and ``epochs`` counts it) when one ends."""
        try:
            batch = next(self.it)
            self.seen += 1
            return self._check(batch)
        except StopIteration:
            self.it = iter(self.batches)
            self.epochs += 1
            try:
                batch = next(self.it)
            except StopIteration:
                msg = "batches could not be iterated again" if self.seen else "batches is empty"
                raise MatchError(f"{msg}: pass a re-iterable of (inputs, targets) pairs (a list or a DataLoader)") from None
            return self._check(batch)


def call(model: torch.nn.Module, params: Mapping[str, torch.Tensor] | None, inputs: Any) -> Any:
    """``model`` on ``inputs`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments), with ``params`` in place of its state (``torch.func.functional_call``; None:
    its own)."""
    if isinstance(inputs, Mapping):
        args: tuple[Any, ...] = ()
        kwargs = dict(inputs)
    else:
        args, kwargs = (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}
    if params is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, dict(params), args, kwargs, tie_weights=False)


def batch_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor], batch: Any,
               loss_fn: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
    """``loss_fn`` of ``model`` at ``params`` on one ``(inputs, targets)`` batch."""
    inputs, targets = batch
    return loss_fn(call(model, params, inputs), targets)


def midpoint(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``0.5 * (A + B)`` for floating tensors; A's value for the others (counters)."""
    return {k: 0.5 * (a + state_b[k]) if a.is_floating_point() else a for k, a in state_a.items()}


def default_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy, the default ``loss_fn`` of the matchers."""
    return torch.nn.functional.cross_entropy(outputs, targets)
