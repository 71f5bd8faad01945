"""``align``: infer the groups, match, and return B's aligned state_dict in one call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from permgraph.errors import PermGraphError

__all__ = ["align"]


def align(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    example_inputs: Any,
    *,
    method: str = "weight",
    batches: Iterable[Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Align ``model_b`` to ``model_a``.

    Args:
        model_a: the reference model.
        model_b: the model to permute; same architecture as ``model_a``.
        example_inputs: as for `permgraph.infer`.
        method: ``"weight"`` (weight matching) or ``"activation"`` (activation matching,
            which needs ``batches``).
        batches: data for activation matching (each batch as ``example_inputs``).
        seed: seed of weight matching's visiting order.
        progress: show progress bars.

    Returns:
        ``(aligned_state_b, perm)``: B's state_dict permuted to line up with A, and the
        permutation (group name -> int64 indices) that `PermSpec.apply` used.

    Raises:
        PermGraphError: an unknown method, or activation matching without batches (and the
            errors of `permgraph.infer` and the matchers).

    Examples:
        >>> import torch, permgraph
        >>> torch.manual_seed(0) and None
        >>> make = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> a, b = make(), make()
        >>> aligned, perm = permgraph.align(a, b, torch.randn(3, 4))
        >>> sorted(perm), aligned["0.weight"].shape
        (['0'], torch.Size([8, 4]))
    """
    from permgraph.analysis import infer
    from permgraph.match import activation_matching, weight_matching

    if method not in ("weight", "activation"):
        raise PermGraphError(f"method must be 'weight' or 'activation', got {method!r}")
    spec = infer(model_a, example_inputs)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if method == "weight":
        perm = weight_matching(spec, state_a, state_b, seed=seed, progress=progress)
    else:
        if batches is None:
            raise PermGraphError("activation matching needs data: pass batches=[...] (each batch like example_inputs)")
        perm = activation_matching(spec, model_a, model_b, batches, progress=progress)
    return spec.apply(perm, state_b), perm
