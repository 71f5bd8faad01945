"""MergeMany and cycle-consistent maps, on MLPs trained on scikit-learn's digits.

This module also holds the small digits helpers that ``test_ste.py`` and
``test_sinkhorn.py`` import (MLPs trained from different seeds, cached per process), built
on `permgraph.examples.digits`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import permgraph
from permgraph.errors import PermutationError, SpecMismatchError
from permgraph.examples.digits import Digits, load_digits, make_mlp, train
from permgraph.match._common import MatchError
from permgraph.match.many import MergeManyResult, cycle_consistent_maps, cycle_error, merge_many, pairwise_maps
from permgraph.match.weight import weight_matching

WIDTH = 128


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=1)
def digits() -> Digits:
    """scikit-learn's digits (bundled, no download), standardised; 1348 training and 449
    test samples."""
    return load_digits()


def mlp(width: int = WIDTH) -> nn.Module:
    return make_mlp((64, width, width, 10))


@functools.lru_cache(maxsize=8)
def trained(seed: int, epochs: int = 15) -> nn.Module:
    """A 64-128-128-10 MLP trained on the digits from ``seed`` (about a second)."""
    data = digits()
    torch.manual_seed(seed)
    return train(mlp(), data.x_train, data.y_train, epochs=epochs, seed=seed)


def evaluate(model: nn.Module, state: dict[str, torch.Tensor], split: str = "test") -> tuple[float, float]:
    """(cross-entropy, accuracy) of ``model``'s architecture with the weights ``state``."""
    data = digits()
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    with torch.no_grad():
        out = torch.func.functional_call(model, state, (x,))
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def midpoint(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: 0.5 * (a[k] + b[k]) for k in a}


@pytest.fixture(scope="module")
def four():
    models = [trained(s) for s in range(4)]
    spec = permgraph.infer(models[0], digits().x_train[:2])
    return spec, models, [m.state_dict() for m in models]


def test_merge_many_beats_the_naive_average(four):
    spec, models, states = four
    ends = [evaluate(m, s) for m, s in zip(models, states)]
    assert min(acc for _, acc in ends) > 0.93  # the models themselves are good
    naive = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    naive_loss, naive_acc = evaluate(models[0], naive)
    result = merge_many(spec, states, seed=0)
    assert isinstance(result, MergeManyResult)
    assert result.converged and result.rounds >= 2
    loss, acc = evaluate(models[0], result.merged)
    print(f"\n4 digits MLPs: endpoints acc {[round(a, 3) for _, a in ends]}; naive average loss {naive_loss:.3f} "
          f"acc {naive_acc:.3f}; MergeMany loss {loss:.3f} acc {acc:.3f} ({result.rounds} rounds)")
    assert naive_acc < 0.5  # averaging unaligned models destroys them
    assert acc > naive_acc + 0.4
    assert loss < naive_loss / 4
    # the aligned states are the inputs permuted, and the merge is their average
    for p, s, aligned in zip(result.perms, states, result.states):
        spec.check_permutation(p)
        ref = spec.apply(p, s)
        assert all(torch.equal(ref[k], aligned[k]) for k in s)
    for k in states[0]:
        torch.testing.assert_close(result.merged[k], sum(s[k] for s in result.states) / 4)


def test_merge_many_of_permuted_copies_is_exact():
    model = mlp(32)
    spec = permgraph.infer(model, torch.randn(2, 64))
    base = model.state_dict()
    gen = torch.Generator().manual_seed(3)
    states = [spec.apply(spec.random_permutation(gen), base) for _ in range(4)]
    result = merge_many(spec, states)
    for s in result.states[1:]:
        assert all(torch.equal(s[k], result.states[0][k]) for k in base)
    assert all(torch.equal(result.merged[k], result.states[0][k]) for k in base)


def test_merge_many_is_deterministic(four):
    spec, _, states = four
    r1 = merge_many(spec, states[:3], seed=5)
    r2 = merge_many(spec, states[:3], seed=5, progress=True)
    assert all(torch.equal(p1[g], p2[g]) for p1, p2 in zip(r1.perms, r2.perms) for g in p1)
    m1, m2 = pairwise_maps(spec, states[:3]), pairwise_maps(spec, states[:3], progress=True)
    assert all(torch.equal(m1[k][g], m2[k][g]) for k in m1 for g in m1[k])


def test_cycle_consistent_maps_have_no_cycle_error_and_pairwise_maps_do(four):
    spec, _, states = four
    result = merge_many(spec, states)
    maps = cycle_consistent_maps(spec, result.perms)
    assert set(maps) == {(i, j) for i in range(4) for j in range(4) if i != j}
    assert cycle_error(spec, maps) == 0.0
    for i, j, k in [(0, 1, 2), (3, 1, 0), (2, 3, 1)]:  # P_jk ∘ P_ij = P_ik, exactly
        via = spec.compose(maps[(i, j)], maps[(j, k)])
        assert all(torch.equal(via[g], maps[(i, k)][g]) for g in via)
    # P_ij carries model i to model j's frame: aligned i is close to j
    a01 = spec.apply(maps[(0, 1)], states[0])
    assert sum(float((a01[k] - states[1][k]).norm()) for k in a01) < sum(
        float((states[0][k] - states[1][k]).norm()) for k in a01
    )
    pair = pairwise_maps(spec, states)
    err = cycle_error(spec, pair)
    print(f"\ncycle error: consistent maps 0, independent pairwise weight matching {err:.3f}")
    assert err > 0.05
    # each pairwise map is the weight matching of its pair
    wm = weight_matching(spec, states[2], states[0])
    assert all(torch.equal(wm[g], pair[(0, 2)][g]) for g in wm)


def test_cycle_error_counts_units():
    model = mlp(8)
    spec = permgraph.infer(model, torch.randn(2, 64))
    ident = spec.identity()
    moved = {g.name: torch.arange(g.size).roll(1) for g in spec.groups}  # moves every unit
    maps = {(i, j): ident for i in range(3) for j in range(3) if i != j}
    assert cycle_error(spec, maps) == 0.0
    maps[(0, 2)] = moved
    # of the 6 ordered triples, (0,1,2), (0,2,1) and (1,0,2) use the pair (0, 2) once and
    # disagree at every unit; (1,2,0), (2,0,1), (2,1,0) do not use it
    assert cycle_error(spec, maps) == 0.5
    with pytest.raises(MatchError, match="missing the pairs"):
        cycle_error(spec, {(0, 1): ident})


def test_bad_input(four):
    spec, _, states = four
    with pytest.raises(MatchError, match="at least two"):
        merge_many(spec, states[:1])
    with pytest.raises(MatchError, match="at least two"):
        merge_many(spec, [])
    with pytest.raises(MatchError, match="at least two"):
        pairwise_maps(spec, states[:1])
    with pytest.raises(MatchError, match="at least two"):
        cycle_consistent_maps(spec, [spec.identity()])
    other = mlp(16).state_dict()
    with pytest.raises(SpecMismatchError, match=r"states\[1\]"):
        merge_many(spec, [states[0], other])
    with pytest.raises(MatchError, match="max_iter"):
        merge_many(spec, states[:2], max_iter=0)
    bad = dict(states[1])
    bad["0.weight"] = bad["0.weight"].clone()
    bad["0.weight"][0, 0] = float("nan")
    with pytest.raises(SpecMismatchError, match="non-finite"):
        merge_many(spec, [states[0], bad])
    with pytest.raises(PermutationError):
        cycle_consistent_maps(spec, [spec.identity(), {g: torch.zeros(WIDTH, dtype=torch.int64) for g in spec.names}])
