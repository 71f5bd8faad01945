"""Gradient matching: permutations found from the loss's gradients, without training
(Benzing et al. 2022, Appendix B).

At initialisation two networks' weights say nothing about which units correspond, but the
loss's gradients do. For the permutation ``P`` wanted, moving from A towards ``P(B)`` lowers
the loss, so the direction ``P(B) - A`` should point along a descent direction ``d_A`` at A;
symmetrically, ``P⁻¹(A) - B`` along ``d_B`` at B. Benzing et al.'s symmetrised first-order
objective (their eq. 4, with ``d = -∇L``) is therefore, dropping the constants and using
``<P⁻¹(A), d_B> = <A, P(d_B)>``:

    maximise  J(P) = Σ_T <d_A,T, P(B)_T> + <A_T, P(d_B)_T>

over the tensors ``T`` that some group permutes. Like weight matching's objective it is, with
every group but one fixed, linear in that group's permutation: its similarity matrix is the
sum of `similarity_matrices` of ``(d_A, B)`` and of ``(A, d_B)``, so the same coordinate
descent (one LAP per group, groups in random order, sweeps until none changes) maximises it.

The paper finds the plain gradient too weak and uses the update direction of FOOF (Benzing
2022), a Kronecker-factored preconditioner: for a linear layer with gradient ``G`` and input
second moment ``C = E[x xᵀ]``, the direction ``-G (C + λ I)⁻¹``. `loss_directions` gives both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from permgraph import lap as _lap
from permgraph.errors import SpecMismatchError
from permgraph.match._common import MatchError
from permgraph.match._objective import call, check_batch, default_loss, positive_int
from permgraph.match.weight import similarity_matrices
from permgraph.spec import PermSpec

__all__ = ["gradient_matching", "gradient_objective", "loss_directions", "GradientMatchingHistory"]

RTOL = 1e-12  # a step is kept when it raises the objective by more than this, relative


@dataclass
class GradientMatchingHistory:
    """What `gradient_matching` did.

    Attributes:
        objective: ``J`` at the start and after each sweep.
        changed: per sweep, the names of the groups whose permutation changed.
        sweeps: the number of sweeps run.
        converged: a sweep changed nothing (False: ``max_iter`` was reached).
        seconds: wall time.
    """

    objective: list[float] = field(default_factory=list)
    changed: list[list[str]] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = False
    seconds: float = 0.0


def _full(spec: PermSpec, state: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], what: str
          ) -> dict[str, torch.Tensor]:
    """``direction`` completed with zeros for the keys it lacks (buffers), checked against ``state``."""
    if not isinstance(direction, Mapping):
        raise MatchError(f"{what} must be a mapping of state_dict keys to tensors, got {type(direction).__name__}")
    extra = sorted(set(direction) - set(state))
    if extra:
        raise SpecMismatchError(f"{what} has keys the state_dict lacks: {extra[:4]}; pass directions of this model's "
                                "parameters (loss_directions(model, ...) gives them)")
    out = {}
    for k, v in state.items():
        d = direction.get(k)
        if d is None:
            out[k] = torch.zeros_like(v)
            continue
        if not isinstance(d, torch.Tensor) or tuple(d.shape) != tuple(v.shape):
            got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise SpecMismatchError(f"{what}[{k!r}] has shape {got}, the state_dict's tensor {tuple(v.shape)}")
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise SpecMismatchError(f"{what}[{k!r}] holds NaN or inf: check the loss and the data it was computed on")
        out[k] = d.detach().to(device=v.device, dtype=v.dtype) if v.is_floating_point() else v
    return out


def gradient_objective(spec: PermSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                       direction_a: Mapping[str, torch.Tensor], direction_b: Mapping[str, torch.Tensor],
                       perm: Mapping[str, torch.Tensor]) -> float:
    """``J(P) = Σ_T <d_A, P(B)> + <A, P(d_B)>`` over the floating-point tensors (see the module docstring).

    Args:
        spec: the PermSpec of the architecture.
        state_a: the reference state_dict.
        state_b: the state_dict to align.
        direction_a: descent directions at A (state_dict keys -> tensors; missing keys count as zero).
        direction_b: descent directions at B.
        perm: the permutation of B's units.

    Returns:
        The objective, a float.

    Raises:
        SpecMismatchError: a state_dict or direction does not match the spec.
        PermutationError: ``perm`` is not a permutation of every group.
    """
    spec.check_state_dict(state_a, "state_a")
    spec.check_state_dict(state_b, "state_b")
    da, db = _full(spec, state_a, direction_a, "direction_a"), _full(spec, state_b, direction_b, "direction_b")
    pb, pdb = spec.apply(perm, state_b), spec.apply(perm, db)
    total = 0.0
    for k, a in state_a.items():
        if a.is_floating_point():
            total += float((da[k].double() * pb[k].double()).sum() + (a.double() * pdb[k].double()).sum())
    return total


def gradient_matching(
    spec: PermSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    direction_a: Mapping[str, torch.Tensor],
    direction_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    lap: str = "auto",
    init: Mapping[str, torch.Tensor] | None = None,
    return_history: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], GradientMatchingHistory]:
    """Align B to A from descent directions, as at initialisation (Benzing et al., App. B, eq. 4).

    Maximises ``J(P) = Σ_T <d_A,T, P(B)_T> + <A_T, P(d_B)_T>`` by coordinate descent: each
    visit of a group takes the LAP of its similarity matrix with the other groups fixed
    (``similarity_matrices(d_A, B) + similarity_matrices(A, d_B)``), kept when ``J`` rises;
    groups are visited in a random order drawn from ``seed``, sweep after sweep, until a
    sweep changes nothing or ``max_iter`` sweeps ran. Each visit recomputes every group's
    matrix, which is cheap for MLPs and small CNNs.

    Args:
        spec: the PermSpec of the architecture (`permgraph.infer`).
        state_a: the reference state_dict (A).
        state_b: the state_dict to align (B), same keys and shapes.
        direction_a: descent directions at A, state_dict key -> tensor (``-∇L``, or the
            preconditioned update of `loss_directions`); keys it lacks count as zero.
        direction_b: descent directions at B.
        seed: seed of the visiting order.
        max_iter: the most sweeps, a positive int.
        lap: the LAP backend (see `permgraph.lap.solve`).
        init: the starting permutation (default: the identity).
        return_history: also return a `GradientMatchingHistory`.

    Returns:
        The permutation, group name -> int64 CPU tensor, such that ``spec.apply(perm,
        state_b)`` is B aligned to A; with ``return_history=True`` the pair ``(perm, history)``.

    Raises:
        SpecMismatchError: a state_dict or a direction does not match the spec (the key is
            named), or a direction holds NaN/inf.
        PermutationError: ``init`` is not a permutation of every group.
        MatchError: ``max_iter`` is not a positive int, or a direction is not a mapping.
        LapError: the LAP backend is unknown or not installed.

    Example:
        With the weights themselves as directions, ``J`` is twice weight matching's
        objective, so a permuted copy is recovered exactly:

        >>> import torch, permgraph
        >>> from permgraph.match.gradient import gradient_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> a = mlp.state_dict()
        >>> b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(0)), a)
        >>> perm = gradient_matching(spec, a, b, a, b)
        >>> all(torch.equal(spec.apply(perm, b)[k], a[k]) for k in a)
        True
    """
    t0 = time.perf_counter()
    positive_int(max_iter, "max_iter")
    spec.check_state_dict(state_a, "state_a")
    spec.check_state_dict(state_b, "state_b")
    da, db = _full(spec, state_a, direction_a, "direction_a"), _full(spec, state_b, direction_b, "direction_b")
    perm = {k: v.clone() for k, v in (spec.identity() if init is None else init).items()}
    spec.check_permutation(perm)
    hist = GradientMatchingHistory()
    value = gradient_objective(spec, state_a, state_b, da, db, perm)
    hist.objective.append(value)
    gen = torch.Generator().manual_seed(seed)
    names = [g.name for g in spec.groups]
    for _ in range(max_iter):
        changed: list[str] = []
        for gi in torch.randperm(len(names), generator=gen).tolist():
            name = names[gi]
            s = similarity_matrices(spec, da, state_b, perm)[name] + similarity_matrices(spec, state_a, db, perm)[name]
            new = _lap.solve(s, maximize=True, backend=lap)
            if torch.equal(new, perm[name]):
                continue
            trial = dict(perm)
            trial[name] = new
            v = gradient_objective(spec, state_a, state_b, da, db, trial)
            if v > value + RTOL * max(abs(value), 1.0):
                perm, value = trial, v
                changed.append(name)
        hist.sweeps += 1
        hist.objective.append(value)
        hist.changed.append(changed)
        if not changed:
            hist.converged = True
            break
    hist.seconds = time.perf_counter() - t0
    return (perm, hist) if return_history else perm


def loss_directions(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    precondition: str = "none",
    damping: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Descent directions of ``model``'s loss over data, as `gradient_matching` reads them.

    Args:
        model: the model (its mode is kept; it is not modified; gradients it held are restored).
        batches: an iterable of ``(inputs, targets)`` pairs; ``inputs`` is a tensor or a tuple
            of positional arguments. The loss is averaged over the batches (weighted by size).
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean`` (default: cross-entropy).
        precondition: ``"none"``: ``-∇L``; ``"foof"``: for each ``nn.Linear`` weight, the
            FOOF direction ``-G (C + λ I)⁻¹`` with ``C`` the mean outer product of the layer's
            inputs and ``λ = damping · tr(C) / dim`` (other parameters keep ``-∇L``).
        damping: the relative damping of FOOF, > 0 (large: towards a rescaled ``-∇L``). The
            default, 1, matched best on digits MLPs (``docs/science/permuted_inits.md``).

    Returns:
        Parameter name (as in ``model.state_dict()``) -> direction tensor (detached).

    Raises:
        MatchError: no batches, a batch that is not an ``(inputs, targets)`` pair, an unknown
            ``precondition``, a bad ``damping``, or a non-finite loss.

    Example:
        >>> import torch
        >>> from permgraph.match.gradient import loss_directions
        >>> lin = torch.nn.Linear(3, 2)
        >>> d = loss_directions(lin, [(torch.randn(8, 3), torch.randint(0, 2, (8,)))], precondition="foof")
        >>> sorted(d), tuple(d["weight"].shape)
        (['bias', 'weight'], (2, 3))
    """
    if precondition not in ("none", "foof"):
        raise MatchError(f"precondition must be 'none' or 'foof', got {precondition!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise MatchError(f"damping must be a positive number, got {damping!r}")
    fn = loss_fn or default_loss
    params = dict(model.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    second: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    if precondition == "foof":
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{name}.weight" if name else "weight"

                def hook(_m: Any, args: tuple[Any, ...], key: str = key) -> None:
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                    second[key] = second.get(key, 0) + x.T @ x
                    counts[key] = counts.get(key, 0) + x.shape[0]

                hooks.append(mod.register_forward_pre_hook(hook))
    saved = {k: p.grad for k, p in params.items()}
    n = 0
    try:
        for batch in batches:
            inputs, targets = check_batch(batch)
            size = len(targets)
            loss = fn(call(model, None, inputs), targets)
            if not bool(torch.isfinite(loss)):
                raise MatchError(f"the loss is not finite ({float(loss)}) on batch {n}: check the model and the data")
            g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, _), gk in zip(params.items(), g):
                if gk is not None:
                    grads[k] += gk.detach() * size
            n += size
    finally:
        for h in hooks:
            h.remove()
        for k, p in params.items():
            p.grad = saved[k]
    if n == 0:
        raise MatchError("batches is empty: pass a list of (inputs, targets) pairs")
    out = {k: -(g / n) for k, g in grads.items()}
    for key, c in second.items():
        c = c / counts[key]
        lam = damping * float(torch.trace(c)) / c.shape[0] + 1e-12
        w = out[key].double()
        out[key] = torch.linalg.solve(c + lam * torch.eye(c.shape[0], dtype=c.dtype), w.T).T.to(out[key].dtype)
    return out
