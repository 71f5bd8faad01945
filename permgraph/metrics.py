"""Interpolation curves, loss and accuracy barriers, linear connectivity, fixed points.

Definitions (Frankle et al. 2020; Ainsworth et al. 2022, *Git Re-Basin*, Def. 2.2; Sharma et
al., *Simultaneous linear connectivity of neural networks modulo permutation*):

- the **loss barrier** between ``θ_A`` and ``θ_B`` is the largest rise of the loss on the
  segment above the straight line between the endpoint losses:
  ``max_α L((1-α)·θ_A + α·θ_B) - ((1-α)·L(θ_A) + α·L(θ_B))``, over ``α ∈ [0, 1]``;
- the **accuracy barrier** is the largest drop of the accuracy below that line:
  ``max_α ((1-α)·acc(θ_A) + α·acc(θ_B)) - acc((1-α)·θ_A + α·θ_B)`` (Sharma et al.'s error
  barrier: the 0-1 error rises by what the accuracy drops);
- two networks are **linearly connected** when the barrier is below a threshold (typically
  the noise of the loss estimate). A set of networks is **weakly** linearly connected modulo
  permutation when each pair can be connected by its own permutation, **strongly** when
  one permutation per network connects every pair at once.
- the **fixed points** of two permutations of a group are the units they map alike; their
  fraction over all groups is ``Σ_g |{u: p_g(u) = q_g(u)}| / Σ_g n_g``.

The barrier is computed over the alphas evaluated (the endpoints included, so it is never
negative); use enough alphas to catch the peak (it is usually near ``α = 0.5``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch

from permgraph.errors import (
    MetricsError,
    PermutationError,
)
from permgraph.merge import interpolate

__all__ = [
    "MetricsError",
    "Curve",
    "interpolation_curve",
    "barrier",
    "loss_barrier",
    "accuracy_barrier",
    "Connectivity",
    "weak_connectivity",
    "strong_connectivity",
    "FixedPoints",
    "fixed_points",
]

Evaluate = Callable[[dict[str, Any]], "float | tuple[float, float]"]


@dataclass
class Curve:
    """Loss (and accuracy) along the linear path from A (``alpha=0``) to B (``alpha=1``).

    Attributes:
        alphas: the interpolation weights of B, increasing, from 0 to 1.
        loss: the loss at each alpha.
        accuracy: the accuracy at each alpha, or None when the evaluation gave only a loss.
    """

    alphas: list[float]
    loss: list[float]
    accuracy: list[float] | None = None

    def __post_init__(self) -> None:
        _check_values(self.alphas, self.loss, "loss")
        if self.accuracy is not None:
            _check_values(self.alphas, self.accuracy, "accuracy")

    @property
    def loss_barrier(self) -> float:
        """The loss barrier (see the module docstring)."""
        return barrier(self.alphas, self.loss)

    @property
    def accuracy_barrier(self) -> float | None:
        """The accuracy barrier, or None without accuracies."""
        return None if self.accuracy is None else barrier(self.alphas, self.accuracy, higher_is_better=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the curve and its barriers."""
        return {
            "alphas": list(self.alphas),
            "loss": list(self.loss),
            "accuracy": None if self.accuracy is None else list(self.accuracy),
            "loss_barrier": self.loss_barrier,
            "accuracy_barrier": self.accuracy_barrier,
        }

    def __str__(self) -> str:
        head = f"{'alpha':>6}  {'loss':>9}" + (f"  {'accuracy':>9}" if self.accuracy is not None else "")
        lines = [head]
        for i, a in enumerate(self.alphas):
            row = f"{a:>6.3f}  {self.loss[i]:>9.4f}"
            if self.accuracy is not None:
                row += f"  {self.accuracy[i]:>9.4f}"
            lines.append(row)
        lines.append(f"loss barrier {self.loss_barrier:.4f}"
                     + (f", accuracy barrier {self.accuracy_barrier:.4f}" if self.accuracy is not None else ""))
        return "\n".join(lines)


