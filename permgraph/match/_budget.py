"""What weight matching keeps from visit to visit within its memory budget, and how it
reads the two models (possibly lazily, one tensor at a time)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Budget", "Weights", "held_bytes"]


class Budget:
    """What weight matching keeps from visit to visit, within ``max_bytes``.

    Entries are similarity matrices (costly: a GEMM per member to rebuild) and *cheap* ones
    (A's member matrices in the compute dtype: a gather to rebuild). When the total passes
    the budget, cheap entries go first (least recently used first), then the similarities
    worth least: the fewest flops to rebuild per byte kept, a newcomer losing ties. (Least
    recently used would be the worst choice for similarities: the groups are visited in
    cycles, so it drops each one just before its next visit.) An entry that is a view of a
    caller's tensor costs nothing.
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.max = max_bytes
        self.cheap: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.costly: dict[Any, tuple[Any, int, float]] = {}
        self.total = 0
        self.peak = 0
        self.evictions = 0

    def get(self, key: Any, cheap: bool) -> Any:
        if not cheap:
            hit = self.costly.get(key)
            return None if hit is None else hit[0]
        hit = self.cheap.get(key)
        if hit is None:
            return None
        self.cheap.move_to_end(key)
        return hit[0]

    def pop(self, key: Any, cheap: bool) -> Any:
        """Take an entry out (the caller works on it and puts it back)."""
        hit = (self.cheap if cheap else self.costly).pop(key, None)
        if hit is None:
            return None
        self.total -= hit[1]
        return hit[0]

    def put(self, key: Any, value: Any, cost: int, cheap: bool, worth: float = 0.0) -> None:
        """Keep ``value`` (``worth``: rebuild flops per byte, for a costly entry) if the
        budget allows, dropping others to make room."""
        if self.max is not None and cost > self.max:
            return
        if cheap:
            self.cheap[key] = (value, cost)
        else:
            self.costly[key] = (value, cost, worth)
        self.total += cost
        while self.max is not None and self.total > self.max:
            old = next((k for k in self.cheap if k != key), None)
            if old is not None:
                self.total -= self.cheap.pop(old)[1]
            elif cheap:
                break  # only the newcomer and costly entries are left: keep those
            else:
                victim = min(self.costly, key=lambda k: (self.costly[k][2], k != key))
                self.total -= self.costly.pop(victim)[1]
            self.evictions += 1
        self.peak = max(self.peak, self.total)


def held_bytes(t: torch.Tensor, owner: torch.Tensor | None) -> int:
    """Bytes that keeping ``t`` holds beyond the caller's own tensor ``owner``."""
    if owner is not None and t.device == owner.device and (
            t.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()):
        return 0
    return t.untyped_storage().nbytes()


class Weights:
    """One model's member tensors, read from its state_dict (possibly lazily, e.g. from a
    memory-mapped checkpoint) one at a time. Gathers run on the stored tensor in its stored
    dtype (exact), and only the gathered piece is converted to the compute dtype and moved to
    the compute device, so a tensor is never copied whole in a wider dtype."""

    def __init__(self, state: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], device: torch.device) -> None:
        self.state = state
        self.dtypes = dtypes
        self.device = device

    def raw(self, key: str) -> torch.Tensor:
        return self.state[key].detach()

    def compute(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A piece of ``key``'s tensor in the compute dtype on the compute device."""
        return t.to(device=self.device, dtype=self.dtypes[key])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.compute(key, self.raw(key))
