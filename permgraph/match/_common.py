"""Shared pieces of the matchers: argument errors, input validation, layout gathers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from permgraph.errors import (
    MatchError,
    SpecMismatchError,
)
from permgraph.layout import compose_index
from permgraph.spec import PermSpec

__all__ = ["MatchError", "check_spec", "check_finite", "gather_units", "compose_index", "LayoutInfo", "nested_positions"]

# compose_index lives in permgraph.layout (the spec uses it too); it is re-exported here for the matchers


def check_spec(spec: Any, what: str = "spec") -> PermSpec:
    """Raise :class:`MatchError` unless ``spec`` is a :class:`PermSpec`."""
    if not isinstance(spec, PermSpec):
        raise MatchError(f"{what} must be a PermSpec from permgraph.infer(model, example_inputs), got {type(spec).__name__}")
    return spec


def check_finite(state: Mapping[str, torch.Tensor], keys: Any, what: str) -> None:
    """Raise :class:`SpecMismatchError` naming the first tensor of ``keys`` with a NaN or inf.

    Args:
        state: the state_dict.
        keys: the keys to check (the tensors a matcher reads).
        what: how to call the state_dict in the message (``"state_a"``).
    """
    for key in keys:
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise SpecMismatchError(f"{what}[{key!r}] is a {type(t).__name__}, not a tensor")
        # a sum is finite when every element is (one fast pass); only a non-finite sum
        # (a NaN/inf, or an overflow) needs the exact check
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t.sum())):
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            if nan or inf:
                raise SpecMismatchError(
                    f"{what}[{key!r}] has non-finite values ({nan} NaN, {inf} inf of {t.numel()}); "
                    "matching needs finite weights: check the checkpoint (a diverged run?)"
                )


class LayoutInfo:
    """A member's unit positions along its axis, precomputed for gathers.

    Attributes:
        pos: int64 positions, shape ``(*counts, n, block)``.
        flat: ``pos`` flattened.
        counts: the repeat counts.
        n: number of units.
        block: positions per unit and repeat.
        whole: True when the units cover the whole axis in order (no gather needed).
    """

    def __init__(self, pos: torch.Tensor, axis_size: int) -> None:
        self.pos = pos
        self.flat = pos.reshape(-1)
        self.counts = tuple(pos.shape[:-2])
        self.n = int(pos.shape[-2])
        self.block = int(pos.shape[-1])
        self.whole = not self.counts and self.block == 1 and self.n == axis_size and bool(
            torch.equal(self.flat, torch.arange(axis_size))
        )


def gather_units(
    t: torch.Tensor,
    axis: int,
    lay: LayoutInfo,
    index: torch.Tensor | None = None,
    gathers: Sequence[tuple[int, torch.Tensor | None]] = (),
) -> torch.Tensor:
    """The ``(n, rest)`` matrix of a member: unit ``u``'s row holds every value of ``t`` at
    the unit's positions along ``axis`` (all repeats and block positions, every other axis).

    Args:
        t: the tensor.
        axis: the member axis.
        lay: the member layout.
        index: when given, the axis is first gathered by ``index`` (other groups'
            permutation of the same axis); position ``q`` then reads ``t[index[q]]``.
        gathers: ``(other axis, index)`` gathers applied first, in order (put the ones that
            shrink the tensor first); a None index is skipped.

    Returns:
        A contiguous ``(n, rest)`` matrix (a view of ``t`` when nothing needs gathering or
        moving). The gathers run on ``t``'s own layout (a gather from a strided view is
        several times slower), the move to the front last.
    """
    m = t
    for ax, idx in gathers:
        if idx is not None:
            m = m.index_select(ax, idx.to(m.device))
    if index is not None or not lay.whole:
        src = lay.flat if index is None else index.index_select(0, lay.flat)
        m = m.index_select(axis, src.to(m.device))
    if axis:
        m = m.movedim(axis, 0)
    if lay.counts or lay.block > 1:
        m = m.reshape(*lay.counts, lay.n, lay.block, *m.shape[1:]).movedim(len(lay.counts), 0)
    return m.reshape(lay.n, -1)


def nested_positions(pos_outer: torch.Tensor, pos_inner: torch.Tensor, axis_size: int) -> torch.Tensor | None:
    """Where each inner unit sits inside each outer block, or None if the inner group is
    not nested in the outer one.

    Args:
        pos_outer: outer positions ``(*counts, n, block)``.
        pos_inner: inner positions ``(*counts', m, 1)``.
        axis_size: the axis length.

    Returns:
        ``(*counts, n, m)`` positions: entry ``[..., i, u]`` is where inner unit ``u`` sits in
        outer unit ``i``'s block; None unless every block holds each inner unit exactly once.
    """
    m = pos_inner.shape[-2]
    if pos_inner.shape[-1] != 1 or pos_outer.shape[-1] != m or m < 2:
        return None
    unit = torch.full((axis_size,), -1, dtype=torch.int64)
    unit[pos_inner.reshape(-1)] = torch.arange(m).view(m, 1).expand(pos_inner.shape).reshape(-1)
    units = unit[pos_outer]  # (*counts, n, m): the inner unit at each block position
    if bool((units < 0).any()):
        return None
    ordered, order = torch.sort(units, dim=-1)
    if not torch.equal(ordered, torch.arange(m).expand_as(ordered)):
        return None
    return pos_outer.gather(-1, order)


def partitioned_positions(pos_outer: torch.Tensor, parts: list[tuple[int, torch.Tensor]],
                          axis_size: int) -> tuple[tuple[int, ...], torch.Tensor] | None:
    """Which group lies in each outer block, and where its units sit there, or None unless
    every block is exactly the positions of one group of its own (a within-head group per
    head), each of whose units sits once in every repeat of the block.

    Args:
        pos_outer: outer positions ``(*counts, n, block)``.
        parts: ``(group, positions (*counts', m, 1))`` of the other groups on the axis.
        axis_size: the axis length.

    Returns:
        ``(groups, positions)``: ``groups[i]`` the group in block ``i``; ``positions``
        ``(*counts, n, block)``, entry ``[..., i, u]`` where unit ``u`` of ``groups[i]`` sits.
    """
    n, block = pos_outer.shape[-2], pos_outer.shape[-1]
    if n < 2 or block < 2:
        return None
    owner = torch.full((axis_size,), -1, dtype=torch.int64)
    unit = torch.full((axis_size,), -1, dtype=torch.int64)
    counts = []
    for k, (_, pos) in enumerate(parts):
        flat = pos.reshape(-1)
        counts.append(flat.numel())
        if pos.shape[-1] != 1 or pos.shape[-2] != block:
            continue
        if bool((owner[flat] >= 0).any()):
            return None  # two groups on one position: not a partition
        owner[flat] = k
        unit[flat] = torch.arange(block).view(block, 1).expand(pos.shape).reshape(-1)
    own = owner[pos_outer].movedim(-2, 0).reshape(n, -1)  # the group at each position of each block
    first = own[:, 0]
    if bool((first < 0).any()) or not bool((own == first.unsqueeze(1)).all()) or len(set(first.tolist())) < n:
        return None
    if any(counts[int(k)] != own.shape[1] for k in first):
        return None  # a group reaching outside its block
    units = unit[pos_outer]
    ordered, order = torch.sort(units, dim=-1)
    if not torch.equal(ordered, torch.arange(block).expand_as(ordered)):
        return None
    return tuple(parts[int(k)][0] for k in first), pos_outer.gather(-1, order)