def _check_values(alphas: Sequence[float], values: Sequence[float], what: str) -> None:
    if len(alphas) != len(values):
        raise MetricsError(f"{len(alphas)} alphas but {len(values)} {what} values")
    if len(alphas) < 2:
        raise MetricsError("a barrier needs at least the two endpoints, alpha=0 and alpha=1")
    if alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise MetricsError(f"alphas must run from 0 to 1 (the endpoints define the line), got {alphas[0]} .. {alphas[-1]}")
    if any(b <= a for a, b in zip(alphas, alphas[1:])):
        raise MetricsError("alphas must be strictly increasing")
    bad = [i for i, v in enumerate(values) if not math.isfinite(float(v))]
    if bad:
        raise MetricsError(f"{what} is not finite at alpha={alphas[bad[0]]} (a diverged evaluation?)")


def barrier(alphas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False) -> float:
    """The barrier of a curve: the largest gap between the curve and the straight line
    joining its endpoints, on the bad side.

    Args:
        alphas: increasing interpolation weights from 0 to 1.
        values: the metric at each alpha.
        higher_is_better: False for a loss or an error (the gap above the line counts),
            True for an accuracy (the gap below the line counts).

    Returns:
        ``max_α sign·(v(α) - ((1-α)·v(0) + α·v(1)))``, rounded to 12 decimals (float
        noise): never negative (the endpoints are on the line).

    Raises:
        MetricsError: the alphas do not run from 0 to 1 increasing, the lengths differ, or a
            value is not finite.

    Examples:
        >>> from permgraph.metrics import barrier
        >>> barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0])  # the line is at 1.5 in the middle
        1.5
        >>> barrier([0.0, 0.5, 1.0], [0.9, 0.5, 0.7], higher_is_better=True)
        0.3
    """
    alphas = [float(a) for a in alphas]
    values = [float(v) for v in values]
    _check_values(alphas, values, "metric")
    v0, v1 = values[0], values[-1]
    sign = -1.0 if higher_is_better else 1.0
    gaps = [sign * (v - ((1 - a) * v0 + a * v1)) for a, v in zip(alphas, values)]
    return round(max(gaps), 12) + 0.0


def loss_barrier(curve: Curve | Sequence[float], alphas: Sequence[float] | None = None) -> float:
    """The loss barrier of a `Curve`, or of loss values at ``alphas``."""
    if isinstance(curve, Curve):
        return curve.loss_barrier
    if alphas is None:
        raise MetricsError("loss_barrier(values) needs the alphas the values were measured at")
    return barrier(alphas, curve)


def accuracy_barrier(curve: Curve | Sequence[float], alphas: Sequence[float] | None = None) -> float:
    """The accuracy barrier (the drop below the line) of a `Curve`, or of accuracies at ``alphas``.

    Raises:
        MetricsError: the curve has no accuracies, or the alphas are missing or invalid.
    """
    if isinstance(curve, Curve):
        if curve.accuracy is None:
            raise MetricsError("this curve has no accuracies: make the evaluation return (loss, accuracy)")
        return barrier(curve.alphas, curve.accuracy, higher_is_better=True)
    if alphas is None:
        raise MetricsError("accuracy_barrier(values) needs the alphas the values were measured at")
    return barrier(alphas, curve, higher_is_better=True)


def _alphas(alphas: int | Sequence[float]) -> list[float]:
    if isinstance(alphas, int):
        if alphas < 2:
            raise MetricsError(f"need at least 2 alphas (the endpoints), got {alphas}")
        return [i / (alphas - 1) for i in range(alphas)]
    return [float(a) for a in alphas]


def _read(value: Any, alpha: float) -> tuple[float, float | None]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise MetricsError(f"the evaluation returned {len(value)} values at alpha={alpha}; return a loss or (loss, accuracy)")
        return float(value[0]), float(value[1])
    try:
        return float(value), None
    except (TypeError, ValueError) as exc:
        raise MetricsError(f"the evaluation returned {type(value).__name__} at alpha={alpha}; return a float or (loss, accuracy)") from exc


