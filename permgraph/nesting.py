"""Groups that do not commute: inverse and composition through the positions they move.

Most groups on one axis commute: they permute disjoint segments or independent factors, so
a permutation of the model is a permutation per group, inverted and composed group by group.
Per-head groups (``infer(..., heads="independent")``) do not commute with the group that
moves whole heads: moving heads, then permuting the units inside head 0, is not permuting
inside head 0, then moving heads. `PermSpec.apply` applies the groups of an axis in spec
order; a spec is *nested* when, on every axis, each group's units (as sets of positions) are
kept by every group after it (outer groups first: heads, then the units in each head). Then
any product of the groups' permutations decomposes back into one permutation per group,
read off outer group first, and inverse and composition are exact. Members on one slice of
a tensor (``Member.at``) form an axis of their own: the slice's axis.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch

from permgraph.spec import Member

__all__ = ["is_nested", "decompose", "inverse", "compose", "order_problem"]

_CACHE: dict[int, tuple[weakref.ref, bool]] = {}


Axis = tuple[str, int, tuple[tuple[int, int], ...]]  # (key, axis, at): an axis of a tensor or of one slice


def _by_axis(spec) -> dict[Axis, list[tuple[int, torch.Tensor]]]:
    out: dict[Axis, list[tuple[int, torch.Tensor]]] = {}
    for gi, g in enumerate(spec.groups):
        for m in g.members:
            out.setdefault((m.key, m.axis, m.at), []).append((gi, m.layout.positions(g.size)))
    return out


def _index(n: int, parts: list[tuple[int, torch.Tensor]], perm: list[torch.Tensor]) -> torch.Tensor:
    idx = torch.arange(n)
    for gi, pos in parts:
        src = pos.index_select(-2, perm[gi])
        idx[pos.reshape(-1)] = idx[src.reshape(-1)]
    return idx


def decompose(n: int, parts: list[tuple[int, torch.Tensor]], total: torch.Tensor) -> dict[int, torch.Tensor] | None:
    """The permutation of each group in ``parts`` (spec order) whose product along an axis of
    ``n`` positions is the gather index ``total``; None if ``total`` is no such product."""
    total = total.clone()
    out: dict[int, torch.Tensor] = {}
    for gi, pos in parts:
        units = pos.shape[-2]
        unit_of = torch.full((n,), -1, dtype=torch.int64)
        unit_of[pos.reshape(-1)] = torch.arange(units).view(units, 1).expand(pos.shape).reshape(-1)
        first = pos.movedim(-2, 0).reshape(units, -1)[:, 0]
        p = unit_of[total[first]]
        if bool((p < 0).any()) or torch.unique(p).numel() != units:
            return None
        undo = torch.arange(n)
        undo[pos.index_select(-2, p).reshape(-1)] = pos.reshape(-1)
        total = undo[total]
        out[gi] = p
    if not torch.equal(total, torch.arange(n)):
        return None
    return out


def is_nested(spec) -> bool:
    """Whether some axis holds groups that share positions (heads and the units within them),
    so that inverse and composition go through `decompose`; checked once per spec object.
    (Groups that share positions and commute, like heads and units shared by every head,
    decompose too, to the same result as group by group.)"""
    hit = _CACHE.get(id(spec))
    if hit is not None and hit[0]() is spec:
        return hit[1]
    found = False
    for (key, axis, _), parts in _by_axis(spec).items():
        if len(parts) > 1:
            count = torch.zeros(spec.shapes[key][axis], dtype=torch.int64)
            for _, pos in parts:
                count.index_add_(0, pos.reshape(-1), torch.ones(pos.numel(), dtype=torch.int64))
            if bool((count > 1).any()):
                found = True
                break
    _CACHE[id(spec)] = (weakref.ref(spec), found)
    return found


def _rebuild(spec, totals: Mapping[Axis, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    from permgraph.errors import PermutationError

    axes = _by_axis(spec)
    out: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        if g.name in out:
            continue
        m = g.members[0]
        where = (m.key, m.axis, m.at)
        got = decompose(spec.shapes[m.key][m.axis], axes[where], totals[where])
        if got is None:
            raise PermutationError(f"{what}: the groups on {Member(m.key, m.axis, at=m.at)} are not nested (outer groups first); "
                                   "run spec.lint() to see which")
        for gj, p in got.items():
            out.setdefault(spec.groups[gj].name, p)
    return out


def _totals(spec, fn) -> dict[Axis, torch.Tensor]:
    firsts = (g.members[0] for g in spec.groups)
    return {(m.key, m.axis, m.at): fn(m.key, m.axis, m.at) for m in firsts}


def inverse(spec, perm: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``q`` with ``apply(q, apply(perm, sd)) == sd`` for a nested spec."""
    def total(key, axis, at):
        return torch.argsort(spec.axis_index(key, axis, perm, at=at))

    out = _rebuild(spec, _totals(spec, total), "inverse")
    return {k: v.to(perm[k].device) for k, v in out.items()}


def compose(spec, first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutation equal to applying ``first``, then ``then``, for a nested spec."""
    def total(key, axis, at):
        return spec.axis_index(key, axis, first, at=at)[spec.axis_index(key, axis, then, at=at)]

    out = _rebuild(spec, _totals(spec, total), "compose")
    return {k: v.to(first[k].device) for k, v in out.items()}


def order_problem(spec, key: str, axis: int, at: tuple[tuple[int, int], ...] = ()) -> bool:
    """Whether the groups on ``key[axis]`` (of the slice ``at``) fail to be nested (for `PermSpec.lint`)."""
    parts = _by_axis(spec)[(key, axis, at)]
    moved = spec.derangement(torch.Generator().manual_seed(1))  # every unit moves
    perm = [moved[g.name] for g in spec.groups]
    n = spec.shapes[key][axis]
    got = decompose(n, parts, _index(n, parts, perm))
    return got is None or any(not torch.equal(got[gi], perm[gi]) for gi, _ in parts)
