"""Weight matching: exact recovery of a hidden permutation over the zoo, a real alignment of
two trained networks, the bookkeeping (history, determinism, ``init``), and bad input.

Exact recovery: B is A with every group permuted at random (``spec.apply``); weight matching
must find the inverse, so aligned B equals A in every tensor. Norm layers get random
statistics first (``randomize_norm_stats``): a freshly built BatchNorm/LayerNorm holds the
same value for every unit, which tells the units apart in no way, unlike any trained model;
and a norm tensor the permutation missed would then show as a mismatch.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import permgraph
from permgraph import PermutationError, SpecMismatchError
from permgraph.lap import LapError
from permgraph.match import MatchError, WeightMatchingHistory, similarity_matrices, weight_matching
from permgraph.testing import randomize_norm_stats
from tests.helpers import tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


def _recovery(model: nn.Module, inputs, seed: int = 0,
              first_pass: str = "sweep") -> tuple[permgraph.PermSpec, dict, dict, dict, WeightMatchingHistory]:
    randomize_norm_stats(model, torch.Generator().manual_seed(seed))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = permgraph.infer(model, inputs)
    a = model.state_dict()
    hidden = spec.random_permutation(torch.Generator().manual_seed(seed + 1))
    b = spec.apply(hidden, a)
    perm, hist = weight_matching(spec, a, b, seed=seed, first_pass=first_pass, return_history=True)
    return spec, a, b, perm, hist


def _assert_recovered(spec: permgraph.PermSpec, a: dict, b: dict, perm: dict, hist: WeightMatchingHistory) -> None:
    spec.check_permutation(perm)
    aligned = spec.apply(perm, b)
    for k, v in a.items():
        if v.is_floating_point():
            err = (aligned[k].double() - v.double()).abs().max().item() if v.numel() else 0.0
            assert err <= 1e-6, f"{k} differs by {err} after alignment"
        else:
            assert torch.equal(aligned[k], v), k
    # the objective climbs to its maximum, Σ|A|², and the last sweep changes nothing
    assert hist.converged and hist.changed[-1] == []
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(hist.objective, hist.objective[1:]))
    keys = {m.key for g in spec.groups for m in g.members}
    best = sum(float(a[k].double().square().sum()) for k in keys)
    assert math.isclose(hist.objective[-1], best, rel_tol=1e-5)
    assert hist.objective[0] < best  # the hidden permutation did move something


@pytest.mark.parametrize("first_pass", ["sweep", "forward"])
def test_mlp_recovers_the_inverse(first_pass: str) -> None:
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    spec, a, b, perm, hist = _recovery(model, torch.randn(1, 64), first_pass=first_pass)
    assert [g.size for g in spec.groups] == [128, 128, 128]
    _assert_recovered(spec, a, b, perm, hist)
    assert hist.sweeps <= 4
    if first_pass == "forward":  # each layer's inputs are aligned when it is solved: one pass finds it
        assert hist.sweeps == 2 and hist.changed[0] and hist.changed[1] == []


@pytest.mark.parametrize(("name", "first_pass"), [("resnet18", "sweep"), ("resnet50", "sweep"), ("resnet18", "forward")])
def test_resnet_recovers_the_inverse(name: str, first_pass: str) -> None:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    spec, a, b, perm, hist = _recovery(model, torch.randn(1, 3, 32, 32), first_pass=first_pass)
    assert len(spec.groups) >= (12 if name == "resnet18" else 37)
    _assert_recovered(spec, a, b, perm, hist)


@pytest.mark.parametrize("first_pass", ["sweep", "forward"])
def test_vit_tiny_recovers_the_inverse(first_pass: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    spec, a, b, perm, hist = _recovery(model, torch.randn(1, 3, 32, 32), first_pass=first_pass)
    # heads (3) and within-head units (64) of every block are groups: the joint moves align them
    assert sum(g.size == 3 for g in spec.groups) == 12
    _assert_recovered(spec, a, b, perm, hist)
    assert hist.joint_moves > 0


@pytest.mark.parametrize("first_pass", ["sweep", "forward"])
def test_gpt2_recovers_the_inverse(first_pass: str) -> None:
    model, inputs, _ = tiny_gpt2()
    spec, a, b, perm, hist = _recovery(model, inputs, first_pass=first_pass)
    assert any(g.size == 4 for g in spec.groups)  # the head groups
    _assert_recovered(spec, a, b, perm, hist)


def _gpt2_pair(heads: str) -> tuple[permgraph.PermSpec, dict, dict]:
    model_a, _, spec = tiny_gpt2(0, heads)
    model_b, _, _ = tiny_gpt2(1)
    return spec, model_a.state_dict(), model_b.state_dict()


def test_per_head_groups_recover_the_inverse_and_the_objective_is_the_true_one() -> None:
    """With a group per head's units (applied after the heads group, inside whatever head it
    brought), the heads move only jointly with them: the objective the history reports is
    the one of the aligned weights, every sweep, and the descent converges."""
    spec, a, b = _gpt2_pair("independent")
    assert sum(g.name.rsplit(".", 1)[-1] in {"h0", "h1", "h2", "h3"} for g in spec.groups) == 16  # 2 layers x (qk, v) x 4 heads
    hidden = spec.random_permutation(torch.Generator().manual_seed(1))
    perm, hist = weight_matching(spec, a, spec.apply(hidden, a), return_history=True)
    _assert_recovered(spec, a, spec.apply(hidden, a), perm, hist)
    keys = {m.key for g in spec.groups for m in g.members}
    for order in ("random", "graph"):
        perm, hist = weight_matching(spec, a, b, order=order, return_history=True)
        aligned = spec.apply(perm, b)
        true = sum(float((a[k].double() * aligned[k].double()).sum()) for k in keys)
        assert hist.converged and hist.sweeps < 20
        assert hist.objective[-1] == pytest.approx(true, rel=1e-6)
        assert hist.objective[-1] > hist.objective[0]


def test_a_group_on_both_axes_of_one_weight() -> None:
    """A residual ``h + W h``: one group permutes both axes of ``W`` (a quadratic term)."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(16, 16)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h + self.inner(h)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Residual(), nn.ReLU(), nn.Linear(16, 2))
    spec, a, b, perm, hist = _recovery(model, torch.randn(2, 8))
    group = next(g for g in spec.groups if any(m.key == "1.inner.weight" for m in g.members))
    assert {m.axis for m in group.members if m.key == "1.inner.weight"} == {0, 1}
    _assert_recovered(spec, a, b, perm, hist)