def interpolation_curve(
    state_a: Mapping[str, Any],
    state_b: Mapping[str, Any],
    evaluate: Evaluate,
    alphas: int | Sequence[float] = 11,
    *,
    transform: Callable[[float, dict[str, Any]], dict[str, Any]] | None = None,
    progress: bool = False,
    desc: str = "interpolate",
) -> Curve:
    """Evaluate the models on the segment from A to B.

    Args:
        state_a: the state_dict at ``alpha=0``.
        state_b: the state_dict at ``alpha=1``; for an aligned curve, ``spec.apply(perm, state_b)``.
        evaluate: ``state_dict -> loss`` or ``-> (loss, accuracy)``; it is called once per
            alpha with a fresh interpolated state_dict (load it into a model and run it on data).
        alphas: a number of equally spaced alphas from 0 to 1 (default 11), or the alphas
            themselves (increasing, from 0 to 1).
        transform: ``(alpha, state_dict) -> state_dict`` applied before evaluating, e.g. a
            BatchNorm reset or `repair` (see the module docs).
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        The `Curve`.

    Raises:
        MetricsError: invalid alphas, or an evaluation that returns something else than a
            number or a pair, or a non-finite value.
        SpecMismatchError: the state_dicts do not have the same keys and shapes.

    Examples:
        >>> import torch
        >>> from permgraph.metrics import interpolation_curve
        >>> a, b = {"w": torch.tensor(-1.0)}, {"w": torch.tensor(1.0)}
        >>> curve = interpolation_curve(a, b, lambda sd: float(1 - sd["w"] ** 2), alphas=5)
        >>> curve.loss
        [0.0, 0.75, 1.0, 0.75, 0.0]
        >>> curve.loss_barrier
        1.0
    """
    from tqdm.auto import tqdm

    xs = _alphas(alphas)
    if len(xs) < 2 or xs[0] != 0.0 or xs[-1] != 1.0 or any(b <= a for a, b in zip(xs, xs[1:])):
        raise MetricsError(f"alphas must increase from 0 to 1 (the endpoints define the line), got {xs}")
    loss: list[float] = []
    acc: list[float | None] = []
    for a in tqdm(xs, desc=desc, disable=not progress, leave=False):
        sd = interpolate(state_a, state_b, a)
        if transform is not None:
            sd = transform(a, sd)
        lo, ac = _read(evaluate(sd), a)
        loss.append(lo)
        acc.append(ac)
    if any(v is None for v in acc) and not all(v is None for v in acc):
        raise MetricsError("the evaluation returned an accuracy at some alphas and not at others")
    return Curve(xs, loss, None if acc[0] is None else [float(v) for v in acc])  # type: ignore[arg-type]


# -- linear connectivity ----------------------------------------------------------------

@dataclass
class Connectivity:
    """A reading of linear connectivity modulo permutation over a set of networks.

    Attributes:
        kind: ``"weak"`` (each pair aligned by its own permutation) or ``"strong"`` (one
            permutation per network, every pair measured).
        threshold: the largest barrier that counts as connected.
        barriers: the barrier of each pair of networks (by name).
        holds: every pair's barrier is at most ``threshold``.
        metric: what the barriers measure (``"loss"`` or ``"accuracy"``).
    """

    kind: str
    threshold: float
    barriers: dict[tuple[str, str], float]
    metric: str = "loss"
    holds: bool = field(init=False)

    def __post_init__(self) -> None:
        self.holds = all(b <= self.threshold for b in self.barriers.values())

    @property
    def worst(self) -> tuple[tuple[str, str], float]:
        """The pair with the largest barrier, and that barrier."""
        pair = max(self.barriers, key=self.barriers.__getitem__)
        return pair, self.barriers[pair]

    def __str__(self) -> str:
        verdict = "holds" if self.holds else "does not hold"
        lines = [f"{self.kind} linear connectivity modulo permutation {verdict} "
                 f"({self.metric} barrier threshold {self.threshold:g}, {len(self.barriers)} pair(s))"]
        for (x, y), b in self.barriers.items():
            lines.append(f"  {x} - {y}: {b:.4f}" + ("" if b <= self.threshold else "  > threshold"))
        return "\n".join(lines)


