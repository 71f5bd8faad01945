"""``align``: infer the spec, match, and return B's aligned weights, in one call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from permgraph.match._common import MatchError

__all__ = ["align"]


def align(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    example_inputs: Any,
    *,
    method: str = "weight",
    batches: Iterable[Any] | None = None,
    seed: int = 0,
    lap: str = "auto",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Align ``model_b`` to ``model_a``: infer the spec, match, permute B's state_dict.

    Args:
        model_a: the reference model.
        model_b: the model to align (same architecture); it is not modified.
        example_inputs: inputs to trace ``model_a`` with (a Tensor, a tuple of positional
            arguments or a dict of keyword arguments).
        method: ``"weight"`` (:func:`~permgraph.match.weight_matching`) or ``"activation"``
            (:func:`~permgraph.match.activation_matching`, which needs ``batches``).
        batches: the data for activation matching.
        seed: the visiting order of weight matching.
        lap: the LAP backend.
        progress: show progress bars.

    Returns:
        ``(state_dict, perm)``: B's state_dict aligned to A, and the permutation that did it.

    Raises:
        MatchError: an unknown ``method``, or activation matching without ``batches``.
        TraceError: ``model_a`` cannot be traced on ``example_inputs``.
        SpecMismatchError: ``model_b`` is not of ``model_a``'s architecture.

    Example:
        >>> import torch
        >>> from permgraph.match import align
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> make = lambda: torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> a, b = make(), make()
        >>> aligned, perm = align(a, b, torch.randn(2, 4))
        >>> sorted(perm), aligned["0.weight"].shape
        (['0'], torch.Size([16, 4]))
    """
    from permgraph.analysis import infer
    from permgraph.match.activation import activation_matching
    from permgraph.match.weight import weight_matching

    if method not in ("weight", "activation"):
        raise MatchError(f"unknown method {method!r}; choose 'weight' or 'activation'")
    if method == "activation" and batches is None:
        raise MatchError("method='activation' needs batches: an iterable of inputs to run both models on")
    spec = infer(model_a, example_inputs)
    state_b = model_b.state_dict()
    if method == "weight":
        perm = weight_matching(spec, model_a.state_dict(), state_b, seed=seed, lap=lap, progress=progress)
    else:
        assert batches is not None
        perm = activation_matching(spec, model_a, model_b, batches, lap=lap, progress=progress)
    return spec.apply(perm, state_b), perm