@pytest.fixture(scope="module")
def two_resnet18s() -> tuple[permgraph.PermSpec, dict, dict]:
    import torchvision

    torch.manual_seed(0)
    a = torchvision.models.resnet18(weights=None).eval()
    torch.manual_seed(1)
    b = torchvision.models.resnet18(weights=None).eval()
    spec = permgraph.infer(a, torch.randn(1, 3, 32, 32))
    return spec, a.state_dict(), b.state_dict()


def test_independent_models_objective_rises_and_the_result_is_a_symmetry(two_resnet18s) -> None:
    import torchvision

    spec, a, b = two_resnet18s
    perm, hist = weight_matching(spec, a, b, return_history=True)
    spec.check_permutation(perm)
    assert hist.converged and hist.sweeps >= 2
    assert len(hist.objective) == hist.sweeps + 1
    assert all(y >= x for x, y in zip(hist.objective, hist.objective[1:]))
    assert hist.objective[-1] > hist.objective[0] * 1.02
    # the recorded objective is the true one
    aligned = spec.apply(perm, b)
    keys = {m.key for g in spec.groups for m in g.members}
    true = sum(float((a[k].double() * aligned[k].double()).sum()) for k in keys)
    assert math.isclose(hist.objective[-1], true, rel_tol=1e-5)
    # a fixed point: no single group can improve any more
    sims = similarity_matrices(spec, a, b, perm)
    for g in spec.groups:
        s = sims[g.name]
        ar = torch.arange(g.size)
        best = s[ar, permgraph.lap.solve(s)].sum()
        assert s[ar, perm[g.name]].sum() >= best - 1e-6 * abs(float(best)), g.name
    # aligned B computes what B computes
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.load_state_dict(b)
        before = model(x)
        model.load_state_dict(aligned)
        after = model(x)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)


