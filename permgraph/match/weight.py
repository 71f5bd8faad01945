"""Weight matching (Git Re-Basin, Alg. 1): coordinate descent over the groups of a PermSpec.

The objective is ``J(P) = Σ_T <A_T, P(B_T)>`` over every state_dict tensor ``T`` that some
group permutes. With every group but ``g`` fixed, ``J`` is linear in ``g``'s permutation:
``J = Σ_u S_g[u, p[u]] + const`` with ``S_g = Σ_{members m} A_m · B_mᵀ``, where ``A_m`` is
``A_T`` with the member axis brought to the front and read at the member's layout
positions (an ``(n, rest)`` matrix) and ``B_m`` is the same from ``B_T`` after every *other*
group's current permutation. Solving that LAP is one step; the groups are visited in a
random order, sweep after sweep, until a whole sweep improves nothing.

**Nested groups.** Attention gives groups whose units are blocks of another group's units:
a head (``n = H``, blocks of ``D``) holds every within-head unit once. Taken one at a time,
such a pair locks up (with the heads misaligned, the within-head similarity is noise, and
the reverse), so a visit of the outer group first tries a *joint* move: the similarity of
head ``i`` of A and head ``j`` of B is the best alignment of their inner units (one small
LAP per pair), the heads take the LAP of that matrix, the inner groups their best response
to the new heads, and the move is kept when it raises ``J``; otherwise the visit is the
plain step above.

**Only what a change invalidates is recomputed.** A group whose neighbours (the groups it
shares a tensor with) did not change since its last LAP is skipped. ``S_g`` is kept from
visit to visit, with the permutations each member's term was computed under; a visit adds,
for each member whose other axes were re-gathered since, the change of its term only:
``A_J · (B_new,J - B_old,J)ᵀ`` over the positions ``J`` that moved when one other axis
changed (after the first sweeps a neighbour's new permutation moves a tenth of its units or
fewer), the whole ``A_m · (B_new - B_old)ᵀ`` otherwise. Products run on the compute device;
only the LAP runs on the host, on a float64 copy of ``-S_g``.

**Streaming.** Neither model is held whole: ``state_a`` and ``state_b`` may be lazy mappings
(a memory-mapped `permgraph.checkpoint.Checkpoint`), read one tensor at a time. Gathers run
on the stored tensor in its stored dtype (exact), and only the gathered piece is converted to
the compute dtype; a member of more than `CHUNK` elements is multiplied in pieces along its
largest other axis. What is kept between visits (every ``S_g``, and A's member matrices) stays
within ``max_memory``: member matrices are dropped first, then the least recently used
``S_g``, which its group's next visit rebuilds in full. The result does not depend on the
budget beyond float rounding.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch

from permgraph import lap as _lap
from permgraph.errors import SpecMismatchError
from permgraph.match._common import LayoutInfo, MatchError, check_finite, check_spec, compose_index, gather_units
from permgraph.spec import PermSpec

__all__ = ["weight_matching", "WeightMatchingHistory", "similarity_matrices", "DEFAULT_MAX_MEMORY"]

#: What weight matching keeps between visits by default (similarities, converted tensors).
DEFAULT_MAX_MEMORY = 512 << 20

#: A step is kept when it raises the objective by more than this, relative.
RTOL = 1e-12

Index = dict[int, "torch.Tensor | None"]  # axis -> gather index (None: identity)


@dataclass
class WeightMatchingHistory:
    """What :func:`weight_matching` did.

    Attributes:
        objective: ``Σ_T <A_T, P(B_T)>`` over the tensors the groups permute: first at the
            starting permutation, then after each sweep (non-decreasing).
        changed: per sweep, the groups whose permutation changed.
        sweeps: number of sweeps run (the last one changed nothing when ``converged``).
        converged: a sweep improved no group before ``max_iter`` sweeps.
        seconds: wall time of the whole call.
        product_seconds: time spent building similarity matrices (GEMMs and gathers).
        lap_seconds: time spent in the LAP solver (host).
        laps: number of group LAPs solved (the small per-head-pair LAPs of joint moves
            are not counted).
        products: member terms computed (or changed) in full.
        updates: member terms updated from the units that moved only.
        reused: member terms found up to date.
        joint_moves: joint moves of nested groups (attention heads) kept.
        gemm_flops: floating-point operations of the similarity GEMMs.
        cache_peak: the most bytes kept between visits (within ``max_memory``).
        cache_evictions: entries dropped to stay within ``max_memory`` (a dropped
            similarity is rebuilt in full at the group's next visit).
    """

    objective: list[float] = field(default_factory=list)
    changed: list[list[str]] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = False
    seconds: float = 0.0
    product_seconds: float = 0.0
    lap_seconds: float = 0.0
    laps: int = 0
    products: int = 0
    updates: int = 0
    reused: int = 0
    joint_moves: int = 0
    gemm_flops: int = 0
    cache_peak: int = 0
    cache_evictions: int = 0


class _Member:
    """One member of one group: its A matrix, and the permutations its term of ``S_g`` was
    last computed under."""

    __slots__ = ("gi", "key", "axis", "lay", "others", "deps", "bucket", "used")

    def __init__(self, gi: int, key: str, axis: int, lay: LayoutInfo, others: dict[int, list[tuple[int, torch.Tensor]]]) -> None:
        self.gi = gi
        self.key = key
        self.axis = axis
        self.lay = lay
        self.others = others  # axis -> [(group index, positions)] of the *other* groups
        self.deps = sorted({g for parts in others.values() for g, _ in parts})
        self.bucket = 0  # 1 for the members of a nest (see _Nest)
        self.used: Index | None = None  # the indices its share of S was computed with


class _Nest:
    """A member of an outer group whose every unit (block) holds each unit of ``inner`` once.

    ``lay`` reads the member's positions ordered (outer unit, inner unit), as a layout of
    ``n_outer * n_inner`` units of one position; ``others`` are the permutations B is read
    through (every group on the tensor but the outer and inner ones on this axis).
    """

    __slots__ = ("mem", "inner", "lay", "others")

    def __init__(self, mem: _Member, inner: int, pos: torch.Tensor, others: dict[int, list[tuple[int, torch.Tensor]]],
                 axis_size: int) -> None:
        self.mem = mem
        self.inner = inner
        n_outer, n_inner = pos.shape[-2], pos.shape[-1]
        flat = pos.reshape(*pos.shape[:-2], n_outer * n_inner, 1)
        self.lay = LayoutInfo(flat, axis_size)
        self.others = others


def _nested_positions(pos_outer: torch.Tensor, pos_inner: torch.Tensor, axis_size: int) -> torch.Tensor | None:
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


class _Budget:
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


def _held_bytes(t: torch.Tensor, owner: torch.Tensor | None) -> int:
    """Bytes that keeping ``t`` holds beyond the caller's own tensor ``owner``."""
    if owner is not None and t.device == owner.device and (
            t.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()):
        return 0
    return t.untyped_storage().nbytes()


class _Weights:
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
        self.budget = _Budget(max_memory)
        # every (group, positions) on every axis of every member tensor
        self.on_axis: dict[str, dict[int, list[tuple[int, torch.Tensor]]]] = {}
        for gi, g in enumerate(spec.groups):
            for m in g.members:
                self.on_axis.setdefault(m.key, {}).setdefault(m.axis, []).append((gi, m.layout.positions(g.size)))
        self.keys = list(self.on_axis)
        self.shapes = {k: tuple(spec.shapes[k]) for k in self.keys}
        dtypes = {}
        first = state_a[self.keys[0]] if self.keys else torch.empty(0)
        self.device = torch.device(device) if device is not None else first.device
        for key in self.keys:
            ta, tb = state_a[key], state_b[key]
            dtypes[key] = dtype or torch.promote_types(torch.promote_types(ta.dtype, tb.dtype), torch.float32)
        self.a = _Weights(state_a, dtypes, self.device)
        self.b = _Weights(state_b, dtypes, self.device)
        n_groups = len(spec.groups)
        self.members: list[list[_Member]] = [[] for _ in range(n_groups)]
        self.nests: list[list[_Nest]] = [[] for _ in range(n_groups)]
        # S[g] = [plain members' share, nested members' share], kept up to date by refresh()
        # while the budget keeps it (see _take_s / _keep_s)
        self.users: list[set[int]] = [set() for _ in range(n_groups)]  # groups whose S reads group h
        self.tensors_of: list[set[str]] = [set() for _ in range(n_groups)]
        for gi, g in enumerate(spec.groups):
            for m in g.members:
                self.tensors_of[gi].add(m.key)
                pos = m.layout.positions(g.size)
                axes = self.on_axis[m.key]
                others = self._others(m.key, m.axis, {gi}, pos)
                mem = _Member(gi, m.key, m.axis, LayoutInfo(pos, self.shapes[m.key][m.axis]), others)
                self.members[gi].append(mem)
                for h in mem.deps:
                    self.users[h].add(gi)
                for d, pos_d in axes[m.axis]:
                    if d == gi:
                        continue
                    inner = _nested_positions(pos, pos_d, self.shapes[m.key][m.axis])
                    if inner is not None:
                        nest_others = self._others(m.key, m.axis, {gi, d}, pos)
                        self.nests[gi].append(_Nest(mem, d, inner, nest_others, self.shapes[m.key][m.axis]))
                        mem.bucket = 1
                        break
        self.partners = [sorted({n.inner for n in nests}) for nests in self.nests]
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

    def _others(self, key: str, axis: int, skip: set[int], pos: torch.Tensor) -> dict[int, list[tuple[int, torch.Tensor]]]:
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
    def _indices(self, key: str, others: dict[int, list[tuple[int, torch.Tensor]]], perm: list[torch.Tensor]) -> Index:
        shape = self.shapes[key]
        return {axis: compose_index(shape[axis], [(pos, perm[g2]) for g2, pos in parts]) for axis, parts in others.items()}

    def _b_matrix(self, key: str, axis: int, lay: LayoutInfo, idx: Index,
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

    def _a_matrix(self, key: str, axis: int, lay: LayoutInfo, tag: int | None,
                  piece: tuple[int, int, int] | None = None) -> torch.Tensor:
        """A's ``(n, rest)`` matrix of a member in the compute dtype (kept as a cheap entry
        under ``tag``; a piece, as in `_b_matrix`, is not kept)."""
        hit = None if tag is None or piece is not None else self.budget.get(("A", tag), cheap=True)
        if hit is None:
            src = self.a.raw(key)
            t = src if piece is None else src.narrow(piece[0], piece[1], piece[2] - piece[1])
            hit = self.a.compute(key, gather_units(t, axis, lay))
            if tag is not None and piece is None:
                self.budget.put(("A", tag), hit, _held_bytes(hit, src), cheap=True)
        return hit

    def _pieces(self, key: str, axis: int) -> list[tuple[int, int, int] | None]:
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
                 hist: WeightMatchingHistory) -> None:
        """``S += A_m · (B_m(idx) - B_m(old))ᵀ`` (without the second term when ``old`` is
        None), piece by piece for a large member."""
        n = self.sizes[mem.gi]
        pieces = self._pieces(mem.key, mem.axis)
        for piece in pieces:
            a = self._a_matrix(mem.key, mem.axis, mem.lay, id(mem) if len(pieces) == 1 else None, piece)
            b = self._b_matrix(mem.key, mem.axis, mem.lay, idx, piece=piece)
            if old is not None:  # (out of place: with nothing to gather, B's matrix is a view of B)
                b = b - self._b_matrix(mem.key, mem.axis, mem.lay, old, piece=piece)
            self._add(s, mem.bucket, a, b)
            hist.gemm_flops += 2 * n * n * a.shape[1]
            del a, b

    @staticmethod
    def _add(s: list[torch.Tensor | None], bucket: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """``s[bucket] += a · bᵀ``; the buckets hold ``-S_g`` (the LAP's cost, so handing it
        to the LAP is one copy)."""
        if s[bucket] is None:
            s[bucket] = torch.mm(a, b.T).neg_()
        else:
            s[bucket].addmm_(a, b.T, alpha=-1)

    def refresh(self, gi: int, perm: list[torch.Tensor], hist: WeightMatchingHistory) -> list[torch.Tensor | None]:
        """``S_g`` brought up to date with the current permutations of the other groups.

        A member not yet counted adds ``A_m · B_mᵀ``; a member whose other axes were
        re-gathered since adds ``A_m · (B_new - B_old)ᵀ``, over the moved positions only when
        one other axis changed. (One addmm per term: concatenating a group's terms into one
        GEMM saves passes over ``S_g`` but copies the terms, and measured slower.) ``S_g`` is
        kept for the next visit while the memory budget allows; when it was dropped, every
        member counts anew."""
        n = self.sizes[gi]
        s = self.budget.pop(("S", gi), cheap=False)
        if s is None:
            s = [None, None]
            for mem in self.members[gi]:
                mem.used = None
        for mem in self.members[gi]:
            if mem.used is not None and not mem.others:
                continue  # no other group touches it: counted once, for good
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
                    self._add(s, mem.bucket, a, b)
                    hist.gemm_flops += 2 * n * n * a.shape[1]
                    del a, b  # before the next member's are made
                    hist.updates += 1
                else:
                    self._product(s, mem, idx, mem.used, hist)
                    hist.products += 1
            mem.used = idx
        self.budget.put(("S", gi), s, sum(t.untyped_storage().nbytes() for t in s if t is not None), cheap=False,
                        worth=self.worth[gi])
        return s

    def cost(self, gi: int, perm: list[torch.Tensor], hist: WeightMatchingHistory, plain_only: bool = False) -> torch.Tensor:
        """``-S_g`` of group ``gi`` under the permutations of the others, on the compute
        device (only the members outside nests when ``plain_only``); not to be modified."""
        plain, nested = self.refresh(gi, perm, hist)
        if plain_only or nested is None:
            return plain if plain is not None else torch.zeros(self.sizes[gi], self.sizes[gi])
        return nested if plain is None else plain + nested

    def optimistic_similarity(self, gi: int, perm: list[torch.Tensor], hist: WeightMatchingHistory, lap: str) -> torch.Tensor:
        """The outer group's similarity with each pair of units' inner units aligned at best:
        ``S[i, j] = (plain members) + Σ_inner max_σ Σ_u M_ij[u, σ(u)]``."""
        n = self.sizes[gi]
        nests = self.nests[gi]
        s = self.cost(gi, perm, hist, plain_only=True).to(device="cpu", dtype=torch.float64, copy=True).neg_()
        blocks: dict[int, torch.Tensor] = {}
        for nest in nests:
            m = self.sizes[nest.inner]
            idx = self._indices(nest.mem.key, nest.others, perm)
            a = self._a_matrix(nest.mem.key, nest.mem.axis, nest.lay, id(nest))
            c = a @ self._b_matrix(nest.mem.key, nest.mem.axis, nest.lay, idx).T
            hist.products += 1
            c = c.view(n, m, n, m).permute(0, 2, 1, 3)
            blocks[nest.inner] = c if nest.inner not in blocks else blocks[nest.inner] + c
        for d, c in blocks.items():
            c64 = c.to(device="cpu", dtype=torch.float64)
            m = self.sizes[d]
            ar = torch.arange(m)
            for i in range(n):
                for j in range(n):
                    sigma = _lap.solve(c64[i, j], maximize=True, backend=lap)
                    s[i, j] += c64[i, j][ar, sigma].sum()
        return s

    # -- objective -----------------------------------------------------------------------
    def tensor_objective(self, key: str, perm: list[torch.Tensor]) -> float:
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


def _improves(old: float, new: float) -> bool:
    return new - old > RTOL * max(abs(old), abs(new), 1e-300)


class _Descent:
    """The coordinate descent: the permutations, what is stale, and one step per group."""

    def __init__(self, prob: _Problem, perm: list[torch.Tensor], lap: str, hist: WeightMatchingHistory) -> None:
        self.prob = prob
        self.perm = perm
        self.lap = lap
        self.hist = hist
        self.ar = [torch.arange(n) for n in prob.sizes]
        # dirty[g]: a group that g reads changed since g last solved its LAP
        self.dirty = [True] * len(prob.sizes)
        self.objectives = {k: prob.tensor_objective(k, perm) for k in prob.keys}
        self.objective = sum(self.objectives.values())

    def _solve(self, cost: torch.Tensor) -> torch.Tensor:
        """The LAP of a float64 CPU cost matrix (finite: the weights were checked)."""
        t0 = time.perf_counter()
        p = _lap.solve_cost(cost.numpy(), backend=self.lap)
        self.hist.lap_seconds += time.perf_counter() - t0
        self.hist.laps += 1
        return p

    def _cost(self, gi: int, perm: list[torch.Tensor]) -> torch.Tensor:
        """``-S_g`` as a float64 CPU matrix (a new copy: it is not kept between visits)."""
        t0 = time.perf_counter()
        c = self.prob.cost(gi, perm, self.hist).to(device="cpu", dtype=torch.float64, copy=True)
        self.hist.product_seconds += time.perf_counter() - t0
        return c

    def _changed(self, groups: list[int]) -> None:
        for g in groups:
            for u in self.prob.users[g]:
                self.dirty[u] = True

    def step(self, gi: int) -> list[int]:
        """Visit group ``gi``; return the groups whose permutation changed."""
        self.dirty[gi] = False
        if self.prob.nests[gi]:
            moved = self._joint_step(gi)
            if moved:
                return moved
        cost = self._cost(gi, self.perm)
        p_new = self._solve(cost)
        old = -float(cost[self.ar[gi], self.perm[gi]].sum())
        new = -float(cost[self.ar[gi], p_new].sum())
        if not _improves(old, new):
            return []
        if self.prob.quadratic[gi]:  # the gain read off S is not exact there: measure it
            keys = self.prob.tensors_of[gi]
            before = sum(self.prob.tensor_objective(k, self.perm) for k in keys)
            self.perm[gi] = p_new
            self.objective += sum(self.prob.tensor_objective(k, self.perm) for k in keys) - before
        else:
            self.perm[gi] = p_new
            self.objective += new - old
        self._changed([gi])
        return [gi]

    def _joint_step(self, gi: int) -> list[int]:
        """The joint move of an outer group and its nested inner groups (see the module
        docstring); returns the groups changed, or [] when the move does not raise ``J``."""
        prob, hist = self.prob, self.hist
        t0 = time.perf_counter()
        s = prob.optimistic_similarity(gi, self.perm, hist, self.lap)
        hist.product_seconds += time.perf_counter() - t0
        p_new = self._solve(s.neg_())
        if torch.equal(p_new, self.perm[gi]):
            return []
        trial = list(self.perm)
        trial[gi] = p_new
        for d in prob.partners[gi]:
            trial[d] = self._solve(self._cost(d, trial))
        keys = set(prob.tensors_of[gi]).union(*(prob.tensors_of[d] for d in prob.partners[gi]))
        before = [prob.tensor_objective(k, self.perm) for k in keys]
        after = [prob.tensor_objective(k, trial) for k in keys]
        if not _improves(sum(before), sum(after)):
            return []
        moved = [g for g in [gi, *prob.partners[gi]] if not torch.equal(trial[g], self.perm[g])]
        self.perm[:] = trial
        self.objective += sum(after) - sum(before)
        hist.joint_moves += 1
        self._changed(moved)
        for d in prob.partners[gi]:  # they just took their best response to this state
            self.dirty[d] = False
        return moved


def _validate(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], max_iter: int) -> None:
    check_spec(spec)
    for what, sd in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(sd, Mapping):
            raise SpecMismatchError(f"{what} must be a state_dict (a mapping of names to tensors), got {type(sd).__name__}")
        spec.check_state_dict(sd, what)
    keys = {m.key for g in spec.groups for m in g.members}
    check_finite(state_a, [k for k in spec.shapes if k in keys], "state_a")
    check_finite(state_b, [k for k in spec.shapes if k in keys], "state_b")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise MatchError(f"max_iter must be a positive int, got {max_iter!r}")


def _check_max_memory(max_memory: Any) -> int | None:
    if max_memory is None:
        return None
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 0:
        raise MatchError(f"max_memory must be a number of bytes >= 0 or None, got {max_memory!r}")
    return max_memory


@overload
def weight_matching(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_iter: int = 100, lap: str = "auto", progress: bool = False,
                    init: Mapping[str, torch.Tensor] | None = None,
                    max_memory: int | None = DEFAULT_MAX_MEMORY, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None,
                    return_history: Literal[False] = False) -> dict[str, torch.Tensor]: ...


@overload
def weight_matching(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_iter: int = 100, lap: str = "auto", progress: bool = False,
                    init: Mapping[str, torch.Tensor] | None = None,
                    max_memory: int | None = DEFAULT_MAX_MEMORY, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None,
                    return_history: Literal[True]) -> tuple[dict[str, torch.Tensor], WeightMatchingHistory]: ...


def weight_matching(
    spec: PermSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    lap: str = "auto",
    progress: bool = False,
    init: Mapping[str, torch.Tensor] | None = None,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    return_history: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], WeightMatchingHistory]:
    """Align B to A by matching weights (Git Re-Basin, Alg. 1).

    Coordinate descent on ``J(P) = Σ_T <A_T, P(B_T)>``: the groups are visited in a random
    order (drawn from ``seed`` each sweep), each taking the permutation that maximises ``J``
    with the others held fixed (one LAP), kept when ``J`` rises by more than ``1e-12``
    relative; sweeps repeat until one changes nothing, or ``max_iter`` sweeps. Attention
    heads and their within-head groups also get a joint move (see the module docstring).

    Args:
        spec: the PermSpec of the architecture (:func:`permgraph.infer`).
        state_a: the reference state_dict.
        state_b: the state_dict to align to ``state_a`` (same keys and shapes). Either may
            be any mapping, such as a lazily read `permgraph.checkpoint.Checkpoint`: tensors
            are read one at a time, converted to the compute dtype (float32, or wider when
            stored wider) on the compute device, and dropped unless the memory budget keeps
            them, so neither model is ever held whole.
        seed: seed of the random visiting order.
        max_iter: the most sweeps to run.
        lap: the LAP backend (see :func:`permgraph.lap.solve`).
        progress: show a tqdm bar over the sweeps.
        init: the starting permutation (default: the identity).
        max_memory: bytes kept from visit to visit: the groups' similarity matrices (dropped
            ones are rebuilt in full), and converted tensors and member matrices (dropped
            first); None keeps everything. The permutation found does not depend on it
            beyond float rounding; the time does.
        device: where the products run (default: the device of ``state_a``'s first member
            tensor); the LAP runs on the host.
        return_history: also return a :class:`WeightMatchingHistory` (the objective per
            sweep, the groups changed, counts and timings).

    Returns:
        The permutation, group name -> int64 CPU tensor, such that ``spec.apply(perm,
        state_b)`` is B aligned to A; with ``return_history=True`` the pair
        ``(perm, history)``.

    Raises:
        SpecMismatchError: a state_dict does not match the spec (the message names the first
            mismatching key and its shapes), or a tensor holds NaN/inf (named).
        PermutationError: ``init`` is not a permutation of every group.
        MatchError: ``max_iter`` is not a positive int, or ``max_memory`` not a size.
        LapError: the LAP backend is unknown or not installed.

    Example:
        >>> import torch, permgraph
        >>> from permgraph.match import weight_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> a = mlp.state_dict()
        >>> b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(0)), a)
        >>> perm = weight_matching(spec, a, b)
        >>> all(torch.equal(spec.apply(perm, b)[k], a[k]) for k in a)
        True
    """
    t_start = time.perf_counter()
    _validate(spec, state_a, state_b, max_iter)
    _lap._pick(2, lap)  # an unknown backend fails now, not after the first products
    if init is not None:
        spec.check_permutation(init)
    start = init if init is not None else spec.identity()
    perm = [start[g.name].detach().to("cpu", torch.int64).clone() for g in spec.groups]
    hist = WeightMatchingHistory()
    if not spec.groups:
        hist.converged = True
        hist.seconds = time.perf_counter() - t_start
        return ({}, hist) if return_history else {}
    max_memory = _check_max_memory(max_memory)
    prob = _Problem(spec, state_a, state_b, max_memory=max_memory, device=device, dtype=dtype)
    descent = _Descent(prob, perm, lap, hist)
    hist.objective.append(descent.objective)
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc="weight matching", unit="sweep")
    try:
        for _ in range(max_iter):
            changed: list[int] = []
            for gi in torch.randperm(len(spec.groups), generator=gen).tolist():
                if descent.dirty[gi]:  # else S_g is what it was at g's last LAP
                    changed += descent.step(gi)
            hist.sweeps += 1
            hist.changed.append([spec.groups[gi].name for gi in dict.fromkeys(changed)])
            hist.objective.append(descent.objective)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{descent.objective:.6g}", changed=len(hist.changed[-1]))
            if not changed:
                hist.converged = True
                break
    finally:
        if bar is not None:
            bar.close()
    result = {g.name: descent.perm[gi] for gi, g in enumerate(spec.groups)}
    hist.cache_peak, hist.cache_evictions = prob.budget.peak, prob.budget.evictions
    hist.seconds = time.perf_counter() - t_start
    return (result, hist) if return_history else result


