"""Barriers, interpolation curves, connectivity readings and fixed points, on cases with a
known answer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import permgraph
from permgraph.errors import PermutationError
from permgraph.metrics import (
    Curve,
    MetricsError,
    accuracy_barrier,
    barrier,
    fixed_points,
    interpolation_curve,
    loss_barrier,
    strong_connectivity,
    weak_connectivity,
)


def _line(w0: float, w1: float) -> tuple[dict, dict]:
    return {"w": torch.tensor(w0, dtype=torch.float64)}, {"w": torch.tensor(w1, dtype=torch.float64)}


# -- barriers --------------------------------------------------------------------------------

def test_barrier_is_the_largest_gap_above_the_line() -> None:
    # the line runs from 1 to 2; at alpha=0.5 it is at 1.5 and the curve at 3
    assert barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0]) == 1.5
    # the largest gap, not the largest value: at 0.25 the gap is 2.6 - 1.25 = 1.35 < 1.5
    assert barrier([0.0, 0.25, 0.5, 1.0], [1.0, 2.6, 3.0, 2.0]) == 1.5
    # a curve below its line (convex) has no barrier; the endpoints keep it from going negative
    assert barrier([0.0, 0.5, 1.0], [1.0, 0.2, 2.0]) == 0.0


def test_accuracy_barrier_is_the_drop_below_the_line() -> None:
    # the line runs from 0.9 to 0.7; at 0.5 it is at 0.8 and the accuracy is 0.5
    assert barrier([0.0, 0.5, 1.0], [0.9, 0.5, 0.7], higher_is_better=True) == pytest.approx(0.3, abs=1e-12)
    # an accuracy above the line is no barrier
    assert barrier([0.0, 0.5, 1.0], [0.9, 0.95, 0.7], higher_is_better=True) == 0.0
    c = Curve([0.0, 0.5, 1.0], [0.1, 0.4, 0.2], [0.9, 0.5, 0.7])
    assert accuracy_barrier(c) == pytest.approx(0.3, abs=1e-12)
    assert accuracy_barrier([0.9, 0.5, 0.7], [0.0, 0.5, 1.0]) == pytest.approx(0.3, abs=1e-12)
    assert loss_barrier(c) == pytest.approx(0.25, abs=1e-12)
    assert loss_barrier([0.1, 0.4, 0.2], [0.0, 0.5, 1.0]) == pytest.approx(0.25, abs=1e-12)


def test_curve_through_interpolated_weights_has_the_known_barrier() -> None:
    # f(w) = 1 - w^2 along w from -1 to 1: both ends 0, the middle 1: barrier 1 at alpha 0.5
    a, b = _line(-1.0, 1.0)
    seen: list[float] = []

    def evaluate(sd: dict) -> float:
        seen.append(float(sd["w"]))
        return float(1 - sd["w"] ** 2)

    curve = interpolation_curve(a, b, evaluate, alphas=5)
    assert seen == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert curve.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.loss == [0.0, 0.75, 1.0, 0.75, 0.0]
    assert curve.loss_barrier == 1.0
    assert curve.accuracy is None and curve.accuracy_barrier is None
    # a tilted line underneath: f(w) = 1 - w^2 + w, ends at -1 and 1, middle 1: barrier 1
    tilted = interpolation_curve(a, b, lambda sd: float(1 - sd["w"] ** 2 + sd["w"]), alphas=[0.0, 0.5, 1.0])
    assert tilted.loss_barrier == 1.0
    # a straight line has no barrier
    assert interpolation_curve(a, b, lambda sd: float(3 * sd["w"]), alphas=7).loss_barrier == 0.0


def test_curve_with_loss_and_accuracy_and_transform() -> None:
    a, b = _line(0.0, 1.0)
    calls = []

    def transform(alpha: float, sd: dict) -> dict:
        calls.append(alpha)
        return {"w": sd["w"] * 2}

    curve = interpolation_curve(a, b, lambda sd: (float(sd["w"]), 1.0 - float(sd["w"]) / 4), alphas=3, transform=transform)
    assert calls == [0.0, 0.5, 1.0]
    assert curve.loss == [0.0, 1.0, 2.0]
    assert curve.accuracy == [1.0, 0.75, 0.5]
    assert curve.loss_barrier == 0.0 and curve.accuracy_barrier == 0.0
    text = str(curve)
    assert "loss barrier 0.0000" in text and "accuracy" in text
    d = curve.to_dict()
    assert d["loss"] == [0.0, 1.0, 2.0] and d["accuracy_barrier"] == 0.0


@pytest.mark.parametrize(
    "alphas, values, match",
    [
        ([0.0, 0.5], [1.0, 2.0, 3.0], "2 alphas but 3"),
        ([0.1, 0.5, 1.0], [1.0, 2.0, 3.0], "from 0 to 1"),
        ([0.0, 0.5, 0.9], [1.0, 2.0, 3.0], "from 0 to 1"),
        ([0.0, 0.6, 0.5, 1.0], [1.0, 2.0, 3.0, 4.0], "increasing"),
        ([0.0, 0.5, 1.0], [1.0, math.nan, 3.0], "not finite at alpha=0.5"),
        ([0.0], [1.0], "at least the two endpoints"),
    ],
)
def test_barrier_rejects_bad_curves(alphas: list, values: list, match: str) -> None:
    with pytest.raises(MetricsError, match=match):
        barrier(alphas, values)


def test_curve_errors_are_named() -> None:
    a, b = _line(0.0, 1.0)
    with pytest.raises(MetricsError, match="return a float or"):
        interpolation_curve(a, b, lambda sd: "bad", alphas=3)
    with pytest.raises(MetricsError, match="returned 3 values"):
        interpolation_curve(a, b, lambda sd: (1.0, 2.0, 3.0), alphas=3)
    with pytest.raises(MetricsError, match="at least 2 alphas"):
        interpolation_curve(a, b, lambda sd: 1.0, alphas=1)
    with pytest.raises(MetricsError, match="increase from 0 to 1"):
        interpolation_curve(a, b, lambda sd: 1.0, alphas=[0.0, 0.7])
    with pytest.raises(MetricsError, match="no accuracies"):
        accuracy_barrier(Curve([0.0, 1.0], [1.0, 1.0]))
    with pytest.raises(MetricsError, match="needs the alphas"):
        loss_barrier([1.0, 2.0])
    with pytest.raises(permgraph.SpecMismatchError, match="different keys"):
        interpolation_curve(a, {"v": torch.tensor(1.0)}, lambda sd: 1.0)


# -- weak and strong connectivity -------------------------------------------------------------

def test_weak_connectivity_reads_pairwise_barriers() -> None:
    ok = weak_connectivity({("a", "b"): 0.01, ("a", "c"): 0.02, ("b", "c"): 0.03}, threshold=0.05)
    assert ok.holds and ok.kind == "weak"
    bad = weak_connectivity({("a", "b"): 0.01, ("a", "c"): 0.02, ("b", "c"): 0.3}, threshold=0.05)
    assert not bad.holds
    assert bad.worst == (("b", "c"), 0.3)
    assert "does not hold" in str(bad) and "b - c: 0.3000  > threshold" in str(bad)
    with pytest.raises(MetricsError, match="threshold"):
        weak_connectivity({("a", "b"): 0.0}, threshold=-1)
    with pytest.raises(MetricsError, match="at least one pair"):
        weak_connectivity({}, threshold=0.1)


def test_strong_connectivity_measures_every_pair_on_fixed_states() -> None:
    states = {"a": {"w": torch.tensor(-1.0)}, "b": {"w": torch.tensor(0.0)}, "c": {"w": torch.tensor(1.0)}}
    # f(w) = -w^2: the pair (a, c) peaks 1 above its line at w=0; (a, b) and (b, c) peak 0.25 above
    reading = strong_connectivity(states, lambda sd: float(-sd["w"] ** 2), threshold=0.5, alphas=3)
    assert reading.kind == "strong"
    assert reading.barriers == {("a", "b"): 0.25, ("a", "c"): 1.0, ("b", "c"): 0.25}
    assert not reading.holds and reading.worst == (("a", "c"), 1.0)
    # a convex loss has no barrier anywhere: strong connectivity holds
    assert strong_connectivity(states, lambda sd: float(sd["w"] ** 2), threshold=0.0, alphas=5).holds
    # accuracy barriers: the accuracy 1 - w^2 drops 1 below its line between a and c
    acc = strong_connectivity(states, lambda sd: (0.0, float(1 - sd["w"] ** 2)), threshold=0.5, alphas=3, metric="accuracy")
    assert acc.barriers[("a", "c")] == 0.0  # 1 - w^2 is concave: above its line, no drop
    drop = strong_connectivity(states, lambda sd: (0.0, float(sd["w"] ** 2)), threshold=0.5, alphas=3, metric="accuracy")
    assert drop.barriers[("a", "c")] == 1.0 and not drop.holds
    with pytest.raises(MetricsError, match="at least two"):
        strong_connectivity({"a": states["a"]}, lambda sd: 0.0, threshold=0.1)
    with pytest.raises(MetricsError, match="metric"):
        strong_connectivity(states, lambda sd: 0.0, threshold=0.1, metric="error")


# -- fixed points --------------------------------------------------------------------------------

def _spec() -> permgraph.PermSpec:
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 100), nn.ReLU(), nn.Linear(100, 2))
    return permgraph.infer(mlp, torch.randn(2, 4))


def test_fixed_points_of_a_permutation_with_itself_are_everything() -> None:
    spec = _spec()
    assert [g.size for g in spec.groups] == [5, 20, 100]
    p = spec.random_permutation(torch.Generator().manual_seed(0))
    fp = fixed_points(p, p)
    assert fp.per_group == {g: 1.0 for g in spec.names}
    assert fp.overall == 1.0 and fp.fixed == fp.units == 125
    assert fixed_points(spec.identity()).overall == 1.0  # the identity against the identity


def test_fixed_points_of_independent_permutations_are_near_chance() -> None:
    spec = _spec()
    gen = torch.Generator().manual_seed(1)
    draws = 400
    totals = {g.name: 0.0 for g in spec.groups}
    overall = 0.0
    for _ in range(draws):
        fp = fixed_points(spec.random_permutation(gen), spec.random_permutation(gen))
        for g, f in fp.per_group.items():
            totals[g] += f
        overall += fp.overall
    for g in spec.groups:
        # a random permutation pair agrees on 1 unit on average (Poisson(1)): fraction 1/n;
        # the mean of 400 draws is within ~4 standard errors (1/sqrt(400) units)
        mean_units = totals[g.name] / draws * g.size
        assert abs(mean_units - 1.0) < 0.2, (g.name, mean_units)
    assert abs(overall / draws - 3 / 125) < 0.2 * 3 / 125


def test_fixed_points_against_the_identity_and_the_table() -> None:
    p = {"a": torch.tensor([1, 0, 2, 3]), "b": torch.tensor([1, 2, 0])}
    fp = fixed_points(p)
    assert fp.against == "identity"
    assert fp.groups == {"a": (2, 4), "b": (0, 3)}
    assert fp.per_group == {"a": 0.5, "b": 0.0}
    assert fp.overall == 2 / 7
    table = str(fp)
    assert "fixed points (against the identity): 2 of 7 units, 28.6%" in table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert rows == {"a": ["2", "4", "50.0%", "25.0%"], "b": ["0", "3", "0.0%", "33.3%"]}, table  # chance 1/n
    assert fp.to_dict()["groups"]["a"] == {"fixed": 2, "size": 4, "fraction": 0.5}


def test_fixed_points_reject_mismatched_or_invalid_permutations() -> None:
    p = {"a": torch.tensor([1, 0, 2])}
    with pytest.raises(PermutationError, match="different groups"):
        fixed_points(p, {"b": torch.tensor([0, 1, 2])})
    with pytest.raises(PermutationError, match="3 units in the first permutation, 2 in the second"):
        fixed_points(p, {"a": torch.tensor([0, 1])})
    with pytest.raises(PermutationError, match="not a permutation"):
        fixed_points({"a": torch.tensor([0, 0, 2])})
    with pytest.raises(PermutationError, match="1-D integer tensor"):
        fixed_points({"a": torch.tensor([0.0, 1.0])})
