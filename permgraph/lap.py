"""Exact linear assignment: one function, several backends, chosen by measurement.

`solve` finds the permutation ``p`` that maximises (or minimises) ``Σ_i S[i, p[i]]``
for a square matrix ``S``. Every backend is exact (Jonker-Volgenant or the shortest
augmenting path of scipy); they differ only in speed, and in which optimum they return
when several tie. The LAP always runs on the host in float64: a tensor on any device is
copied to a CPU float64 array first.

Backends:

- ``"scipy"``: `linear_sum_assignment` (always available).
- ``"lapjv"``: the ``lapjv`` package (``pip install lapjv``), run with ``force_doubles``
  (its default rounds the costs to float32, which is not exact). Only when asked for by
  name: lapjv 1.3.29 never returns on some matrices (measured: a 128 x 128 correlation cost
  of two ResNet-18s that scipy and lapx solve in milliseconds), so ``"auto"`` never picks it.
- ``"lapx"``: the ``lapx`` package (``pip install lapx``, imported as ``lap``): its
  ``lapjvh`` when present (lapx >= 0.10), else its ``lapjv``.
- ``"auto"``: scipy below :data:`AUTO_MIN_SIZE` units (call overheads dominate there),
  else the first installed of :data:`AUTO_ORDER`. The thresholds come from
  ``benchmarks/lap.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from permgraph.errors import LapError

__all__ = ["solve", "solve_cost", "available_backends", "BACKENDS", "AUTO_MIN_SIZE", "AUTO_ORDER"]

#: Below this size ``"auto"`` uses scipy; measured by ``benchmarks/lap.py``.
AUTO_MIN_SIZE = 32
#: The backends ``"auto"`` tries, fastest first, at or above :data:`AUTO_MIN_SIZE`.
AUTO_ORDER = ("lapx", "scipy")

Solver = Callable[[np.ndarray], np.ndarray]  # cost matrix (to minimise) -> column per row


def _scipy(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(cost)
    return cols


def _lapjv(cost: np.ndarray) -> np.ndarray:
    import lapjv

    rows, _, _ = lapjv.lapjv(cost, force_doubles=True)
    return rows


def _lapx(cost: np.ndarray) -> np.ndarray:
    import lap

    if hasattr(lap, "lapjvh"):  # lapx >= 0.10: 2-3x faster than its lapjv here, as exact
        rows, cols = lap.lapjvh(cost, return_cost=False)
        out = np.empty(cost.shape[0], dtype=np.int64)
        out[np.asarray(rows)] = cols
        return out
    _, x, _ = lap.lapjv(cost, extend_cost=False, return_cost=True)
    return x


#: backend name -> (module that must be importable, solver of a cost matrix to minimise)
BACKENDS: dict[str, tuple[str, Solver]] = {
    "scipy": ("scipy.optimize", _scipy),
    "lapjv": ("lapjv", _lapjv),
    "lapx": ("lap", _lapx),
}

_installed: dict[str, bool] = {}


def _is_installed(name: str) -> bool:
    if name not in _installed:
        module = BACKENDS[name][0]
        ok = importlib.util.find_spec(module.split(".")[0]) is not None
        if ok and name == "lapx":  # another package could own the name ``lap``
            try:
                ok = hasattr(importlib.import_module("lap"), "lapjv")
            except ImportError:
                ok = False
        _installed[name] = ok
    return _installed[name]


def available_backends() -> list[str]:
    """The installed backends, scipy first.

    Returns:
        Names usable as ``backend=`` in `solve` (besides ``"auto"``).
    """
    return [name for name in BACKENDS if _is_installed(name)]


def _pick(n: int, backend: str) -> str:
    if backend == "auto":
        if n < AUTO_MIN_SIZE:
            return "scipy"
        return next(b for b in AUTO_ORDER if _is_installed(b))
    if backend not in BACKENDS:
        raise LapError(
            f"unknown LAP backend {backend!r}; choose 'auto' or one of the installed backends: "
            f"{', '.join(available_backends())} (known: {', '.join(BACKENDS)})"
        )
    if not _is_installed(backend):
        raise LapError(
            f"LAP backend {backend!r} is not installed (pip install {backend}); installed backends: "
            f"{', '.join(available_backends())}"
        )
    return backend


def _as_matrix(similarity: Any) -> np.ndarray:
    if isinstance(similarity, torch.Tensor):
        if similarity.is_complex():
            raise LapError(f"the LAP needs a real matrix, got a {similarity.dtype} tensor")
        m = similarity.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            m = np.asarray(similarity, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise LapError(f"the LAP needs a real 2-D matrix, got {type(similarity).__name__}: {exc}") from exc
    if m.ndim != 2:
        raise LapError(f"the LAP needs a 2-D matrix, got shape {tuple(m.shape)}")
    if m.shape[0] != m.shape[1]:
        raise LapError(
            f"the LAP needs a square matrix (a permutation of n units), got shape {tuple(m.shape)}"
        )
    if not np.isfinite(m).all():
        bad = np.argwhere(~np.isfinite(m))[0]
        raise LapError(
            f"the LAP matrix has a non-finite value ({m[tuple(bad)]}) at {tuple(int(i) for i in bad)}; "
            "check the weights or activations it was built from for NaN/inf"
        )
    return m


def solve(similarity: torch.Tensor | np.ndarray, maximize: bool = True, backend: str = "auto") -> torch.Tensor:
    """Solve the linear assignment problem exactly.

    Args:
        similarity: a square ``(n, n)`` real matrix (a tensor on any device, or an array).
        maximize: maximise ``Σ_i S[i, p[i]]`` (a similarity) when True, else minimise it
            (a cost).
        backend: ``"auto"``, ``"scipy"``, ``"lapjv"`` or ``"lapx"`` (see the module docstring).

    Returns:
        An int64 CPU tensor ``p`` of length ``n``: row ``i`` is assigned column ``p[i]``.

    Raises:
        LapError: the matrix is not 2-D, not square, or holds NaN/inf; or the backend is
            unknown or not installed (the message lists the installed ones).

    Examples:
        >>> import torch
        >>> from permgraph.lap import solve
        >>> solve(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
        [1, 0]
    """
    m = _as_matrix(similarity)
    n = m.shape[0]
    name = _pick(n, backend)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    if n == 1:
        return torch.zeros(1, dtype=torch.int64)
    cost = np.ascontiguousarray(-m if maximize else m)
    cols = BACKENDS[name][1](cost)
    return torch.from_numpy(np.asarray(cols, dtype=np.int64).copy())


def solve_cost(cost: np.ndarray, backend: str = "auto") -> torch.Tensor:
    """Minimise ``Σ_i cost[i, p[i]]`` without checking the matrix: the fast path of callers
    that built it themselves (a matcher in its inner loop).

    When every row's minimum lies in a different column, that assignment is optimal (no
    assignment can do better in any row) and is returned without calling the backend: one
    pass over the matrix, where the near-permutation costs of aligned models (every unit
    has one clear match) would otherwise cost a full solve.

    Args:
        cost: a square, finite, float64, C-contiguous array (not modified).
        backend: as in :func:`solve`.

    Returns:
        An int64 CPU tensor ``p``: row ``i`` is assigned column ``p[i]``.

    Raises:
        LapError: the backend is unknown or not installed.
    """
    n = cost.shape[0]
    name = _pick(n, backend)
    if n <= 1:
        return torch.zeros(n, dtype=torch.int64)
    best = cost.argmin(axis=1)
    if np.bincount(best, minlength=n).max() == 1:  # every row's minimum in its own column
        return torch.from_numpy(best.astype(np.int64))
    cols = BACKENDS[name][1](cost)
    return torch.from_numpy(np.asarray(cols, dtype=np.int64).copy())
