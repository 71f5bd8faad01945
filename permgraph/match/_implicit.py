"""Sinkhorn re-basin (Peña et al. 2023): soft permutations learned by gradient, with
gradients through Sinkhorn by implicit differentiation of its fixed point.

**The soft permutation.** For a square matrix ``θ`` and a temperature ``τ``, `sinkhorn`
returns the doubly stochastic matrix ``P = diag(e^f) exp(θ/τ) diag(e^g)`` whose rows and
columns sum to one; each iteration normalises the columns, then the rows. The potentials
``f``, ``g`` are kept in the log domain; the iterations scale an exponentiated kernel
``exp(θ/τ + f + g)`` (two matrix-vector products each) and fold the scalings back into the
potentials whenever they leave ``[e^-20, e^20]``, so nothing overflows at any temperature
("log-stabilised" Sinkhorn). Its iterates are those of the plain log-domain iteration
(``g = -logsumexp(θ/τ + f)`` over the rows of each column, then ``f`` likewise), which
`sinkhorn` runs when asked to unroll.

**The implicit gradient.** At the fixed point ``P_ij = exp(x_ij + f_i + g_j)`` (``x = θ/τ``)
with row sums ``r`` and column sums ``c``. Differentiating the two marginal constraints
gives ``[[diag r, P], [Pᵀ, diag c]] [df; dg] = -[(P∘dx)1; (P∘dx)ᵀ1]``; for an upstream
gradient ``G = ∂L/∂P`` the adjoint of that system is

    [[diag r, P], [Pᵀ, diag c]] [α; β] = [(G∘P)1; (G∘P)ᵀ1],    ∂L/∂x = P ∘ (G - α1ᵀ - 1βᵀ).

The system is singular along ``(1, -1)`` (a constant can move from ``f`` to ``g``), and the
right-hand side is orthogonal to it. Eliminating ``α = (a - Pβ)/r`` leaves the symmetric
positive semi-definite ``n x n`` system ``(diag c - Pᵀ diag(1/r) P) β = b - Pᵀ(a/r)`` whose
null space is the constant vector; adding ``11ᵀ/n`` makes it definite without changing the
solution. It is solved directly (Cholesky, float64) or by conjugate gradients in ``P``'s
precision (see `sinkhorn`). Only ``P`` is kept for the backward pass, so memory does not
grow with the number of iterations: the forward runs under ``torch.no_grad``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from permgraph.errors import SinkhornError

__all__ = ["sinkhorn", "ImplicitSinkhorn", "check_tau", "check_solver", "nonfinite_error", "ABSORB", "DIRECT_MAX"]

#: The scalings are folded into the log potentials when ``|log u|`` or ``|log v|`` exceeds this.
ABSORB = 20.0
#: `solver="auto"` solves groups up to this size directly, larger ones by conjugate gradients
#: (on the digits MLPs, 512 units, 200 steps: 7.0 s of conjugate gradients, 8.2 s direct).
DIRECT_MAX = 256


def check_tau(tau: Any) -> float:
    """``tau`` as a float if it is a finite number > 0; :class:`SinkhornError` otherwise."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise SinkhornError(f"the temperature tau must be a positive finite number, got {tau!r}")
    return float(tau)


def check_solver(solver: Any) -> str:
    """``solver`` if it names a backward solver; :class:`SinkhornError` otherwise."""
    if solver not in ("auto", "direct", "cg"):
        raise SinkhornError(f"unknown solver {solver!r}; choose 'auto', 'direct' or 'cg'")
    return solver


