"""The streaming statistics of activation matching, and their sums over ranks.

`ActivationStats` keeps, per group, the float64 sums that a similarity of A's and B's units
needs (``O(n²)`` memory, never ``samples x n``); `share_shifts` and `reduce` add them over a
``torch.distributed`` process group (see `permgraph.match.activation`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from permgraph import distributed as _dist

__all__ = ["ActivationStats", "share_shifts", "reduce", "NO_DATA", "DATA", "FAILED"]


@dataclass
class ActivationStats:
    """Streaming cross-statistics of ``n`` units of A against ``n`` units of B.

    The sums are of the data shifted by the first batch's means (``shift_a``, ``shift_b``):
    the centred moments then lose no precision to large means, and the raw ones (for the
    cosine) follow exactly.

    Attributes:
        count: number of samples seen.
        shift_a, shift_b: the per-unit shifts (float64).
        sum_a, sum_b: per-unit sums of the shifted data (float64).
        sq_a, sq_b: per-unit sums of its squares (float64).
        cross: ``Σ (x_a - shift_a)ᵀ (x_b - shift_b)``, ``(n, n)`` (float64).
    """

    n: int
    device: torch.device
    count: float = 0.0
    shift_a: torch.Tensor | None = None
    shift_b: torch.Tensor | None = None
    sum_a: torch.Tensor = field(init=False)
    sum_b: torch.Tensor = field(init=False)
    sq_a: torch.Tensor = field(init=False)
    sq_b: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        z = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        self.sum_a, self.sum_b, self.sq_a, self.sq_b = z.clone(), z.clone(), z.clone(), z
        self.cross = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Add ``(samples, n)`` observations of A's and B's units."""
        xa = xa.to(self.device)
        xb = xb.to(self.device)
        if xa.dtype not in (torch.float32, torch.float64):
            xa, xb = xa.float(), xb.float()
        if self.shift_a is None or self.shift_b is None:
            # the shift exactly as subtracted (rounded to the data's dtype), so that the raw
            # sums follow exactly from the shifted ones
            self.shift_a = xa.mean(0, dtype=torch.float64).to(xa.dtype).to(torch.float64)
            self.shift_b = xb.mean(0, dtype=torch.float64).to(xb.dtype).to(torch.float64)
        xa = xa - self.shift_a.to(xa.dtype)
        xb = xb - self.shift_b.to(xb.dtype)
        self.count += xa.shape[0]
        self.sum_a += xa.sum(0, dtype=torch.float64)
        self.sum_b += xb.sum(0, dtype=torch.float64)
        self.sq_a += xa.square().sum(0, dtype=torch.float64)
        self.sq_b += xb.square().sum(0, dtype=torch.float64)
        self.cross += (xa.T @ xb).to(torch.float64)

    def recentre(self, shift_a: torch.Tensor, shift_b: torch.Tensor) -> None:
        """Express the sums about new shifts (float64, ``(n,)``), exactly up to rounding:
        statistics gathered with different shifts (on different ranks) can then be added."""
        zero = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        new_a = shift_a.to(device=self.device, dtype=torch.float64)
        new_b = shift_b.to(device=self.device, dtype=torch.float64)
        d_a = (self.shift_a if self.shift_a is not None else zero) - new_a
        d_b = (self.shift_b if self.shift_b is not None else zero) - new_b
        n = self.count
        # Σ (x - new) = Σ (x - old) + n d, and likewise for the products
        self.cross += d_a[:, None] * self.sum_b[None, :] + self.sum_a[:, None] * d_b[None, :] + n * d_a[:, None] * d_b[None, :]
        self.sq_a += 2 * d_a * self.sum_a + n * d_a.square()
        self.sq_b += 2 * d_b * self.sum_b + n * d_b.square()
        self.sum_a += n * d_a
        self.sum_b += n * d_b
        self.shift_a, self.shift_b = new_a, new_b

    def similarity(self, method: str = "correlation") -> torch.Tensor:
        """The ``(n, n)`` similarity of A's unit ``u`` (row) and B's unit ``v`` (column), a
        float64 CPU matrix.

        Args:
            method: ``"correlation"`` (Pearson), ``"covariance"`` or ``"cosine"``.

        Returns:
            The matrix; a unit that never varies (or is always zero, for cosine) has zero
            similarity to every unit.
        """
        n = max(self.count, 1.0)
        zero = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        ca = self.shift_a if self.shift_a is not None else zero
        cb = self.shift_b if self.shift_b is not None else zero
        if method == "cosine":
            cross = self.cross + ca[:, None] * self.sum_b[None, :] + self.sum_a[:, None] * cb[None, :]
            cross += self.count * ca[:, None] * cb[None, :]
            na = (self.sq_a + 2 * ca * self.sum_a + self.count * ca.square()).clamp_min(0).sqrt()
            nb = (self.sq_b + 2 * cb * self.sum_b + self.count * cb.square()).clamp_min(0).sqrt()
            out = cross / (_safe(na)[:, None] * _safe(nb)[None, :])
        else:
            mean_a, mean_b = self.sum_a / n, self.sum_b / n
            out = self.cross / n - mean_a[:, None] * mean_b[None, :]
            if method == "correlation":
                sa = (self.sq_a / n - mean_a.square()).clamp_min(0).sqrt()
                sb = (self.sq_b / n - mean_b.square()).clamp_min(0).sqrt()
                out = out / (_safe(sa)[:, None] * _safe(sb)[None, :])
        return out.cpu()


