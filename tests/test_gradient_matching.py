"""Gradient matching at initialisation (Benzing et al. 2022, Appendix B): permgraph.match.gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph.errors import PermutationError, SpecMismatchError
from permgraph.examples.digits import batches, evaluator, load_digits, make_mlp
from permgraph.match import MatchError
from permgraph.match.gradient import GradientMatchingHistory, gradient_matching, gradient_objective, loss_directions

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int, widths=(6, 12, 10, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    return make_mlp(widths)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def small():
    a, b = _mlp(0), _mlp(1)
    spec = permgraph.infer(a, torch.randn(2, 6))
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(3)]
    return spec, a, b, data


def test_weights_as_directions_recover_a_permuted_copy(small):
    spec, a, _, _ = small
    sa = _state(a)
    for seed in range(3):
        p = spec.random_permutation(torch.Generator().manual_seed(seed))
        sb = spec.apply(p, sa)
        perm = gradient_matching(spec, sa, sb, sa, sb, seed=seed)
        aligned = spec.apply(perm, sb)
        assert all(torch.equal(aligned[k], sa[k]) for k in sa)


def test_objective_matches_its_definition_and_rises(small):
    spec, a, b, data = small
    sa, sb = _state(a), _state(b)
    da, db = loss_directions(a, data), loss_directions(b, data)
    perm, hist = gradient_matching(spec, sa, sb, da, db, return_history=True)
    assert isinstance(hist, GradientMatchingHistory) and hist.converged and hist.sweeps >= 1
    assert all(y >= x for x, y in zip(hist.objective, hist.objective[1:]))
    # J by hand: <d_A, P(B)> + <P^-1(A), d_B>
    pb, inv = spec.apply(perm, sb), spec.apply(spec.inverse(perm), sa)
    by_hand = sum(float((da[k].double() * pb[k].double()).sum() + (inv[k].double() * db[k].double()).sum()) for k in sa)
    assert gradient_objective(spec, sa, sb, da, db, perm) == pytest.approx(by_hand, rel=1e-6, abs=1e-7)
    assert hist.objective[-1] == pytest.approx(by_hand, rel=1e-6, abs=1e-7)
    # a local optimum: no single group's best response improves it, and it beats random permutations
    for g in spec.groups:
        s = (permgraph.match.similarity_matrices(spec, da, sb, perm)[g.name]
             + permgraph.match.similarity_matrices(spec, sa, db, perm)[g.name])
        best = permgraph.lap.solve(s)
        trial = dict(perm, **{g.name: best})
        assert gradient_objective(spec, sa, sb, da, db, trial) <= by_hand + 1e-9 * max(1.0, abs(by_hand))
    gen = torch.Generator().manual_seed(0)
    randoms = [gradient_objective(spec, sa, sb, da, db, spec.random_permutation(gen)) for _ in range(20)]
    assert by_hand > max(randoms)


def test_plain_directions_are_minus_the_mean_gradient(small):
    _, a, _, data = small
    d = loss_directions(a, data)
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    a.zero_grad()
    F.cross_entropy(a(x), y).backward()
    for k, p in a.named_parameters():
        assert torch.allclose(d[k], -p.grad, atol=1e-6)
    a.zero_grad(set_to_none=True)


def test_foof_preconditions_linear_weights():
    lin = nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    d = loss_directions(lin, [(x, y)], precondition="foof", damping=0.5)
    g = -loss_directions(lin, [(x, y)])["weight"].double()
    c = x.double().T @ x.double() / 20
    lam = 0.5 * float(torch.trace(c)) / 4
    expected = -g @ torch.linalg.inv(c + lam * torch.eye(4, dtype=torch.float64))
    assert torch.allclose(d["weight"].double(), expected, atol=1e-5)
    assert torch.allclose(d["bias"], loss_directions(lin, [(x, y)])["bias"])  # bias keeps -grad
    assert lin.weight.grad is None  # the model's gradients are left as they were


def test_bad_inputs_are_named(small):
    spec, a, b, data = small
    sa, sb = _state(a), _state(b)
    da = loss_directions(a, data)
    with pytest.raises(SpecMismatchError, match="0.weight"):
        gradient_matching(spec, sa, sb, {**da, "0.weight": torch.zeros(2, 2)}, da)
    with pytest.raises(SpecMismatchError, match="lacks"):
        gradient_matching(spec, sa, sb, {**da, "nope": torch.zeros(1)}, da)
    with pytest.raises(SpecMismatchError, match="NaN"):
        gradient_matching(spec, sa, sb, da, {**da, "2.bias": torch.full_like(da["2.bias"], float("nan"))})
    with pytest.raises(MatchError, match="max_iter"):
        gradient_matching(spec, sa, sb, da, da, max_iter=0)
    with pytest.raises(PermutationError):
        gradient_matching(spec, sa, sb, da, da, init={g.name: torch.zeros(g.size, dtype=torch.int64) for g in spec.groups})
    with pytest.raises(MatchError, match="precondition"):
        loss_directions(a, data, precondition="kfac")
    with pytest.raises(MatchError, match="damping"):
        loss_directions(a, data, damping=0)
    with pytest.raises(MatchError, match="empty"):
        loss_directions(a, [])
    with pytest.raises(MatchError, match="pair"):
        loss_directions(a, [torch.randn(4, 6)])


def test_matched_random_inits_average_above_chance():
    """The science (Benzing App. B): on digits, two untrained MLPs whose units are matched by
    their gradients average to a model far above chance; their plain average stays near it."""
    data = load_digits()
    widths = (64, 128, 128, 10)
    spec = permgraph.infer(make_mlp(widths), data.x_train[:2])
    evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)
    train = batches(data.x_train, data.y_train, 2000)
    for seeds in ((0, 1), (2, 3)):
        a, b = _mlp(seeds[0], widths), _mlp(seeds[1], widths)
        sa, sb = _state(a), _state(b)
        perm = gradient_matching(spec, sa, sb, loss_directions(a, train), loss_directions(b, train))
        matched = evaluate(permgraph.interpolate(sa, spec.apply(perm, sb), 0.5))[1]
        naive = evaluate(permgraph.interpolate(sa, sb, 0.5))[1]
        assert naive < 0.3 and matched > 0.5, (seeds, naive, matched)


def test_generic_over_specs_a_batchnorm_cnn():
    """Not an MLP-only routine: on a CNN with BatchNorm (running statistics, integer counters,
    a flatten into a Linear), weights as directions recover a permuted copy exactly, and
    loss directions (FOOF on the Linear only) give a valid permutation."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    x = torch.randn(4, 1, 4, 4)
    spec = permgraph.infer(net, x)
    assert len(spec.groups) == 2
    sa = {k: v + torch.rand_like(v) if "running" in k else v.clone() for k, v in net.state_dict().items()}
    sb = spec.apply(spec.random_permutation(torch.Generator().manual_seed(1)), sa)
    perm = gradient_matching(spec, sa, sb, sa, sb)
    aligned = spec.apply(perm, sb)
    assert all(torch.equal(aligned[k], sa[k]) for k in sa)
    d = loss_directions(net, [(x, torch.randint(0, 3, (4,)))], precondition="foof")
    assert "1.running_mean" not in d and "6.weight" in d
    perm2, hist = gradient_matching(spec, sa, sb, d, d, return_history=True)
    spec.check_permutation(perm2)
    assert hist.objective[-1] >= hist.objective[0]