def _check_args(log_alpha: Any, tau: Any, n_iter: Any, tol: Any) -> None:
    if not isinstance(log_alpha, torch.Tensor) or log_alpha.ndim != 2 or log_alpha.shape[0] != log_alpha.shape[1]:
        shape = tuple(log_alpha.shape) if isinstance(log_alpha, torch.Tensor) else type(log_alpha).__name__
        raise SinkhornError(f"sinkhorn needs a square (n, n) matrix, got {shape}")
    if not log_alpha.is_floating_point():
        raise SinkhornError(f"sinkhorn needs a floating-point matrix, got {log_alpha.dtype}")
    check_tau(tau)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise SinkhornError(f"n_iter must be a positive int, got {n_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise SinkhornError(f"tol must be a number >= 0, got {tol!r}")


def nonfinite_error(t: torch.Tensor, what: str) -> SinkhornError:
    """The :class:`SinkhornError` for a non-finite ``t`` (counts its NaN and inf; says what to change)."""
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return SinkhornError(
        f"{what} has non-finite values ({nan} NaN, {inf} inf of {t.numel()}): the learned matrix or the "
        "objective diverged; lower the learning rate, raise the temperature, or check the objective for NaN"
    )


def _log_iterations(x: torch.Tensor, n_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    """Plain log-domain Sinkhorn on ``x`` (differentiable when ``x`` requires grad): each
    iteration normalises the columns, then the rows. Returns ``log P`` (rows sum to one)
    and the iterations run."""
    check = x.device.type == "cpu"
    for it in range(1, n_iter + 1):
        x = x - torch.logsumexp(x, dim=0, keepdim=True)
        x = x - torch.logsumexp(x, dim=1, keepdim=True)
        if tol and it < n_iter and (check or it % 10 == 0):
            err = (x.detach().exp().sum(0) - 1).abs().max()
            if float(err) <= tol:
                return x, it
    return x, n_iter


def _stabilised(x: torch.Tensor, n_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    """Log-stabilised Sinkhorn on ``x`` (no autograd); returns ``P`` (rows sum to one) and
    the iterations run. The same iterates as `_log_iterations`, computed differently.

    The first iteration is an exact log-domain one (columns, then rows: every row then sums
    to one and every column to at least ``1/n``). The others scale the kernel
    ``K = exp(x + f + g)``: ``v = 1/(Kᵀ u)``, ``u = 1/(K v)``; ``u``, ``v`` are folded into
    the potentials ``f``, ``g`` (and ``K`` recomputed) when they leave ``[e^-ABSORB, e^ABSORB]``.
    """
    check = x.device.type == "cpu"
    g = -torch.logsumexp(x, dim=0)
    f = -torch.logsumexp(x + g[None, :], dim=1)
    kernel = torch.exp(x + f[:, None] + g[None, :])
    u = torch.ones_like(f)
    v = torch.ones_like(g)
    it = 1
    while it < n_iter:
        ktu = kernel.T @ u
        if tol and (check or it % 10 == 0):  # the column error of the current iterate
            if float((ktu * v - 1).abs().max()) <= tol:
                break
        v = 1 / ktu
        u = 1 / (kernel @ v)
        it += 1
        if check or it % 10 == 0:
            big = torch.maximum(u.log().abs().max(), v.log().abs().max())
            if not float(big) < ABSORB:  # also inf / NaN: a row or column underflowed
                if bool(torch.isfinite(big)):
                    f, g = f + u.log(), g + v.log()
                else:  # redo this iteration in the log domain
                    g = -torch.logsumexp(x + f[:, None], dim=0)
                    f = -torch.logsumexp(x + g[None, :], dim=1)
                kernel = torch.exp(x + f[:, None] + g[None, :])
                u, v = torch.ones_like(u), torch.ones_like(v)
    return kernel * u[:, None] * v[None, :], it


def _adjoint_direct(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the adjoint system (module docstring) for ``α``, ``β`` by Cholesky in float64."""
    n = p.shape[0]
    r, c = p.sum(1), p.sum(0)
    m = -(p.T @ (p / r[:, None]))
    m.diagonal().add_(c)
    m.add_(1.0 / n)
    rhs = b - p.T @ (a / r)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        beta = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
    else:  # semi-definite to rounding (a nearly hard P): LU copes
        beta = torch.linalg.solve(m, rhs)
    alpha = (a - p @ beta) / r
    return alpha, beta


def _adjoint_cg(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-8, max_iter: int = 500
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The same system by conjugate gradients on ``(diag c - Pᵀ diag(1/r) P + 11ᵀ/n) β``,
    Jacobi-preconditioned; each iteration is two matrix-vector products.

    Starts from ``β = 0``, which is exact when ``P`` is a hard permutation (the gradient
    then vanishes); stops at ``rtol`` relative residual, on a breakdown (no curvature left
    along the search direction: a nearly hard ``P``) or after ``max_iter`` iterations, and
    returns the best iterate.
    """
    n = p.shape[0]
    r, c = p.sum(1), p.sum(0)
    pr = p / r[:, None]
    diag = (c - (p * pr).sum(0) + 1.0 / n).clamp_min(1.0 / n)

    def op(z: torch.Tensor) -> torch.Tensor:
        return c * z - pr.T @ (p @ z) + z.sum() / n

    rhs = b - p.T @ (a / r)
    beta = torch.zeros_like(rhs)
    res = rhs.clone()
    res_norm = float(res.norm())
    stop = rtol * res_norm
    best, best_norm = beta.clone(), res_norm
    z = res / diag
    d = z.clone()
    rz = res @ z
    it = 0
    while it < max_iter and res_norm > stop and stop > 0:
        it += 1
        q = op(d)
        curv = float(d @ q)
        if not curv > 1e-300 or not math.isfinite(curv):
            break
        step = rz / curv
        beta += step * d
        res -= step * q
        res_norm = float(res.norm())
        if not math.isfinite(res_norm):
            break
        if res_norm < best_norm:
            best, best_norm = beta.clone(), res_norm
        z = res / diag
        rz_new = res @ z
        d = z + (rz_new / rz) * d
        rz = rz_new
    alpha = (a - p @ best) / r
    return alpha, best, it


class ImplicitSinkhorn(torch.autograd.Function):
    """Sinkhorn with the implicit backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, log_alpha: torch.Tensor, tau: float, n_iter: int, tol: float, solver: str,
                timer: list[float] | None = None) -> torch.Tensor:
        with torch.no_grad():
            work = log_alpha if log_alpha.dtype in (torch.float32, torch.float64) else log_alpha.float()
            p, iters = _stabilised(work / tau, n_iter, tol)
            if not bool(torch.isfinite(p).all()):
                if not bool(torch.isfinite(log_alpha).all()):
                    raise nonfinite_error(log_alpha, "the matrix given to sinkhorn")
                raise nonfinite_error(p, "the soft permutation")
        ctx.save_for_backward(p)
        ctx.tau = tau
        ctx.solver = solver
        ctx.iters = iters
        ctx.timer = timer
        return p.to(log_alpha.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        t0 = time.perf_counter()
        (p,) = ctx.saved_tensors
        n = p.shape[0]
        solver = ctx.solver if ctx.solver != "auto" else ("direct" if n <= DIRECT_MAX else "cg")
        if solver == "direct":  # float64: the system is near-singular for a sharp P
            pw, gw = p.double(), grad.double()
            gp = gw * pw
            alpha, beta = _adjoint_direct(pw, gp.sum(1), gp.sum(0))
        else:  # in P's precision: the safeguarded iteration copes, at half the memory traffic
            pw, gw = p, grad.to(p.dtype)
            gp = gw * pw
            rtol = 1e-6 if p.dtype == torch.float32 else 1e-10
            alpha, beta, ctx.cg_iters = _adjoint_cg(pw, gp.sum(1), gp.sum(0), rtol=rtol)
        out = (pw * (gw - alpha[:, None] - beta[None, :]) / ctx.tau).to(grad.dtype)
        if ctx.timer is not None:
            ctx.timer[0] += time.perf_counter() - t0
        return out, None, None, None, None, None


def sinkhorn(
    log_alpha: torch.Tensor,
    tau: float = 1.0,
    n_iter: int = 100,
    tol: float = 1e-6,
    *,
    implicit: bool = True,
    solver: str = "auto",
) -> torch.Tensor:
    """The doubly stochastic matrix nearest ``exp(log_alpha / tau)`` (Sinkhorn scaling).

    Rows of the result sum to one exactly, columns within ``tol`` once converged (or as
    close as ``n_iter`` iterations get: Sinkhorn slows down as ``tau`` falls). As
    ``tau`` falls the result approaches the permutation matrix that maximises
    ``Σ_u log_alpha[u, p[u]]``.

    Args:
        log_alpha: a square ``(n, n)`` floating-point matrix (any device).
        tau: the temperature, > 0.
        n_iter: the most iterations (each scales the columns and then the rows).
        tol: stop once every column sum is within ``tol`` of one (0: run ``n_iter``).
        implicit: differentiate by the implicit function theorem at the fixed point
            (memory independent of ``n_iter``); False unrolls the plain log-domain
            iterations through autograd (memory grows with ``n_iter``; for comparison).
        solver: how the implicit backward solves its linear system: ``"direct"``
            (Cholesky in float64, ``O(n³)``), ``"cg"`` (conjugate gradients, ``O(n²)`` per
            iteration) or ``"auto"`` (direct up to `DIRECT_MAX` units).

    Returns:
        The ``(n, n)`` soft permutation, in ``log_alpha``'s dtype and device.

    Raises:
        SinkhornError: ``log_alpha`` is not a square float matrix, ``tau <= 0``,
            ``n_iter < 1``, ``tol < 0``, an unknown ``solver``, or the result is not finite
            (``log_alpha`` holds NaN/inf).

    Examples:
        >>> import torch
        >>> from permgraph.match.sinkhorn import sinkhorn
        >>> p = sinkhorn(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), tau=0.5)
        >>> bool(torch.allclose(p.sum(0), torch.ones(2)) and torch.allclose(p.sum(1), torch.ones(2)))
        True
        >>> p.diagonal() > 0.98
        tensor([True, True])
    """
    _check_args(log_alpha, tau, n_iter, tol)
    check_solver(solver)
    if implicit:
        return ImplicitSinkhorn.apply(log_alpha, float(tau), n_iter, float(tol), solver, None)
    log_p, _ = _log_iterations(log_alpha / tau, n_iter, tol)
    p = log_p.exp()
    if not bool(torch.isfinite(p.detach()).all()):
        raise nonfinite_error(log_alpha if not bool(torch.isfinite(log_alpha).all()) else p, "the soft permutation")
    return p

