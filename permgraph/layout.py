"""Where a group's units sit along one axis (`Layout`), and how the permutations of the
groups sharing an axis compose into one gather index (`compose_index`); the slice a member
with an ``at`` covers (`at_slice`, `at_axis`).

Both are plain data and arithmetic on positions: the spec, the matchers and the file
functions import them from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["Layout", "compose_index", "at_slice", "at_axis"]


@dataclass(frozen=True)
class Layout:
    """Where a group's units sit along one axis (see `permgraph.spec`).

    Unit ``u`` occupies positions ``offset + Σ_k r_k * stride_k + u * block + j`` for
    ``j < block`` and every repeat index ``r_k < count_k``.
    """

    offset: int = 0
    block: int = 1
    repeats: tuple[tuple[int, int], ...] = ()  # (count, stride) pairs, outermost first

    def positions(self, n: int) -> torch.Tensor:
        """Axis positions as an int64 tensor of shape ``(*counts, n, block)``."""
        pos = torch.arange(n).mul_(self.block).unsqueeze(-1) + torch.arange(self.block)
        for count, stride in reversed(self.repeats):
            pos = (torch.arange(count) * stride).view(count, *([1] * pos.ndim)) + pos
        return pos + self.offset

    def span(self, n: int) -> int:
        """One past the largest position used."""
        last = self.offset + (n - 1) * self.block + self.block - 1
        return last + sum((c - 1) * s for c, s in self.repeats) + 1

    def __str__(self) -> str:
        parts = []
        if self.offset:
            parts.append(f"offset {self.offset}")
        if self.block != 1:
            parts.append(f"blocks of {self.block}")
        for c, s in self.repeats:
            parts.append(f"x{c} every {s}")
        return ", ".join(parts) or "whole axis"


def compose_index(size: int, parts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """The gather index along one axis of several commuting groups' permutations.

    Args:
        size: the axis length.
        parts: ``(positions, perm)`` pairs, positions of shape ``(*counts, n, block)`` (from
            `Layout.positions`), ``perm[u]`` the old unit that new unit ``u`` takes, applied in order.

    Returns:
        The int64 index ``idx`` (None when ``parts`` is empty): ``t.index_select(axis, idx)``
        applies every part.

    Examples:
        >>> compose_index(4, [(Layout().positions(2), torch.tensor([1, 0]))]).tolist()
        [1, 0, 2, 3]
    """
    idx = None
    for pos, p in parts:
        if idx is None:
            idx = torch.arange(size)
        src = pos.index_select(-2, p.to(pos.device).long())
        idx[pos.reshape(-1)] = idx[src.reshape(-1)]
    return idx


def at_slice(t: torch.Tensor, at: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The view of ``t`` where each axis of ``at`` (``(axis, index)`` pairs, sorted by axis:
    `permgraph.spec.Member` ``at``) takes its index; its axes are numbered by `at_axis`."""
    for a, i in reversed(at):  # the last axis first: the earlier ones keep their number
        t = t.select(a, i)
    return t


def at_axis(axis: int, at: tuple[tuple[int, int], ...]) -> int:
    """Axis ``axis`` of a tensor as numbered in its slice `at_slice` (``axis`` not in ``at``)."""
    return axis - sum(a < axis for a, _ in at)
