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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from permgraph import lap as _lap
from permgraph.errors import (
    SinkhornError,
    SpecMismatchError,
)
from permgraph.match._common import LayoutInfo, MatchError, check_finite, check_spec
from permgraph.spec import PermSpec

__all__ = ["SinkhornError", "sinkhorn", "sinkhorn_matching", "SinkhornHistory", "soft_apply"]

#: The scalings are folded into the log potentials when ``|log u|`` or ``|log v|`` exceeds this.
ABSORB = 20.0
#: `solver="auto"` solves groups up to this size directly, larger ones by conjugate gradients
#: (on the digits MLPs, 512 units, 200 steps: 7.0 s of conjugate gradients, 8.2 s direct).
DIRECT_MAX = 256


# -- the Sinkhorn operator ---------------------------------------------------------------------


def _check_args(log_alpha: Any, tau: Any, n_iter: Any, tol: Any) -> None:
    if not isinstance(log_alpha, torch.Tensor) or log_alpha.ndim != 2 or log_alpha.shape[0] != log_alpha.shape[1]:
        shape = tuple(log_alpha.shape) if isinstance(log_alpha, torch.Tensor) else type(log_alpha).__name__
        raise SinkhornError(f"sinkhorn needs a square (n, n) matrix, got {shape}")
    if not log_alpha.is_floating_point():
        raise SinkhornError(f"sinkhorn needs a floating-point matrix, got {log_alpha.dtype}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise SinkhornError(f"the temperature tau must be a positive finite number, got {tau!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise SinkhornError(f"n_iter must be a positive int, got {n_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise SinkhornError(f"tol must be a number >= 0, got {tol!r}")


def _nonfinite(t: torch.Tensor, what: str) -> SinkhornError:
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


class _ImplicitSinkhorn(torch.autograd.Function):
    """Sinkhorn with the implicit backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, log_alpha: torch.Tensor, tau: float, n_iter: int, tol: float, solver: str,
                timer: list[float] | None = None) -> torch.Tensor:
        with torch.no_grad():
            work = log_alpha if log_alpha.dtype in (torch.float32, torch.float64) else log_alpha.float()
            p, iters = _stabilised(work / tau, n_iter, tol)
            if not bool(torch.isfinite(p).all()):
                if not bool(torch.isfinite(log_alpha).all()):
                    raise _nonfinite(log_alpha, "the matrix given to sinkhorn")
                raise _nonfinite(p, "the soft permutation")
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
    if solver not in ("auto", "direct", "cg"):
        raise SinkhornError(f"unknown solver {solver!r}; choose 'auto', 'direct' or 'cg'")
    if implicit:
        return _ImplicitSinkhorn.apply(log_alpha, float(tau), n_iter, float(tol), solver, None)
    log_p, _ = _log_iterations(log_alpha / tau, n_iter, tol)
    p = log_p.exp()
    if not bool(torch.isfinite(p.detach()).all()):
        raise _nonfinite(log_alpha if not bool(torch.isfinite(log_alpha).all()) else p, "the soft permutation")
    return p


# -- soft permutations of a state_dict ---------------------------------------------------------


class _SoftPermuter:
    """Applies one ``(n, n)`` matrix per group to a state_dict through the members' layouts.

    New unit ``u`` of a member is ``Σ_v M[u, v]`` old unit ``v``, so a permutation matrix
    ``M[u, p[u]] = 1`` gives exactly ``spec.apply(p, state)``. Groups sharing an axis act on
    disjoint positions or independent factors, so they are applied one after the other.
    """

    def __init__(self, spec: PermSpec) -> None:
        self.plan: dict[str, list[tuple[int, int, LayoutInfo]]] = {}
        for gi, g in enumerate(spec.groups):
            for m in g.members:
                axis_size = spec.shapes[m.key][m.axis]
                lay = LayoutInfo(m.layout.positions(g.size), axis_size)
                self.plan.setdefault(m.key, []).append((m.axis, gi, lay))
        for steps in self.plan.values():
            steps.sort(key=lambda s: s[0])
        self._flat: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def keys(self) -> list[str]:
        return list(self.plan)

    def _index(self, lay: LayoutInfo, device: torch.device) -> torch.Tensor:
        key = (id(lay), device)
        if key not in self._flat:
            self._flat[key] = lay.flat.to(device)
        return self._flat[key]

    def tensor(self, key: str, t: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
        """``t`` (the tensor ``key``) with every group's matrix applied."""
        for axis, gi, lay in self.plan[key]:
            m = mats[gi]
            if lay.whole:
                t = torch.tensordot(m, t, dims=([1], [axis])).movedim(0, axis)
                continue
            moved = t.movedim(axis, 0)
            flat = self._index(lay, t.device)
            rest = moved.shape[1:]
            sel = moved.index_select(0, flat).reshape(*lay.counts, lay.n, lay.block, *rest)
            new = torch.tensordot(m, sel, dims=([1], [len(lay.counts)])).movedim(0, len(lay.counts))
            t = moved.index_copy(0, flat, new.reshape(-1, *rest)).movedim(0, axis)
        return t

    def __call__(self, mats: list[torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(state)
        for key in self.plan:
            out[key] = self.tensor(key, state[key], mats)
        return out


def soft_apply(spec: PermSpec, soft: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Apply one ``(n, n)`` matrix per group to a state_dict (differentiably).

    New unit ``u`` is ``Σ_v soft[g][u, v]`` times old unit ``v`` along every member axis, at
    the member's layout; with permutation matrices (``M[u, p[u]] = 1``) this is exactly
    ``spec.apply(p, state_dict)``.

    Args:
        spec: the PermSpec.
        soft: group name -> ``(n, n)`` matrix (soft permutations from `sinkhorn_matching`).
        state_dict: the state_dict to transform; tensors in no group pass through.

    Returns:
        A new dict; the transformed tensors carry autograd history to ``soft``.

    Raises:
        SpecMismatchError: the state_dict does not match the spec, or a matrix is missing or
            has the wrong shape.

    Examples:
        >>> import torch, permgraph
        >>> from permgraph.match.sinkhorn import soft_apply
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(1, 3))
        >>> p = spec.random_permutation(torch.Generator().manual_seed(0))
        >>> mats = {g: torch.eye(len(v))[v] for g, v in p.items()}
        >>> sd = mlp.state_dict()
        >>> all(torch.equal(soft_apply(spec, mats, sd)[k], spec.apply(p, sd)[k]) for k in sd)
        True
    """
    check_spec(spec)
    spec.check_state_dict(state_dict)
    mats = []
    for g in spec.groups:
        m = soft.get(g.name)
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (g.size, g.size):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise SpecMismatchError(f"soft[{g.name!r}] must be a ({g.size}, {g.size}) matrix, got {got}")
        mats.append(m)
    return _SoftPermuter(spec)(mats, state_dict)


# -- data ---------------------------------------------------------------------------------------


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class _Batches:
    """Cycles over a re-iterable of ``(inputs, targets)`` batches; counts passes."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        if batches is None or isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
            raise MatchError(
                "batches must be a re-iterable of (inputs, targets) pairs, such as a list or a DataLoader, "
                f"got {type(batches).__name__}"
            )
        self.batches = batches
        self.device = device
        self.it: Iterator[Any] = iter(batches)
        self.epochs = 0
        self.seen = 0

    def __iter__(self) -> Iterator[Any]:  # one pass
        for batch in self.batches:
            self.seen += 1
            yield self._check(batch)

    def _check(self, batch: Any) -> Any:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise MatchError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
        return _to(batch, self.device)

    def next(self) -> Any:
        """The next batch; a new pass starts (and ``epochs`` counts it) when one ends."""
        try:
            batch = next(self.it)
            self.seen += 1
            return self._check(batch)
        except StopIteration:
            self.it = iter(self.batches)
            self.epochs += 1
            try:
                batch = next(self.it)
            except StopIteration:
                msg = "batches could not be iterated again" if self.seen else "batches is empty"
                raise MatchError(f"{msg}: pass a re-iterable of (inputs, targets) pairs (a list or a DataLoader)") from None
            return self._check(batch)


def _call(model: torch.nn.Module, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return torch.func.functional_call(model, dict(params), (), dict(inputs), tie_weights=False)
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return torch.func.functional_call(model, dict(params), args, tie_weights=False)


def _batch_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor], batch: Any,
                loss_fn: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return loss_fn(_call(model, params, inputs), targets)


def _midpoint(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``0.5 * (A + B)`` for floating tensors; A's value for the others (counters)."""
    return {k: 0.5 * (a + state_b[k]) if a.is_floating_point() else a for k, a in state_a.items()}


def _default_loss(outputs: Any, targets: Any) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets)


# -- the matcher --------------------------------------------------------------------------------


@dataclass
class SinkhornHistory:
    """What `sinkhorn_matching` did.

    Attributes:
        loss: the objective at each step (with the soft permutations of that step).
        step_seconds: wall time of each step (Sinkhorn, objective, backward, update).
        sinkhorn_seconds: time in the Sinkhorn forward passes, all steps.
        backward_seconds: time in the implicit backward passes of Sinkhorn, all steps.
        iterations: Sinkhorn iterations per step, summed over the groups.
        rounding_seconds: time of the final LAPs.
        seconds: wall time of the whole call.
    """

    loss: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    sinkhorn_seconds: float = 0.0
    backward_seconds: float = 0.0
    iterations: list[int] = field(default_factory=list)
    rounding_seconds: float = 0.0
    seconds: float = 0.0


def _validate_states(spec: PermSpec, state_a: Any, state_b: Any) -> None:
    check_spec(spec)
    for what, sd in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(sd, Mapping):
            raise SpecMismatchError(f"{what} must be a state_dict (a mapping of names to tensors), got {type(sd).__name__}")
        spec.check_state_dict(sd, what)
    keys = [k for k in spec.shapes if isinstance(state_a[k], torch.Tensor)]
    check_finite(state_a, keys, "state_a")
    check_finite(state_b, keys, "state_b")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MatchError(f"{what} must be a positive int, got {value!r}")
    return value


def _positive_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MatchError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def sinkhorn_matching(
    spec: PermSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    objective: str | Callable[[dict[str, torch.Tensor]], torch.Tensor] = "l2",
    model: torch.nn.Module | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    tau: float = 1.0,
    steps: int = 200,
    lr: float = 0.1,
    n_iter: int = 20,
    tol: float = 1e-6,
    solver: str = "auto",
    lap: str = "auto",
    seed: int = 0,
    progress: bool = False,
    return_soft: bool = False,
    return_history: bool = False,
) -> dict[str, torch.Tensor] | tuple[Any, ...]:
    """Align B to A with learned soft permutations (Sinkhorn re-basin, Peña et al. 2023).

    Each group ``g`` gets a parameter matrix ``θ_g`` (``n x n``, small seeded noise at
    first); its soft permutation is ``P_g = sinkhorn(θ_g, tau)``, differentiated
    implicitly. The soft permutations act on B through every member's layout (new unit
    ``u`` = ``Σ_v P_g[u, v]`` old unit ``v``; groups that share an axis compose), giving
    ``P(B)``. Adam minimises the objective over the ``θ``; at the end each ``θ_g`` is
    rounded to the hard permutation maximising ``Σ_u θ_g[u, p[u]]`` (one LAP).

    Objectives:

    - ``"l2"``: ``Σ_T ||A_T - P(B)_T||²`` over the floating-point tensors of the state_dict.
    - ``"midpoint"``: the loss of ``model`` at ``0.5 * (A + P(B))`` on one batch per step
      (``torch.func.functional_call``; the model is run in its current train/eval mode and
      is not modified).
    - a callable ``objective(soft_b) -> scalar tensor`` to minimise, given the whole of
      ``P(B)`` as a state_dict (differentiable in the soft permutations).

    Args:
        spec: the PermSpec of the architecture (`permgraph.infer`).
        state_a: the reference state_dict.
        state_b: the state_dict to align (same keys and shapes); read on ``state_a``'s device.
        objective: ``"l2"``, ``"midpoint"`` or a callable (above).
        model: the architecture, for ``"midpoint"``.
        batches: a re-iterable of ``(inputs, targets)`` pairs, for ``"midpoint"``; one per
            step, cycling. ``inputs`` is a tensor, a tuple of positional arguments or a dict
            of keyword arguments.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (default: cross-entropy).
        tau: the Sinkhorn temperature, > 0 (lower: sharper soft permutations).
        steps: optimisation steps.
        lr: Adam's learning rate on the ``θ``.
        n_iter: the most Sinkhorn iterations per group and step.
        tol: Sinkhorn's stopping tolerance on the column sums.
        solver: the implicit backward's linear solver (see `sinkhorn`).
        lap: the LAP backend of the final rounding (see `permgraph.lap.solve`).
        seed: seed of the initial noise.
        progress: show a tqdm bar over the steps.
        return_soft: also return the soft permutations of the last ``θ`` (group name ->
            ``(n, n)`` doubly stochastic matrix, detached).
        return_history: also return a `SinkhornHistory`.

    Returns:
        The permutation (group name -> int64 CPU tensor; ``spec.apply(perm, state_b)`` is B
        aligned to A), or a tuple ``(perm, soft, history)`` holding the extras asked for,
        in that order.

    Raises:
        SpecMismatchError: a state_dict does not match the spec (different architectures),
            or holds NaN/inf.
        SinkhornError: ``tau <= 0``, or a soft permutation became non-finite (the message
            says what to change).
        MatchError: an unknown objective, ``"midpoint"`` without a model or batches, or a bad
            ``steps``/``lr``/``n_iter``.
        LapError: the LAP backend is unknown or not installed.

    Examples:
        >>> import torch, permgraph
        >>> from permgraph.match.sinkhorn import sinkhorn_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> a = mlp.state_dict()
        >>> b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(0)), a)
        >>> perm = sinkhorn_matching(spec, a, b, steps=50)
        >>> all(torch.equal(spec.apply(perm, b)[k], a[k]) for k in a)
        True
    """
    t_start = time.perf_counter()
    _validate_states(spec, state_a, state_b)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise SinkhornError(f"the temperature tau must be a positive finite number, got {tau!r}")
    steps = _positive_int(steps, "steps")
    n_iter = _positive_int(n_iter, "n_iter")
    lr = _positive_float(lr, "lr")
    if solver not in ("auto", "direct", "cg"):
        raise SinkhornError(f"unknown solver {solver!r}; choose 'auto', 'direct' or 'cg'")
    _lap._pick(2, lap)
    if isinstance(objective, str):
        if objective not in ("l2", "midpoint"):
            raise MatchError(f"unknown objective {objective!r}; choose 'l2', 'midpoint' or pass a callable")
    elif not callable(objective):
        raise MatchError(f"objective must be 'l2', 'midpoint' or a callable, got {type(objective).__name__}")
    hist = SinkhornHistory()
    if not spec.groups:
        hist.seconds = time.perf_counter() - t_start
        return _pack({}, {}, hist, return_soft, return_history)

    device = next(t.device for t in state_a.values() if isinstance(t, torch.Tensor))
    a = {k: v.detach() for k, v in state_a.items()}
    b = {k: v.detach().to(device) if isinstance(v, torch.Tensor) else v for k, v in state_b.items()}
    for k, v in a.items():  # low precision weights: the objective runs in float32
        if v.is_floating_point() and v.dtype in (torch.float16, torch.bfloat16):
            a[k], b[k] = v.float(), b[k].float()
    dtype = next((v.dtype for v in a.values() if v.is_floating_point()), torch.float32)
    permuter = _SoftPermuter(spec)
    loss_of = _objective(objective, spec, a, b, permuter, model, batches, loss_fn, device)

    gen = torch.Generator().manual_seed(seed)
    thetas = [
        (0.01 * torch.randn(g.size, g.size, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
        .requires_grad_()
        for g in spec.groups
    ]
    opt = torch.optim.Adam(thetas, lr=lr)
    timer = [0.0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="sinkhorn matching", unit="step")
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            soft = []
            iters = 0
            for gi, theta in enumerate(thetas):
                try:
                    p = _ImplicitSinkhorn.apply(theta, float(tau), n_iter, float(tol), solver, timer)
                except SinkhornError as exc:
                    raise SinkhornError(f"group {spec.groups[gi].name!r}, step {len(hist.loss) + 1}: {exc}") from None
                iters += p.grad_fn.iters if p.grad_fn is not None else 0
                soft.append(p)
            hist.sinkhorn_seconds += time.perf_counter() - t0
            loss = loss_of(soft)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SinkhornError(
                    f"the objective is {value} at step {len(hist.loss) + 1}: lower the learning rate, raise the "
                    "temperature, or check the objective (and the data) for NaN/inf"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist.loss.append(value)
            hist.iterations.append(iters)
            hist.step_seconds.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.6g}")
    finally:
        if bar is not None:
            bar.close()

    t0 = time.perf_counter()
    perm: dict[str, torch.Tensor] = {}
    for g, theta in zip(spec.groups, thetas):
        th = theta.detach()
        if not bool(torch.isfinite(th).all()):
            raise _nonfinite(th, f"the learned matrix of group {g.name!r}")
        perm[g.name] = _lap.solve(th, maximize=True, backend=lap)
    hist.rounding_seconds = time.perf_counter() - t0
    hist.backward_seconds = timer[0]
    soft_out: dict[str, torch.Tensor] = {}
    if return_soft:
        soft_out = {g.name: sinkhorn(th.detach(), tau, n_iter, tol) for g, th in zip(spec.groups, thetas)}
    hist.seconds = time.perf_counter() - t_start
    return _pack(perm, soft_out, hist, return_soft, return_history)


def _pack(perm: dict[str, torch.Tensor], soft: dict[str, torch.Tensor], hist: SinkhornHistory,
          return_soft: bool, return_history: bool) -> Any:
    extras: list[Any] = ([soft] if return_soft else []) + ([hist] if return_history else [])
    return (perm, *extras) if extras else perm


def _objective(
    objective: str | Callable[[dict[str, torch.Tensor]], torch.Tensor],
    spec: PermSpec,
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    permuter: _SoftPermuter,
    model: torch.nn.Module | None,
    batches: Iterable[Any] | None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    device: torch.device,
) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The loss of one step as a function of the soft permutations."""
    if objective == "l2":
        keys = [k for k in permuter.keys if a[k].is_floating_point()]
        rest = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a if k not in permuter.plan and a[k].is_floating_point())

        def l2(soft: list[torch.Tensor]) -> torch.Tensor:
            total = torch.zeros((), dtype=soft[0].dtype, device=device)
            for k in keys:
                total = total + (a[k] - permuter.tensor(k, b[k], soft)).pow(2).sum()
            return total + rest

        return l2
    if objective == "midpoint":
        if model is None or not isinstance(model, torch.nn.Module):
            raise MatchError("objective='midpoint' needs model= (the architecture, an nn.Module)")
        spec.check_state_dict(model.state_dict(), "model.state_dict()")
        data = _Batches(batches, device)
        fn = loss_fn or _default_loss

        def midpoint(soft: list[torch.Tensor]) -> torch.Tensor:
            return _batch_loss(model, _midpoint(a, permuter(soft, b)), data.next(), fn)

        return midpoint
    assert callable(objective)
    user = objective

    def custom(soft: list[torch.Tensor]) -> torch.Tensor:
        out = user(permuter(soft, b))
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise MatchError(f"the objective callable must return a scalar tensor, got {type(out).__name__}")
        return out.reshape(())

    return custom
