"""Sinkhorn re-basin (Peña et al. 2023): soft permutations learned by gradient, with
gradients through Sinkhorn by implicit differentiation of its fixed point.

The Sinkhorn operator and its implicit backward are in `permgraph.match._implicit`
(`sinkhorn`, re-exported here); the soft permutations of a state_dict in
`permgraph.match._soft` (`soft_apply`, re-exported here); this module is the matcher.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from permgraph import lap as _lap
from permgraph.errors import MatchError, SinkhornError, SpecMismatchError
from permgraph.match._common import check_finite, check_spec
from permgraph.match._implicit import DIRECT_MAX, ImplicitSinkhorn, check_solver, check_tau, nonfinite_error, sinkhorn
from permgraph.match._objective import Batches, batch_loss, default_loss, midpoint, positive_float, positive_int
from permgraph.match._soft import SoftPermuter, soft_apply
from permgraph.spec import PermSpec

__all__ = ["SinkhornError", "sinkhorn", "sinkhorn_matching", "SinkhornHistory", "soft_apply", "DIRECT_MAX"]


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
    check_tau(tau)
    steps = positive_int(steps, "steps")
    n_iter = positive_int(n_iter, "n_iter")
    lr = positive_float(lr, "lr")
    check_solver(solver)
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
    permuter = SoftPermuter(spec)
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
                    p = ImplicitSinkhorn.apply(theta, float(tau), n_iter, float(tol), solver, timer)
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
            raise nonfinite_error(th, f"the learned matrix of group {g.name!r}")
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
    permuter: SoftPermuter,
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
        data = Batches(batches, device)
        fn = loss_fn or default_loss

        def midpoint_loss(soft: list[torch.Tensor]) -> torch.Tensor:
            return batch_loss(model, midpoint(a, permuter(soft, b)), data.next(), fn)

        return midpoint_loss
    assert callable(objective)
    user = objective

    def custom(soft: list[torch.Tensor]) -> torch.Tensor:
        out = user(permuter(soft, b))
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise MatchError(f"the objective callable must return a scalar tensor, got {type(out).__name__}")
        return out.reshape(())

    return custom

