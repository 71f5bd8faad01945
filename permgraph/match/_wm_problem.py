"""The structure of one weight matching problem and its similarity matrices.

``_Problem`` holds, for every group, its members (a state_dict tensor and axis each) and the
groups each member's B matrix is read through; ``refresh`` keeps every ``S_g`` up to date
from visit to visit (see `permgraph.match.weight` for the method).

A tensor that some member slices (`permgraph.spec.Member` ``at``: one expert of a stacked
mixture-of-experts tensor) is matched as one sub-tensor per slice, keyed ``(key, at)``: a
member with an ``at`` lies in its own slice, a whole-tensor member in every slice (its axis
renumbered there), and ``J`` sums over the slices, which is ``<A_T, P(B_T)>`` of the tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import torch

from permgraph import lap as _lap
from permgraph.layout import at_axis, at_slice
from permgraph.match._budget import Budget, Weights, held_bytes
from permgraph.match._common import LayoutInfo, compose_index, gather_units, nested_positions, partitioned_positions
from permgraph.spec import Member, PermSpec

Index = dict[int, "torch.Tensor | None"]  # axis -> gather index (None: identity)
Key = Hashable  # a state_dict key, or (key, at) for one slice of a tensor that members slice
At = tuple[tuple[int, int], ...]


def _slices(spec: PermSpec) -> dict[str, list[At]]:
    """Every slice of each tensor that some member slices (along the axes its ``at`` names:
    `PermSpec.lint` makes them the same for every member of the tensor)."""
    axes: dict[str, tuple[int, ...]] = {}
    for g in spec.groups:
        for m in g.members:
            if m.at:
                axes.setdefault(m.key, tuple(a for a, _ in m.at))
    return {key: [tuple(zip(ax, idx)) for idx in itertools.product(*(range(spec.shapes[key][a]) for a in ax))]
            for key, ax in axes.items()}


def _places(m: Member, slices: Mapping[str, list[At]]) -> list[tuple[Key, int]]:
    """Where a member lies among the (sub-)tensors matched: ``(key, axis)`` pairs."""
    cuts = slices.get(m.key)
    if cuts is None:
        return [(m.key, m.axis)]
    return [((m.key, at), at_axis(m.axis, at)) for at in cuts if set(m.at) <= set(at)]


def _name(key: Key) -> str:
    """The state_dict key of a (sub-)tensor's `Key`."""
    return key[0] if isinstance(key, tuple) else key


class _Sliced(Mapping):
    """A state_dict read by `Key`: ``(key, at)`` is a view of the slice ``at`` of ``key``."""

    def __init__(self, state: Mapping[str, torch.Tensor], keys: list[Key]) -> None:
        self.state = state
        self._keys = keys

    def __getitem__(self, key: Key) -> torch.Tensor:
        if not isinstance(key, tuple):
            return self.state[key]
        read = getattr(self.state, "read_slice", None)  # a Checkpoint reads the slice alone
        return read(*key) if read is not None else at_slice(self.state[key[0]], key[1])

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _Member:
    """One member of one group: its A matrix, and the permutations its term of ``S_g`` was
    last computed under."""

    __slots__ = ("gi", "key", "axis", "lay", "others", "deps", "bucket", "used")

    def __init__(self, gi: int, key: Key, axis: int, lay: LayoutInfo, others: dict[int, list[tuple[int, torch.Tensor]]]) -> None:
        self.gi = gi
        self.key = key
        self.axis = axis
        self.lay = lay
        self.others = others  # axis -> [(group index, positions)] of the *other* groups
        self.deps = sorted({g for parts in others.values() for g, _ in parts})
        self.bucket = 0  # 1 for the members of a nest (see _Nest)
        self.used: Index | None = None  # the indices its share of S was computed with


class _Nest:
    """A member of an outer group whose every unit (block) holds the units of an inner group
    once each: of one group shared by every block (``inners = (d,)``, attention's
    within-head units in ``heads="shared"``), or of one group per block (``inners[i]`` in
    block ``i``: ``heads="independent"``).

    ``lay`` reads the member's positions ordered (outer unit, inner unit), as a layout of
    ``n_outer * n_inner`` units of one position; ``others`` are the permutations B is read
    through (every group on the tensor but the outer and inner ones on this axis).
    """

    __slots__ = ("mem", "inners", "m", "lay", "others")

    def __init__(self, mem: _Member, inners: tuple[int, ...], pos: torch.Tensor,
                 others: dict[int, list[tuple[int, torch.Tensor]]], axis_size: int) -> None:
        self.mem = mem
        self.inners = inners
        n_outer, self.m = pos.shape[-2], pos.shape[-1]
        flat = pos.reshape(*pos.shape[:-2], n_outer * self.m, 1)
        self.lay = LayoutInfo(flat, axis_size)
        self.others = others