def _safe(x: torch.Tensor) -> torch.Tensor:
    """``x`` with (near-)zero scales replaced by infinity, so what they divide becomes 0."""
    tiny = x.abs().max().clamp_min(1e-300) * 1e-12
    return torch.where(x > tiny, x, torch.full_like(x, math.inf))


NO_DATA, DATA, FAILED = 0.0, 1.0, 2.0  # rank 0's status, sent with its shifts


def share_shifts(stats: Mapping[tuple[str, ...], ActivationStats], group: Any, rank: int, status: float,
                  timeout: float | timedelta | None, call: str) -> float:
    """Give every rank rank 0's shifts (the means of its first batch) and rank 0's status
    (``DATA``, ``NO_DATA`` or ``FAILED``), which is returned. Sent as a sum to which
    the other ranks add zeros."""
    order = sorted(stats)
    parts = [torch.tensor([status if rank == 0 else 0.0], dtype=torch.float64)]
    for k in order:
        st = stats[k]
        if rank == 0 and status == DATA:
            zero = torch.zeros(st.n, dtype=torch.float64, device=st.device)
            if st.shift_a is None or st.shift_b is None:  # a key the first batch did not reach
                st.shift_a, st.shift_b = zero.clone(), zero.clone()
            parts += [st.shift_a.clone(), st.shift_b.clone()]
        else:
            parts += [torch.zeros(st.n, dtype=torch.float64, device=st.device) for _ in range(2)]
    _dist.all_reduce_sum(parts, group, timeout=timeout, what=f"{call} (rank 0's first batch)")
    got = float(parts[0])
    if rank != 0 and got == DATA:
        for i, k in enumerate(order):
            stats[k].shift_a, stats[k].shift_b = parts[1 + 2 * i], parts[2 + 2 * i]
    return got


def reduce(stats: Mapping[tuple[str, ...], ActivationStats], group: Any, seen: int,
            timeout: float | timedelta | None, call: str, *, shared: bool = False) -> int:
    """Sum every rank's statistics (in place) and return the total number of batches.

    With ``shared`` shifts (every rank's sums are about rank 0's shifts) the sums are added
    as they are. Otherwise each rank's sums are about its own shifts (its first batch's
    means): the ranks first sum their counts and raw sums, every rank re-centres on the
    global means, then the centred sums are added."""
    order = sorted(stats)
    if shared:
        tensors: list[torch.Tensor] = [torch.tensor([float(seen)], dtype=torch.float64)]
        for k in order:
            st = stats[k]
            tensors += [torch.tensor([st.count], dtype=torch.float64, device=st.device),
                        st.sum_a, st.sum_b, st.sq_a, st.sq_b, st.cross]
        _dist.all_reduce_sum(tensors, group, timeout=timeout, what=f"{call} (summing the statistics)")
        for i, k in enumerate(order):
            stats[k].count = float(tensors[1 + 6 * i])
        return int(tensors[0])
    first: list[torch.Tensor] = [torch.tensor([float(seen)], dtype=torch.float64)]
    for k in order:
        st = stats[k]
        zero = torch.zeros(st.n, dtype=torch.float64, device=st.device)
        ca = st.shift_a if st.shift_a is not None else zero
        cb = st.shift_b if st.shift_b is not None else zero
        first += [torch.tensor([st.count], dtype=torch.float64, device=st.device),
                  st.sum_a + st.count * ca, st.sum_b + st.count * cb]
    _dist.all_reduce_sum(first, group, timeout=timeout, what=f"{call} (summing counts and means)")
    second: list[torch.Tensor] = []
    for i, k in enumerate(order):
        st = stats[k]
        count, raw_a, raw_b = float(first[1 + 3 * i]), first[2 + 3 * i], first[3 + 3 * i]
        total = max(count, 1.0)
        st.recentre(raw_a / total, raw_b / total)
        second += [st.sum_a, st.sum_b, st.sq_a, st.sq_b, st.cross]
    _dist.all_reduce_sum(second, group, timeout=timeout, what=f"{call} (summing the statistics)")
    for i, k in enumerate(order):
        stats[k].count = float(first[1 + 3 * i])
    return int(first[0])
