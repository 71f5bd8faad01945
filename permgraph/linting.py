"""`PermSpec.lint`: the structural checks of a spec, every problem found listed at once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from permgraph.errors import SpecMismatchError
from permgraph.layout import compose_index
from permgraph.spec import Group, Member, PermSpec

__all__ = ["lint"]


def lint(spec: PermSpec) -> None:
    """See `PermSpec.lint`."""
    problems: list[str] = []
    names = Counter(spec.names)
    problems += [f"group name {n!r} used {c} times" for n, c in names.items() if c > 1]
    seen: set[Member] = set()
    by_axis: dict[tuple[str, int, tuple[tuple[int, int], ...]], list[tuple[Group, Member]]] = {}
    slicer: dict[str, tuple[Group, Member]] = {}  # the first member with an ``at`` of each tensor
    for g in spec.groups:
        if g.size < 2:
            problems.append(f"group {g.name!r} has {g.size} unit(s)")
        if not g.members:
            problems.append(f"group {g.name!r} has no members")
        for m in g.members:
            if m.key not in spec.shapes:
                problems.append(f"group {g.name!r}: member {m.key!r} is not in the state_dict")
                continue
            shape = spec.shapes[m.key]
            if not 0 <= m.axis < len(shape):
                problems.append(f"group {g.name!r}: {m.key} has no axis {m.axis}")
                continue
            if m.layout.span(g.size) > shape[m.axis]:
                problems.append(f"group {g.name!r}: {m} reaches past size {shape[m.axis]}")
                continue
            bad = _at_problem(m, shape)
            if bad:
                problems.append(f"group {g.name!r}: {m}: {bad}")
                continue
            pos = m.layout.positions(g.size).reshape(-1)
            if pos.unique().numel() != pos.numel():
                problems.append(f"group {g.name!r}: {m} covers a position twice")
            if m in seen:
                problems.append(f"{m} appears twice")
            seen.add(m)
            by_axis.setdefault((m.key, m.axis, m.at), []).append((g, m))
            if m.at:
                h, first = slicer.setdefault(m.key, (g, m))
                if [a for a, _ in m.at] != [a for a, _ in first.at]:
                    problems.append(f"group {g.name!r}: {m} slices {m.key} along other axes than {first} "
                                    f"(group {h.name!r}): the members of one tensor slice it along the same axes")
    for (key, axis, _), ms in by_axis.items():
        if key not in slicer:
            continue
        h, cut = slicer[key]
        if axis in {a for a, _ in cut.at}:
            problems += [f"group {g.name!r}: {m} permutes axis {axis} of {key}, which {cut} (group {h.name!r}) "
                         "picks a slice along: an axis that picks slices cannot be permuted" for g, m in ms]
    problems += _slice_overlaps(spec, by_axis)
    if not problems:
        # every unit moved (a random permutation of two units may be the identity)
        perms = spec.derangement(torch.Generator().manual_seed(0))
        for (key, axis, at), ms in by_axis.items():
            if len(ms) < 2:
                continue
            n = spec.shapes[key][axis]
            parts = [(m.layout.positions(g.size), perms[g.name]) for g, m in ms]
            forward, backward = compose_index(n, parts), compose_index(n, parts[::-1])
            if forward.unique().numel() != n or (not torch.equal(forward, backward) and _not_nested(spec, key, axis, at)):
                problems.append(f"groups {list(dict.fromkeys(g.name for g, _ in ms))} neither commute nor nest (outer groups "
                                f"first) on {Member(key, axis, at=at)}")
    if problems:
        raise SpecMismatchError("lint found problems:\n  " + "\n  ".join(problems))



def _not_nested(spec: PermSpec, key: str, axis: int, at: tuple[tuple[int, int], ...]) -> bool:
    from permgraph import nesting

    return nesting.order_problem(spec, key, axis, at)


def _at_problem(m: Member, shape: tuple[int, ...]) -> str | None:
    """What is wrong with ``m.at`` on a tensor of ``shape`` (None if nothing)."""
    axes = [a for a, _ in m.at]
    if axes != sorted(set(axes)):
        return "at must name each axis once, sorted by axis"
    for a, i in m.at:
        if not 0 <= a < len(shape):
            return f"at names axis {a}, but {m.key} has {len(shape)} axes"
        if a == m.axis:
            return f"at picks a slice along axis {a}, the axis the member permutes"
        if not 0 <= i < shape[a]:
            return f"at index {i} is out of range for axis {a} of size {shape[a]}"
    return None


def _slice_overlaps(spec: PermSpec, by_axis: Mapping[tuple[str, int, tuple[tuple[int, int], ...]],
                                                    Sequence[tuple[Group, Member]]]) -> list[str]:
    """A problem for each slice member on an axis whose positions some whole-tensor member
    of that axis also covers (the two would not commute)."""
    problems = []
    for (key, axis, at), ms in by_axis.items():
        whole = by_axis.get((key, axis, ()))
        if not at or not whole:
            continue
        covered = torch.zeros(spec.shapes[key][axis], dtype=torch.bool)
        for g, m in whole:
            covered[m.layout.positions(g.size).reshape(-1)] = True
        for g, m in ms:
            pos = m.layout.positions(g.size).reshape(-1)
            if bool(covered[pos].any()):
                h, w = next((h, w) for h, w in whole if bool(torch.isin(pos, w.layout.positions(h.size)).any()))
                problems.append(f"group {g.name!r}: {m} covers positions of {key}[{axis}] that {w} (group {h.name!r}, "
                                "on the whole tensor) covers too: a slice's positions must be disjoint from the whole "
                                "tensor's")
    return problems