def _check_threshold(threshold: Any) -> float:
    t = float(threshold)
    if not math.isfinite(t) or t < 0:
        raise MetricsError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return t


def weak_connectivity(barriers: Mapping[tuple[str, str], float], *, threshold: float, metric: str = "loss") -> Connectivity:
    """Weak linear connectivity modulo permutation (Sharma et al., Def. 1), as observed.

    Weak connectivity asks, for every pair of networks, for *some* permutation that connects
    them: pass the barrier of each pair after aligning that pair on its own (for instance
    B aligned to A, C aligned to A, C aligned to B). It holds on these networks with these
    alignments when every barrier is at most ``threshold``; a larger barrier says only that
    the matcher found no connecting permutation, not that none exists.

    Args:
        barriers: ``(name, name) -> barrier`` of each pair, each pair aligned by its own
            permutation.
        threshold: the largest barrier that counts as connected (typically the noise of the
            loss estimate).
        metric: what the barriers measure, for the report.

    Returns:
        The `Connectivity` reading.

    Raises:
        MetricsError: no pairs, a non-finite barrier, or a negative threshold.

    Examples:
        >>> from permgraph.metrics import weak_connectivity
        >>> weak_connectivity({("a", "b"): 0.01, ("a", "c"): 0.02, ("b", "c"): 0.3}, threshold=0.05).holds
        False
    """
    t = _check_threshold(threshold)
    if not barriers:
        raise MetricsError("weak_connectivity needs the barrier of at least one pair")
    out = {}
    for pair, b in barriers.items():
        if not math.isfinite(float(b)):
            raise MetricsError(f"the barrier of {pair} is not finite")
        out[tuple(pair)] = float(b)
    return Connectivity("weak", t, out, metric)  # type: ignore[arg-type]


def strong_connectivity(
    states: Mapping[str, Mapping[str, Any]],
    evaluate: Evaluate,
    *,
    threshold: float,
    alphas: int | Sequence[float] = 11,
    metric: str = "loss",
    progress: bool = False,
) -> Connectivity:
    """Strong linear connectivity modulo permutation (Sharma et al., Def. 2), as observed.

    Strong connectivity asks for *one* permutation per network that connects every pair at
    once. Pass each network already permuted once (for instance every network aligned to a
    common reference, as in Sharma et al.'s indirect alignment); the barrier of every pair
    is then measured along the straight line between them, with no further alignment.

    Args:
        states: ``name -> state_dict``, each permuted once; at least two.
        evaluate: ``state_dict -> loss`` or ``-> (loss, accuracy)``.
        threshold: the largest barrier that counts as connected.
        alphas: as in `interpolation_curve`.
        metric: ``"loss"`` or ``"accuracy"`` (the evaluation must then return a pair).
        progress: show a tqdm bar per pair.

    Returns:
        The `Connectivity` reading, with every pair's barrier.

    Raises:
        MetricsError: fewer than two networks, an unknown metric, or an invalid threshold.
    """
    t = _check_threshold(threshold)
    if metric not in ("loss", "accuracy"):
        raise MetricsError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    names = list(states)
    if len(names) < 2:
        raise MetricsError("strong_connectivity needs at least two networks")
    out: dict[tuple[str, str], float] = {}
    for x, y in combinations(names, 2):
        curve = interpolation_curve(states[x], states[y], evaluate, alphas, progress=progress, desc=f"{x}-{y}")
        out[(x, y)] = curve.loss_barrier if metric == "loss" else accuracy_barrier(curve)
    return Connectivity("strong", t, out, metric)


# -- fixed points -------------------------------------------------------------------------