def similarity_matrices(
    spec: PermSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    perm: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every group's ``S_g`` at once, with the other groups permuted by ``perm``.

    One sweep's worth of GEMMs (the floor of :func:`weight_matching`); the LAP of each
    matrix is that group's best response to ``perm``.

    Args:
        spec: the PermSpec.
        state_a: the reference state_dict.
        state_b: the state_dict to align.
        perm: the permutation of the other groups (default: the identity).

    Returns:
        group name -> float64 CPU matrix ``(n, n)``: ``S[u, v]`` is the similarity of A's unit
        ``u`` and B's unit ``v`` (``Σ`` over the members of the products of their weights).

    Raises:
        SpecMismatchError: a state_dict does not match the spec, or holds NaN/inf.
        PermutationError: ``perm`` is not a permutation of every group.
    """
    _validate(spec, state_a, state_b, 1)
    start = spec.identity() if perm is None else perm
    spec.check_permutation(start)
    p = [start[g.name].detach().to("cpu", torch.int64) for g in spec.groups]
    prob = _Problem(spec, state_a, state_b)
    hist = WeightMatchingHistory()
    return {g.name: prob.cost(gi, p, hist).to(device="cpu", dtype=torch.float64, copy=True).neg_() for gi, g in enumerate(spec.groups)}