#: Member matrices larger than this many elements are multiplied in pieces along another
#: axis (so that a vocabulary-sized embedding never exists whole in float32).
CHUNK = 1 << 22


class _Problem:
    """The precomputed structure of one (spec, A, B) matching problem."""

    def __init__(self, spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 *, max_memory: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.spec = spec
        self.sizes = [g.size for g in spec.groups]
        self.budget = Budget(max_memory)
        slices = _slices(spec)
        places = {m: _places(m, slices) for g in spec.groups for m in g.members}
        # every (group, positions) on every axis of every member (sub-)tensor
        self.on_axis: dict[Key, dict[int, list[tuple[int, torch.Tensor]]]] = {}
        for gi, g in enumerate(spec.groups):
            for m in g.members:
                for key, axis in places[m]:
                    self.on_axis.setdefault(key, {}).setdefault(axis, []).append((gi, m.layout.positions(g.size)))
        self.keys = list(self.on_axis)
        cut = {key: {a for a, _ in ats[0]} for key, ats in slices.items()}
        self.shapes = {k: tuple(n for a, n in enumerate(spec.shapes[_name(k)]) if a not in cut.get(_name(k), ()))
                       for k in self.keys}
        names = list(dict.fromkeys(map(_name, self.keys)))
        self.device = torch.device(device) if device is not None else (
            state_a[names[0]].device if names else torch.device("cpu"))
        stored = {}
        for name in names:
            ta, tb = state_a[name], state_b[name]
            stored[name] = dtype or torch.promote_types(torch.promote_types(ta.dtype, tb.dtype), torch.float32)
        dtypes = {k: stored[_name(k)] for k in self.keys}
        self.a = Weights(_Sliced(state_a, self.keys), dtypes, self.device)
        self.b = Weights(_Sliced(state_b, self.keys), dtypes, self.device)
        n_groups = len(spec.groups)
        self.members: list[list[_Member]] = [[] for _ in range(n_groups)]
        self.nests: list[list[_Nest]] = [[] for _ in range(n_groups)]
        # S[g] = [plain members' share, nested members' share], kept up to date by refresh()
        # while the budget keeps it (see _take_s / _keep_s)
        self.users: list[set[int]] = [set() for _ in range(n_groups)]  # groups whose S reads group h
        self.tensors_of: list[set[Key]] = [set() for _ in range(n_groups)]
        for gi, g in enumerate(spec.groups):
            for m in g.members:
                pos = m.layout.positions(g.size)
                for key, axis in places[m]:
                    self.tensors_of[gi].add(key)
                    others = self._others(key, axis, {gi}, pos)
                    mem = _Member(gi, key, axis, LayoutInfo(pos, self.shapes[key][axis]), others)
                    self.members[gi].append(mem)
                    for h in mem.deps:
                        self.users[h].add(gi)
                    size = self.shapes[key][axis]
                    rivals = [(d, pos_d) for d, pos_d in self.on_axis[key][axis] if d != gi]
                    nest = next((((d,), inner) for d, pos_d in rivals
                                 if (inner := nested_positions(pos, pos_d, size)) is not None), None)
                    if nest is None and rivals:  # per-block groups come after the outer one (spec order)
                        nest = partitioned_positions(pos, [(d, p) for d, p in rivals if d > gi], size)
                    if nest is not None:
                        inners, inner = nest
                        nest_others = self._others(key, axis, {gi, *inners}, pos)
                        self.nests[gi].append(_Nest(mem, inners, inner, nest_others, size))
                        mem.bucket = 1
        self.partners = [sorted({d for n in nests for d in n.inners}) for nests in self.nests]
        # outer groups with a group of their own in each unit: applied after the outer one,
        # those permute inside whatever block the outer group brought there, so S_g read
        # through them pairs A's block i with B's block j under block j's inner permutation
        # instead of block i's: its plain LAP is not the best response, only the joint move is
        self.joint_only = [any(len(n.inners) > 1 for n in nests) for nests in self.nests]
        # rebuilding S_g costs 2 n² rest flops per member and keeping it 4 n² bytes: its worth
        # per byte is the members' summed rest
        self.worth = [float(sum(math.prod(self.shapes[m.key]) // self.sizes[gi] for m in self.members[gi]))
                      for gi in range(n_groups)]
        # tensors on which one group acts along two axes: the objective is quadratic in it
        # there, so a step's gain is recomputed rather than read off S
        self.quadratic = [False] * n_groups
        for axes in self.on_axis.values():
            seen: dict[int, set[int]] = {}
            for axis, parts in axes.items():
                for gi, _ in parts:
                    seen.setdefault(gi, set()).add(axis)
            for gi, ax in seen.items():
                if len(ax) > 1:
                    self.quadratic[gi] = True

    def _others(self, key: Key, axis: int, skip: set[int], pos: torch.Tensor) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """The groups B is read through for a member on ``key[axis]`` at positions ``pos``:
        every group on the tensor's other axes, and those on ``axis`` itself that move some
        of ``pos`` (a group on a disjoint segment cannot change what the member reads), but
        not those in ``skip`` there."""
        mine = torch.zeros(self.shapes[key][axis], dtype=torch.bool)
        mine[pos.reshape(-1)] = True
        out: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for ax, parts in self.on_axis[key].items():
            if ax == axis:
                keep = [(g2, p2) for g2, p2 in parts if g2 not in skip and bool(mine[p2.reshape(-1)].any())]
            else:
                keep = list(parts)
            if keep:
                out[ax] = keep
        return out

    # -- products ------------------------------------------------------------------------
    def _indices(self, key: Key, others: dict[int, list[tuple[int, torch.Tensor]]], perm: list[torch.Tensor]) -> Index:
        shape = self.shapes[key]
        return {axis: compose_index(shape[axis], [(pos, perm[g2]) for g2, pos in parts]) for axis, parts in others.items()}

    def _b_matrix(self, key: Key, axis: int, lay: LayoutInfo, idx: Index,
                  select: tuple[int, torch.Tensor] | None = None, piece: tuple[int, int, int] | None = None) -> torch.Tensor:
        """B's ``(n, rest)`` matrix of a member on ``key[axis]`` in the compute dtype: every
        other axis gathered by ``idx``; with ``select = (axis, index)``, that axis is gathered
        by ``index`` instead (first, as it usually keeps few positions); with ``piece = (c,
        start, stop)``, only positions ``start:stop`` of axis ``c`` (after its gather)."""
        t = self.b.raw(key)
        gathers = [(ax, ix) for ax, ix in idx.items() if ax != axis and (select is None or ax != select[0])]
        if select is not None:
            gathers.insert(0, select)
        if piece is not None:
            c, lo, hi = piece
            ix = next((ix for ax, ix in gathers if ax == c), None)
            gathers = [(ax, x) for ax, x in gathers if ax != c]
            if ix is None:
                t = t.narrow(c, lo, hi - lo)
            else:
                gathers.insert(0, (c, ix[lo:hi]))
        return self.b.compute(key, gather_units(t, axis, lay, idx.get(axis), gathers))

    def _a_matrix(self, key: Key, axis: int, lay: LayoutInfo, tag: int | None,
                  piece: tuple[int, int, int] | None = None) -> torch.Tensor:
        """A's ``(n, rest)`` matrix of a member in the compute dtype (kept as a cheap entry
        under ``tag``; a piece, as in `_b_matrix`, is not kept)."""
        hit = None if tag is None or piece is not None else self.budget.get(("A", tag), cheap=True)
        if hit is None:
            src = self.a.raw(key)
            t = src if piece is None else src.narrow(piece[0], piece[1], piece[2] - piece[1])
            hit = self.a.compute(key, gather_units(t, axis, lay))
            if tag is not None and piece is None:
                self.budget.put(("A", tag), hit, held_bytes(hit, src), cheap=True)
        return hit

    def _pieces(self, key: Key, axis: int) -> list[tuple[int, int, int] | None]:
        """How to split a member's product: ``[None]`` (whole) for a small tensor, else
        ranges of its largest other axis holding about `CHUNK` elements each."""
        shape = self.shapes[key]
        total = math.prod(shape)
        others = [d for d in range(len(shape)) if d != axis]
        if total <= CHUNK or not others:
            return [None]
        c = max(others, key=lambda d: shape[d])
        step = max(1, CHUNK * shape[c] // total)
        return [(c, lo, min(lo + step, shape[c])) for lo in range(0, shape[c], step)]

    def _product(self, s: list[torch.Tensor | None], mem: _Member, idx: Index, old: Index | None,
                 hist: Any, sign: int = 1) -> None:
        """``S += sign · A_m · (B_m(idx) - B_m(old))ᵀ`` (without the second term when ``old``
        is None), piece by piece for a large member."""
        n = self.sizes[mem.gi]
        pieces = self._pieces(mem.key, mem.axis)
        for piece in pieces:
            a = self._a_matrix(mem.key, mem.axis, mem.lay, id(mem) if len(pieces) == 1 else None, piece)
            b = self._b_matrix(mem.key, mem.axis, mem.lay, idx, piece=piece)
            if old is not None:  # (out of place: with nothing to gather, B's matrix is a view of B)
                b = b - self._b_matrix(mem.key, mem.axis, mem.lay, old, piece=piece)
            if sign < 0:
                b = -b
            self._add(s, mem.bucket, a, b)
            hist.gemm_flops += 2 * n * n * a.shape[1]
            del a, b

    def _defer(self, s: list[torch.Tensor | None], bucket: int, a: torch.Tensor, b: torch.Tensor,
               pending: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """``s[bucket] += a · bᵀ``, fused with the group's other small updates: an update
        over a few moved positions is a thin GEMM whose cost is the pass over ``S_g``, so
        the thin terms of one visit are concatenated into one GEMM (up to ``n`` columns)."""
        n = a.shape[0]
        if a.shape[1] >= n:
            self._add(s, bucket, a, b)
            return
        pending[bucket].append((a, b))
        if sum(x.shape[1] for x, _ in pending[bucket]) >= n:
            self._flush(s, bucket, pending)

    def _flush(self, s: list[torch.Tensor | None], bucket: int, pending: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        terms = pending[bucket]
        if len(terms) == 1:
            self._add(s, bucket, *terms[0])
        elif terms:
            self._add(s, bucket, torch.cat([a for a, _ in terms], 1), torch.cat([b for _, b in terms], 1))
        terms.clear()

    @staticmethod
    def _add(s: list[torch.Tensor | None], bucket: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """``s[bucket] += a · bᵀ``; the buckets hold ``-S_g`` (the LAP's cost, so handing it
        to the LAP is one copy)."""
        if s[bucket] is None:
            s[bucket] = torch.mm(a, b.T).neg_()
        else:
            s[bucket].addmm_(a, b.T, alpha=-1)

    def refresh(self, gi: int, perm: list[torch.Tensor], hist: Any, ready: set[int] | None = None) -> list[torch.Tensor | None]:
        """``S_g`` brought up to date with the current permutations of the other groups.

        A member not yet counted adds ``A_m · B_mᵀ``; a member whose other axes were
        re-gathered since adds ``A_m · (B_new - B_old)ᵀ``, over the moved positions only when
        one other axis changed. (One addmm per full term: concatenating those copies them, and
        measured slower; the thin updates of one visit are fused, see `_defer`.) ``S_g`` is
        kept for the next visit while the memory budget allows; when it was dropped, every
        member counts anew. With ``ready`` (a forward pass), only the members read through
        groups in it count; one counted before (by a joint move's full read) is taken out,
        so that what ``S_g`` holds does not depend on what the budget kept."""
        n = self.sizes[gi]
        pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]  # small updates, fused
        s = self.budget.pop(("S", gi), cheap=False)
        if s is None:
            s = [None, None]
            for mem in self.members[gi]:
                mem.used = None
        for mem in self.members[gi]:
            if mem.used is not None and not mem.others:
                continue  # no other group touches it: counted once, for good
            if ready is not None and not ready.issuperset(mem.deps):  # a forward pass: left for later
                if mem.used is not None:  # counted by a full read (a joint move): taken out again
                    self._product(s, mem, mem.used, None, hist, sign=-1)
                    mem.used = None
                continue
            idx = self._indices(mem.key, mem.others, perm)
            if mem.used is None:
                self._product(s, mem, idx, None, hist)
                hist.products += 1
            else:
                changed = [ax for ax in idx if not _same(idx[ax], mem.used.get(ax))]
                if not changed:
                    hist.reused += 1
                    continue
                if len(changed) == 1 and changed[0] != mem.axis:
                    axis = changed[0]
                    n_axis = self.shapes[mem.key][axis]
                    new, old = idx[axis], mem.used[axis]
                    new = torch.arange(n_axis) if new is None else new
                    old = torch.arange(n_axis) if old is None else old
                    moved = (new != old).nonzero().squeeze(1)
                    a = self.a.compute(mem.key, gather_units(self.a.raw(mem.key), mem.axis, mem.lay, gathers=[(axis, moved)]))
                    b = self._b_matrix(mem.key, mem.axis, mem.lay, idx, select=(axis, new[moved]))
                    b -= self._b_matrix(mem.key, mem.axis, mem.lay, idx, select=(axis, old[moved]))
                    hist.gemm_flops += 2 * n * n * a.shape[1]
                    self._defer(s, mem.bucket, a, b, pending)
                    del a, b
                    hist.updates += 1
                else:
                    self._product(s, mem, idx, mem.used, hist)
                    hist.products += 1
            mem.used = idx
        for bucket in (0, 1):
            self._flush(s, bucket, pending)
        self.budget.put(("S", gi), s, sum(t.untyped_storage().nbytes() for t in s if t is not None), cheap=False,
                        worth=self.worth[gi])
        return s

    def cost(self, gi: int, perm: list[torch.Tensor], hist: Any, plain_only: bool = False,
             ready: set[int] | None = None) -> torch.Tensor:
        """``-S_g`` of group ``gi`` under the permutations of the others, on the compute
        device (only the members outside nests when ``plain_only``; only those read through
        the ``ready`` groups, if given, see `refresh`); not to be modified."""
        plain, nested = self.refresh(gi, perm, hist, ready)
        if plain_only or nested is None:
            return plain if plain is not None else torch.zeros(self.sizes[gi], self.sizes[gi])
        return nested if plain is None else plain + nested

    def optimistic_similarity(self, gi: int, perm: list[torch.Tensor], hist: Any, lap: str) -> torch.Tensor:
        """The outer group's similarity with each pair of units' inner units aligned at best:
        ``S[i, j] = (plain members) + Σ_inner max_σ Σ_u M_ij[u, σ(u)]``."""
        n = self.sizes[gi]
        nests = self.nests[gi]
        s = self.cost(gi, perm, hist, plain_only=True).to(device="cpu", dtype=torch.float64, copy=True).neg_()
        blocks: dict[tuple[int, ...], torch.Tensor] = {}
        for nest in nests:
            m = nest.m
            idx = self._indices(nest.mem.key, nest.others, perm)
            a = self._a_matrix(nest.mem.key, nest.mem.axis, nest.lay, id(nest))
            c = a @ self._b_matrix(nest.mem.key, nest.mem.axis, nest.lay, idx).T
            hist.products += 1
            c = c.view(n, m, n, m).permute(0, 2, 1, 3)
            blocks[nest.inners] = c if nest.inners not in blocks else blocks[nest.inners] + c
        for c in blocks.values():
            c64 = c.to(device="cpu", dtype=torch.float64)
            m = c64.shape[-1]
            ar = torch.arange(m)
            for i in range(n):
                for j in range(n):
                    sigma = _lap.solve(c64[i, j], maximize=True, backend=lap)
                    s[i, j] += c64[i, j][ar, sigma].sum()
        return s

    # -- objective -----------------------------------------------------------------------
    def tensor_objective(self, key: Key, perm: list[torch.Tensor]) -> float:
        """``<A_T, P(B_T)>`` for one tensor (in pieces along its first axis when large)."""
        shape = self.shapes[key]
        index = {axis: compose_index(shape[axis], [(pos, perm[g]) for g, pos in parts])
                 for axis, parts in self.on_axis[key].items()}
        ta, tb = self.a.raw(key), self.b.raw(key)
        step = max(1, CHUNK * shape[0] // max(math.prod(shape), 1))
        total = 0.0
        for lo in range(0, shape[0], step):
            hi = min(lo + step, shape[0])
            a = ta.narrow(0, lo, hi - lo)
            b = tb.index_select(0, index[0][lo:hi].to(tb.device)) if 0 in index else tb.narrow(0, lo, hi - lo)
            for axis, ix in index.items():
                if axis:
                    b = b.index_select(axis, ix.to(b.device))
            total += float(torch.vdot(self.a.compute(key, a).reshape(-1), self.b.compute(key, b).reshape(-1)))
        return total


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    if x is None or y is None:
        return x is None and y is None
    return x is y or torch.equal(x, y)
