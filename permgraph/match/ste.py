"""Straight-through estimator matching (Git Re-Basin, Alg. 2).

A proxy ``B̃`` of B's weights starts at A. Each step projects it onto the permutations of
B by weight matching (the ``P`` with ``P(B)`` closest to ``B̃``), evaluates the loss of the
midpoint ``0.5 * (A + P(B))`` on a batch, and passes the gradient straight through the
projection to ``B̃``: the forward pass uses ``P(B) + B̃ - stopgrad(B̃)``, whose value is
``P(B)`` and whose gradient flows to ``B̃`` unchanged. The proxy drifts towards weights
whose projection lowers the midpoint loss; the permutation kept is the best one found,
scored on a whole pass over the batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from permgraph.match._common import MatchError, check_finite, check_spec
from permgraph.match._objective import Batches, batch_loss, default_loss, midpoint, positive_float, positive_int
from permgraph.match.weight import weight_matching
from permgraph.spec import PermSpec

__all__ = ["ste_matching", "STEHistory"]


@dataclass
class STEHistory:
    """What `ste_matching` did.

    Attributes:
        loss: the midpoint loss of each step (on that step's batch, with that step's
            projection: the forward value is exactly the hard midpoint loss).
        changed: per step, the number of units whose assignment the projection changed.
        scores: ``(step, mean loss over one pass of the batches)`` of each candidate
            permutation scored (the start, each pass boundary, the end); batches are
            weighted by their number of targets.
        best_step: the step of the candidate returned (0: the weight matching of A and B).
        seconds: wall time of the whole call.
        projection_seconds: time spent in weight matching.
    """

    loss: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    scores: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    seconds: float = 0.0
    projection_seconds: float = 0.0


def _state(model: Any, what: str, spec: PermSpec) -> dict[str, torch.Tensor]:
    if not isinstance(model, torch.nn.Module):
        raise MatchError(f"{what} must be an nn.Module, got {type(model).__name__}")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    spec.check_state_dict(sd, f"{what}.state_dict()")
    check_finite(sd, list(sd), what)
    return sd


def ste_matching(
    spec: PermSpec,
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    return_history: bool = False,
) -> dict[str, torch.Tensor] | tuple[Any, ...]:
    """Align B to A by the straight-through estimator (Git Re-Basin, Alg. 2).

    See the module docstring for the method. The projection of each step is a weight
    matching warm-started from the previous one; the candidates scored are the projection
    of A itself (plain weight matching), the projection at the end of each pass over
    ``batches``, and the last one; the best mean midpoint loss over one pass wins.

    Args:
        spec: the PermSpec of the architecture (`permgraph.infer`).
        model_a: the reference model (not modified).
        model_b: the model to align (not modified); same architecture.
        batches: a re-iterable of ``(inputs, targets)`` pairs (a list or a DataLoader); one
            per step, cycling. ``inputs`` is a tensor, a tuple of positional arguments or a
            dict of keyword arguments. Moved to ``model_a``'s device.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (default: cross-entropy).
        steps: optimisation steps of the proxy.
        lr: Adam's learning rate on the proxy.
        seed: seed of weight matching's visiting order.
        progress: show a tqdm bar over the steps.
        return_history: also return an `STEHistory`.

    Returns:
        The permutation (group name -> int64 CPU tensor; ``spec.apply(perm,
        model_b.state_dict())`` is B aligned to A), or ``(perm, history)``.

    Raises:
        SpecMismatchError: a model does not match the spec (different architectures), or
            its weights hold NaN/inf.
        MatchError: no batches, a batch that is not an ``(inputs, targets)`` pair, a bad
            ``steps``/``lr``, or a non-finite loss.

    Examples:
        >>> import torch, permgraph
        >>> from permgraph.match.ste import ste_matching
        >>> _ = torch.manual_seed(0)
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> spec = permgraph.infer(a, torch.randn(2, 4))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> perm = ste_matching(spec, a, b, data, steps=5)
        >>> sorted(perm["0"].tolist()) == list(range(8))
        True
    """
    t_start = time.perf_counter()
    check_spec(spec)
    steps = positive_int(steps, "steps")
    lr = positive_float(lr, "lr")
    a = _state(model_a, "model_a", spec)
    device = next((t.device for t in a.values()), torch.device("cpu"))
    b = {k: v.to(device) for k, v in _state(model_b, "model_b", spec).items()}
    data = Batches(batches, device)
    fn = loss_fn or default_loss
    hist = STEHistory()

    names = {n for n, _ in model_a.named_parameters(remove_duplicate=False)}
    proxy = {k: a[k].clone().requires_grad_() for k in a if k in names and a[k].is_floating_point()}
    if not proxy:
        raise MatchError("model_a has no floating-point parameters to learn a proxy of")
    opt = torch.optim.Adam(list(proxy.values()), lr=lr)

    def project(start: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        target = {**a, **{k: v.detach() for k, v in proxy.items()}}
        p = weight_matching(spec, target, b, seed=seed, init=start)
        hist.projection_seconds += time.perf_counter() - t0
        return p

    def score(p: dict[str, torch.Tensor]) -> float:
        mid = midpoint(a, spec.apply(p, b, check=False))
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in data:  # weighted by the batch sizes (the mean loss over the samples)
                targets = batch[1]
                size = len(targets) if isinstance(targets, torch.Tensor) and targets.ndim else 1
                total += float(batch_loss(model_a, mid, batch, fn)) * size
                count += size
        if not count:
            raise MatchError("batches is empty: pass a re-iterable of (inputs, targets) pairs")
        return total / count

    perm = project(None)
    best, best_loss = perm, score(perm)
    hist.scores.append((0, best_loss))
    last_scored = perm

    def consider(step: int, p: dict[str, torch.Tensor]) -> None:
        nonlocal best, best_loss, last_scored
        if all(torch.equal(p[k], last_scored[k]) for k in p):
            return
        value = score(p)
        last_scored = p
        hist.scores.append((step, value))
        if value < best_loss:
            best, best_loss, hist.best_step = p, value, step

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="STE matching", unit="step")
    try:
        for step in range(1, steps + 1):
            epochs = data.epochs
            batch = data.next()
            if data.epochs != epochs:  # a pass over the batches ended with the previous step
                consider(step - 1, perm)
            new = project(perm)
            hist.changed.append(sum(int((new[k] != perm[k]).sum()) for k in new))
            perm = new
            pb = spec.apply(perm, b, check=False)
            params = {}
            for k, v in a.items():
                if k in proxy:
                    w = proxy[k]
                    params[k] = 0.5 * (v + (pb[k] + w - w.detach()))
                elif v.is_floating_point():
                    params[k] = 0.5 * (v + pb[k])
                else:
                    params[k] = v
            loss = batch_loss(model_a, params, batch, fn)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise MatchError(f"the midpoint loss is {value} at step {step}: check the data and the loss function")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist.loss.append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}", changed=hist.changed[-1])
    finally:
        if bar is not None:
            bar.close()
    consider(steps, project(perm))
    hist.seconds = time.perf_counter() - t_start
    return (best, hist) if return_history else best