def test_tol_stops_early_and_each_order_reaches_a_fixed_point(two_resnet18s) -> None:
    spec, a, b = two_resnet18s
    _, exact = weight_matching(spec, a, b, tol=0, return_history=True)
    _, loose = weight_matching(spec, a, b, tol=0.3, return_history=True)
    assert exact.converged and not exact.stopped_by_tol and exact.changed[-1] == []
    # the loose run took the same path and stopped at the first sweep that gained <= 30% of the total so far
    assert loose.stopped_by_tol and not loose.converged and loose.sweeps < exact.sweeps
    assert loose.objective == pytest.approx(exact.objective[: loose.sweeps + 1], rel=1e-9)
    gains = [y - x for x, y in zip(exact.objective, exact.objective[1:])]
    first = next(i for i in range(1, len(gains)) if gains[i] <= 0.3 * (exact.objective[i + 1] - exact.objective[0]))
    assert loose.sweeps == first + 1
    # the graph order reaches a fixed point too, at a comparable objective
    _, graph = weight_matching(spec, a, b, order="graph", return_history=True)
    assert graph.converged and graph.changed[-1] == []
    assert graph.objective[-1] == pytest.approx(exact.objective[-1], rel=0.01)
    assert graph.objective[1] > exact.objective[0]


def test_the_forward_pass_reads_the_aligned_side_and_the_descent_reaches_a_fixed_point(two_resnet18s) -> None:
    """``first_pass="forward"``: the first sweep builds each group's similarity from the
    members whose other groups it already visited (fewer flops than a sweep); the objective
    recorded is the true one, and the descent then reaches a fixed point of the full
    objective."""
    spec, a, b = two_resnet18s
    keys = {m.key for g in spec.groups for m in g.members}

    def true(perm: dict) -> float:
        aligned = spec.apply(perm, b)
        return sum(float((a[k].double() * aligned[k].double()).sum()) for k in keys)

    _, one = weight_matching(spec, a, b, first_pass="forward", max_iter=1, return_history=True)
    _, plain = weight_matching(spec, a, b, max_iter=1, return_history=True)
    assert one.sweeps == 1 and not one.converged and one.changed[0]
    assert one.gemm_flops < plain.gemm_flops  # it left out what reads unvisited groups
    perm, hist = weight_matching(spec, a, b, first_pass="forward", return_history=True)
    assert hist.objective[1] == pytest.approx(one.objective[1], rel=1e-9)
    assert hist.converged and hist.changed[-1] == []
    assert all(y >= x for x, y in zip(hist.objective, hist.objective[1:]))
    assert hist.objective[-1] == pytest.approx(true(perm), rel=1e-5)
    sims = similarity_matrices(spec, a, b, perm)
    for g in spec.groups:
        s, ar = sims[g.name], torch.arange(g.size)
        assert s[ar, perm[g.name]].sum() >= s[ar, permgraph.lap.solve(s)].sum() - 1e-6 * abs(float(s.sum())), g.name