@dataclass
class FixedPoints:
    """The units two permutations map alike, per group and overall.

    Attributes:
        groups: ``name -> (fixed, size)``: the number of units ``u`` with ``p[u] == q[u]``,
            and the group size.
        against: ``"identity"`` or ``"permutation"`` (what the first permutation was compared to).
    """

    groups: dict[str, tuple[int, int]]
    against: str = "permutation"

    @property
    def per_group(self) -> dict[str, float]:
        """The fraction of fixed points of each group."""
        return {g: f / n for g, (f, n) in self.groups.items()}

    @property
    def fixed(self) -> int:
        """Fixed points over all groups."""
        return sum(f for f, _ in self.groups.values())

    @property
    def units(self) -> int:
        """Units over all groups."""
        return sum(n for _, n in self.groups.values())

    @property
    def overall(self) -> float:
        """``Σ fixed / Σ size`` over the groups (Sharma et al.'s total fraction)."""
        return self.fixed / self.units if self.units else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "overall": self.overall,
            "against": self.against,
            "groups": {g: {"fixed": f, "size": n, "fraction": f / n} for g, (f, n) in self.groups.items()},
        }

    def __str__(self) -> str:
        w = max([len("group"), *(len(g) for g in self.groups)])
        lines = [f"fixed points (against the {self.against}): {self.fixed} of {self.units} units, {self.overall:.1%}",
                 f"  {'group':<{w}}  {'fixed':>6}  {'size':>6}  {'fraction':>8}  {'chance':>7}"]
        for g, (f, n) in self.groups.items():
            lines.append(f"  {g:<{w}}  {f:>6}  {n:>6}  {f / n:>8.1%}  {1 / n:>7.1%}")
        return "\n".join(lines)


def _as_perm(p: Any, name: str, what: str) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or p.ndim != 1 or p.dtype.is_floating_point or p.dtype == torch.bool:
        raise PermutationError(f"{what}[{name!r}] must be a 1-D integer tensor")
    p = p.detach().long().cpu()
    if not torch.equal(torch.sort(p).values, torch.arange(p.numel())):
        raise PermutationError(f"{what}[{name!r}] is not a permutation of 0..{p.numel() - 1} (an index repeats or is out of range)")
    return p


def fixed_points(perm_a: Mapping[str, torch.Tensor], perm_b: Mapping[str, torch.Tensor] | None = None) -> FixedPoints:
    """The fraction of units that two permutations map alike (Sharma et al., App. G).

    With one permutation, it is compared to the identity: the fraction of units it leaves
    in place. Two independent random permutations of ``n`` units agree on ``1/n`` of them
    on average; the table shows that chance level next to each group.

    Args:
        perm_a: a permutation, group name -> int64 indices.
        perm_b: another permutation of the same groups, or None for the identity.

    Returns:
        A `FixedPoints`; ``str()`` gives a table, ``.overall`` the total fraction,
        ``.per_group`` the fraction per group.

    Raises:
        PermutationError: the two do not have the same groups and sizes, or one is not a
            permutation.

    Examples:
        >>> import torch
        >>> from permgraph.metrics import fixed_points
        >>> fp = fixed_points({"fc": torch.tensor([0, 2, 1, 3])})
        >>> fp.per_group, fp.overall
        ({'fc': 0.5}, 0.5)
    """
    against = "identity" if perm_b is None else "permutation"
    if perm_b is not None:
        missing = [g for g in perm_a if g not in perm_b]
        extra = [g for g in perm_b if g not in perm_a]
        if missing or extra:
            raise PermutationError(
                f"the two permutations have different groups: only in the first {missing[:5]}, only in the second "
                f"{extra[:5]}; compare permutations of the same spec"
            )
    groups: dict[str, tuple[int, int]] = {}
    for name, p in perm_a.items():
        p = _as_perm(p, name, "perm_a")
        q = torch.arange(p.numel()) if perm_b is None else _as_perm(perm_b[name], name, "perm_b")
        if q.numel() != p.numel():
            raise PermutationError(f"group {name!r} has {p.numel()} units in the first permutation, {q.numel()} in the second")
        groups[name] = (int((p == q).sum()), int(p.numel()))
    return FixedPoints(groups, against)