def test_a_forward_pass_that_lowers_the_objective_is_dropped() -> None:
    """B's first layer is A's with its units shuffled (and scaled down), the rest is A's: read
    on its input side alone, the first group takes the shuffle, which the second layer's
    columns (read in full only later) pay for many times over; the pass is dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    spec = permgraph.infer(model, torch.randn(2, 8))
    a = model.state_dict()
    b = dict(a)
    sigma = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    b["0.weight"], b["0.bias"] = 1e-2 * a["0.weight"][sigma], 1e-2 * a["0.bias"][sigma]
    s = a["0.weight"] @ b["0.weight"].T + torch.outer(a["0.bias"], b["0.bias"])  # the first group's input side
    taken = permgraph.lap.solve(s.double())
    assert not torch.equal(taken, torch.arange(16))
    moved = spec.apply({"0": taken, "2": torch.arange(16)}, b)
    keys = {m.key for g in spec.groups for m in g.members}
    assert sum(float((a[k] * moved[k]).sum()) for k in keys) < sum(float((a[k] * b[k]).sum()) for k in keys)
    perm, hist = weight_matching(spec, a, b, first_pass="forward", return_history=True)
    assert hist.changed[0] == [] and hist.objective[1] == hist.objective[0]
    assert hist.converged and all(y >= x for x, y in zip(hist.objective, hist.objective[1:]))


def test_same_seed_same_answer_and_lap_backends_agree(two_resnet18s) -> None:
    spec, a, b = two_resnet18s
    p1, h1 = weight_matching(spec, a, b, seed=3, return_history=True)
    p2, h2 = weight_matching(spec, a, b, seed=3, lap="scipy", return_history=True)
    assert h1.sweeps == h2.sweeps
    assert math.isclose(h1.objective[-1], h2.objective[-1], rel_tol=1e-9)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_lap_threads_take_the_sequential_path_step_for_step(two_resnet18s, monkeypatch: pytest.MonkeyPatch) -> None:
    """LAPs solved in threads (every one, with the size floor lowered) give the permutation,
    objectives and sweeps of the sequential descent, in both orders and after a forward pass."""
    import threading

    from permgraph.match import _wm_descent

    gpt_spec, gpt_a, gpt_b = _gpt2_pair("shared")  # attention heads: joint moves between threaded LAPs
    monkeypatch.setattr(_wm_descent, "POOL_MIN_SIZE", 0)
    threads: set[str] = set()
    solve = _wm_descent._Descent._solve

    def spy(self, cost):  # noqa: ANN001, ANN202
        threads.add(threading.current_thread().name)
        return solve(self, cost)

    monkeypatch.setattr(_wm_descent._Descent, "_solve", spy)
    problems = [(*two_resnet18s, "random", "sweep"), (*two_resnet18s, "graph", "sweep"),
                (*two_resnet18s, "random", "forward"), (gpt_spec, gpt_a, gpt_b, "random", "sweep"),
                (gpt_spec, gpt_a, gpt_b, "random", "forward")]
    for spec, a, b, order, first_pass in problems:
        kw = {"order": order, "first_pass": first_pass, "return_history": True}
        p1, h1 = weight_matching(spec, a, b, lap_threads=1, **kw)
        assert threads == {threading.current_thread().name}
        threads.clear()
        p3, h3 = weight_matching(spec, a, b, lap_threads=3, **kw)
        assert any(t.startswith("permgraph-lap") for t in threads)
        threads.clear()
        assert h1.objective == pytest.approx(h3.objective, rel=1e-12) and h1.changed == h3.changed and h1.laps == h3.laps
        assert all(torch.equal(p1[k], p3[k]) for k in p1)
    assert any(g.size == 4 for g in gpt_spec.groups)  # the heads: visited by joint moves


def test_starting_at_the_answer_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    spec = permgraph.infer(model, torch.randn(2, 8))
    a = model.state_dict()
    hidden = spec.random_permutation(torch.Generator().manual_seed(5))
    b = spec.apply(hidden, a)
    perm, hist = weight_matching(spec, a, b, init=spec.inverse(hidden), return_history=True)
    assert hist.sweeps == 1 and hist.changed == [[]]
    assert all(torch.equal(perm[k], v) for k, v in spec.inverse(hidden).items())


def test_float64_weights_and_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).double()
    spec = permgraph.infer(model, torch.randn(2, 8, dtype=torch.float64))
    a = model.state_dict()
    b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(1)), a)
    perm = weight_matching(spec, a, b, progress=True)
    assert all(torch.equal(spec.apply(perm, b)[k], a[k]) for k in a)
    assert "weight matching" in capsys.readouterr().err


def test_max_iter_bounds_the_sweeps(two_resnet18s) -> None:
    spec, a, b = two_resnet18s
    perm, hist = weight_matching(spec, a, b, max_iter=1, return_history=True)
    assert hist.sweeps == 1 and not hist.converged
    spec.check_permutation(perm)


def test_a_spec_without_groups() -> None:
    model = nn.Linear(4, 2)
    spec = permgraph.infer(model, torch.randn(1, 4))
    assert spec.groups == ()
    assert weight_matching(spec, model.state_dict(), model.state_dict()) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stay_on_the_device() -> None:  # pragma: no cover - runs where a GPU is present
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    spec = permgraph.infer(model, torch.randn(2, 8))
    a = {k: v.cuda() for k, v in model.state_dict().items()}
    b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(1)), a)
    for first_pass in ("sweep", "forward"):
        perm = weight_matching(spec, a, b, first_pass=first_pass)
        aligned = spec.apply(perm, b)
        assert all(aligned[k].device.type == "cuda" and torch.equal(aligned[k], a[k]) for k in a)


# -- two trained networks ---------------------------------------------------------------


def _digits_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _train_digits(seed: int, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    model = _digits_mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_two_trained_mlps_merge_far_better_after_weight_matching() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    data, target = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(data, dtype=torch.float32) / 16.0, torch.tensor(target)
    model_a, model_b = _train_digits(1, x, y), _train_digits(2, x, y)
    spec = permgraph.infer(model_a, x[:4])
    a, b = model_a.state_dict(), model_b.state_dict()

    def midpoint_loss(perm: dict) -> float:
        aligned = spec.apply(perm, b)
        probe = _digits_mlp(0)
        probe.load_state_dict({k: 0.5 * (a[k] + aligned[k]) for k in a})
        with torch.no_grad():
            return nn.functional.cross_entropy(probe(x), y).item()

    naive = midpoint_loss(spec.identity())
    matched = midpoint_loss(weight_matching(spec, a, b))
    # the endpoints are good (< 0.2) and the naive midpoint is not: a barrier to remove
    assert naive > 0.8
    assert matched < 0.3 * naive, (matched, naive)


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_spec() -> tuple[permgraph.PermSpec, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    return permgraph.infer(model, torch.randn(2, 8)), model.state_dict()


def test_state_dicts_of_another_architecture_name_the_key_and_shapes(mlp_spec) -> None:
    spec, a = mlp_spec
    wider = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 2)).state_dict()
    with pytest.raises(SpecMismatchError) as info:
        weight_matching(spec, a, wider)
    msg = str(info.value)
    assert "state_b" in msg and "'0.weight'" in msg and "(48, 8)" in msg and "(32, 8)" in msg
    deeper = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 2))
    with pytest.raises(SpecMismatchError, match="state_a.*unexpected keys"):
        weight_matching(spec, deeper.state_dict(), a)
    with pytest.raises(SpecMismatchError, match="missing keys"):
        weight_matching(spec, a, {k: v for k, v in a.items() if k != "2.bias"})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_name_the_tensor(mlp_spec, bad: float) -> None:
    spec, a = mlp_spec
    b = dict(a)
    b["2.weight"] = a["2.weight"].clone()
    b["2.weight"][3, 4] = bad
    with pytest.raises(SpecMismatchError, match=r"state_b\['2.weight'\] has non-finite values"):
        weight_matching(spec, a, b)
    with pytest.raises(SpecMismatchError, match=r"state_a\['2.weight'\]"):
        weight_matching(spec, b, a)


def test_bad_arguments(mlp_spec) -> None:
    spec, a = mlp_spec
    with pytest.raises(MatchError, match="max_iter"):
        weight_matching(spec, a, a, max_iter=0)
    for tol in (-0.1, 1.0, "0", True):
        with pytest.raises(MatchError, match="tol must be"):
            weight_matching(spec, a, a, tol=tol)  # type: ignore[arg-type]
    for threads in (0, 1.5, True):
        with pytest.raises(MatchError, match="lap_threads must be"):
            weight_matching(spec, a, a, lap_threads=threads)  # type: ignore[arg-type]
    with pytest.raises(MatchError, match="order must be 'graph' or 'random'"):
        weight_matching(spec, a, a, order="sorted")  # type: ignore[arg-type]
    with pytest.raises(MatchError, match="first_pass must be 'sweep' or 'forward'"):
        weight_matching(spec, a, a, first_pass="backward")  # type: ignore[arg-type]
    with pytest.raises(LapError, match="unknown LAP backend"):
        weight_matching(spec, a, a, lap="magic")
    with pytest.raises(PermutationError):
        weight_matching(spec, a, a, init={"nope": torch.arange(3)})
    with pytest.raises(MatchError, match="PermSpec"):
        weight_matching("not a spec", a, a)  # type: ignore[arg-type]
    with pytest.raises(SpecMismatchError, match="mapping"):
        weight_matching(spec, a, [1, 2])  # type: ignore[arg-type]


def test_inputs_are_not_modified(mlp_spec) -> None:
    spec, a = mlp_spec
    b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(2)), a)
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    weight_matching(spec, a, b)
    assert all(torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k]) for k in a)


def test_align_in_one_call() -> None:
    from permgraph import PermGraphError, align

    torch.manual_seed(0)
    model_a = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    spec = permgraph.infer(model_a, torch.randn(2, 8))
    hidden = spec.random_permutation(torch.Generator().manual_seed(9))
    model_b = copy.deepcopy(model_a)
    model_b.load_state_dict(spec.apply(hidden, model_a.state_dict()))
    aligned, perm = align(model_a, model_b, torch.randn(2, 8))
    assert all(torch.equal(aligned[k], v) for k, v in model_a.state_dict().items())
    assert all(torch.equal(perm[k], v) for k, v in spec.inverse(hidden).items())
    aligned_act, _ = align(model_a, model_b, torch.randn(2, 8), method="activation",
                           batches=[torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    # every unit of this small net is live on these inputs: the activations pin it down too
    assert all(torch.equal(aligned_act[k], v) for k, v in model_a.state_dict().items())
    with pytest.raises(PermGraphError, match="batches"):
        align(model_a, model_b, torch.randn(2, 8), method="activation")
    with pytest.raises(PermGraphError, match="method"):
        align(model_a, model_b, torch.randn(2, 8), method="nonsense")
