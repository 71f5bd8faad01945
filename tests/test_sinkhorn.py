"""Sinkhorn re-basin: the operator, its implicit gradient, its memory, soft permutations of
state_dicts through layouts, and the matcher (exact recovery, digits midpoint, errors)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import permgraph
from permgraph.errors import PermGraphError, SpecMismatchError
from permgraph.match._common import MatchError
from permgraph.match._implicit import _log_iterations
from permgraph.match.sinkhorn import (
    SinkhornError,
    SinkhornHistory,
    sinkhorn,
    sinkhorn_matching,
    soft_apply,
)
from permgraph.match.weight import similarity_matrices, weight_matching
from permgraph.testing import ZOO
from tests.helpers import tiny_gpt2
from tests.test_merge_many import digits, evaluate, mlp, trained

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the operator ------------------------------------------------------------------------------


def test_doubly_stochastic():
    gen = torch.Generator().manual_seed(0)
    la = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    p = sinkhorn(la, tau=0.5, n_iter=5000, tol=1e-12)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-13, rtol=0)
    torch.testing.assert_close(p.sum(0), torch.ones(40, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 30.0, 3000.0])
@pytest.mark.parametrize("n_iter", [1, 7, 200])
def test_the_iterates_are_the_log_domain_ones(scale, n_iter):
    """The stabilised forward computes the plain log-domain iterates, even where ``exp``
    of the matrix overflows (scale 3000)."""
    gen = torch.Generator().manual_seed(0)
    la = torch.randn(40, 40, generator=gen, dtype=torch.float64) * scale
    p = sinkhorn(la, tau=1.0, n_iter=n_iter, tol=0.0)
    assert torch.isfinite(p).all()
    ref = _log_iterations(la, n_iter, 0.0)[0].exp()
    torch.testing.assert_close(p, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-12, rtol=0)


def test_low_temperature_approaches_the_permutation():
    gen = torch.Generator().manual_seed(1)
    planted = torch.randperm(30, generator=gen)
    la = torch.randn(30, 30, generator=gen)
    la[torch.arange(30), planted] += 5.0
    assert torch.equal(permgraph.lap.solve(la), planted)
    p = sinkhorn(la, tau=0.1, n_iter=500, tol=1e-6)
    assert float(p[torch.arange(30), planted].min()) > 0.99


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("n,tau", [(4, 1.0), (6, 0.3)])
def test_gradcheck_of_the_implicit_backward(solver, n, tau):
    gen = torch.Generator().manual_seed(n)
    la = (torch.randn(n, n, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    fn = lambda x: sinkhorn(x, tau=tau, n_iter=10000, tol=1e-14, solver=solver)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (la,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_catches_a_wrong_backward():
    """The negative control: the same check fails when the adjoint's correction is dropped."""
    from permgraph.match import _implicit as module

    la = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    original = module._adjoint_direct

    def wrong(p, a, b):
        alpha, beta = original(p, a, b)
        return alpha, torch.zeros_like(beta)

    module._adjoint_direct = wrong
    try:
        ok = torch.autograd.gradcheck(lambda x: sinkhorn(x, 1.0, 10000, 1e-14, solver="direct"), (la,), eps=1e-6,
                                      atol=1e-7, raise_exception=False)
    finally:
        module._adjoint_direct = original
    assert not ok


def test_implicit_gradient_equals_unrolled_autodiff_on_a_real_group():
    """The similarity of two trained digits MLPs' middle group as the matrix; the L2 distance
    of A to B under that group's soft permutation as the loss."""
    ma, mb = trained(0), trained(1)
    spec = permgraph.infer(ma, digits().x_train[:2])
    a = {k: v.double() for k, v in ma.state_dict().items()}
    b = {k: v.double() for k, v in mb.state_dict().items()}
    group = spec.groups[1]
    sim = similarity_matrices(spec, a, b)[group.name]
    base = (sim / sim.std()).requires_grad_()
    eye = {g.name: torch.eye(g.size, dtype=torch.float64) for g in spec.groups}

    def grad(**kw):
        base.grad = None
        p = sinkhorn(base, tau=0.5, n_iter=200, **kw)
        out = soft_apply(spec, eye | {group.name: p}, b)
        loss = sum(((a[k] - out[k]) ** 2).sum() for k in a)
        loss.backward()
        return base.grad.clone()

    unrolled = grad(tol=0.0, implicit=False)
    scale = float(unrolled.abs().max())
    assert scale > 1e-3
    for solver in ("direct", "cg"):
        implicit = grad(tol=1e-13, solver=solver)
        assert float((implicit - unrolled).abs().max()) < 1e-6 * scale, solver


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_saved_memory_is_flat_in_the_iterations_while_unrolling_grows():
    la = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    implicit = {it: _saved_bytes(lambda it=it: sinkhorn(la, 1.0, it, 0.0))[0] for it in (10, 1000)}
    unrolled = {it: _saved_bytes(lambda it=it: sinkhorn(la, 1.0, it, 0.0, implicit=False))[0] for it in (10, 1000)}
    assert implicit[10] == implicit[1000] == 64 * 64 * 8  # P alone
    assert unrolled[1000] > 50 * unrolled[10] > 50 * implicit[10]


def test_resident_memory_is_flat_in_the_iterations_while_unrolling_grows():
    """The process's resident memory, in a fresh interpreter, measured once the forward
    pass of 1000 iterations is done and its graph is held for the backward pass: it grows
    by nothing for the implicit gradient, and by the unrolled graph (66 MB) when
    unrolling."""
    script = textwrap.dedent(
        """
        import os, torch
        from permgraph.match.sinkhorn import sinkhorn
        torch.set_num_threads(1)
        la = torch.randn(64, 64, dtype=torch.float64).requires_grad_()
        page = os.sysconf("SC_PAGE_SIZE")
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        sinkhorn(la, 1.0, 10, 0.0).sum().backward()  # warm-up: lazy initialisation
        sinkhorn(la, 1.0, 10, 0.0, implicit=False).sum().backward()
        out = []
        for implicit in (True, False):
            for it in (10, 1000):
                before = rss()
                p = sinkhorn(la, 1.0, it, 0.0, implicit=implicit)
                out.append(rss() - before)
                p.pow(2).sum().backward()
                del p
        print(*out)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    imp10, imp1000, unr10, unr1000 = (int(v) / 2**20 for v in res.stdout.split())
    print(f"\nresident growth holding the graph (MiB): implicit 10 it {imp10:.2f}, 1000 it {imp1000:.2f}; "
          f"unrolled 10 it {unr10:.2f}, 1000 it {unr1000:.2f}")
    assert imp1000 < 1.0 and imp10 < 1.0
    assert unr1000 > 40.0


# -- soft permutations of state_dicts ----------------------------------------------------------


class _Layouts(nn.Module):
    """Blocks (flatten after a conv), offsets (a concatenation) and a shared axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.left = nn.Linear(3 * 4 * 4, 5)
        self.right = nn.Linear(3 * 4 * 4, 4)
        self.head = nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.cat([torch.relu(self.left(h)), torch.relu(self.right(h))], 1))


def test_soft_apply_of_permutation_matrices_is_apply():
    model = _Layouts()
    spec = permgraph.infer(model, torch.randn(2, 2, 4, 4))
    layouts = {str(m.layout) for g in spec.groups for m in g.members}
    assert any("blocks" in s for s in layouts) and any("offset" in s for s in layouts)
    sd = model.state_dict()
    for seed in range(3):
        p = spec.random_permutation(torch.Generator().manual_seed(seed))
        mats = {g: torch.eye(len(v))[v] for g, v in p.items()}
        out, ref = soft_apply(spec, mats, sd), spec.apply(p, sd)
        assert all(torch.equal(out[k], ref[k]) for k in sd)


def test_soft_apply_on_shared_axes_of_attention():
    """Heads and within-head units share the projections' axes; their matrices compose."""
    model = ZOO["gpt2"].build()
    spec = permgraph.infer(model, ZOO["gpt2"].inputs())
    shared = {(m.key, m.axis) for g in spec.groups for m in g.members}
    counts = [sum(1 for g in spec.groups for m in g.members if (m.key, m.axis) == ka) for ka in shared]
    assert max(counts) > 1
    sd = model.state_dict()
    p = spec.random_permutation(torch.Generator().manual_seed(0))
    out = soft_apply(spec, {g: torch.eye(len(v))[v] for g, v in p.items()}, sd)
    ref = spec.apply(p, sd)
    assert all(torch.equal(out[k], ref[k]) for k in sd)


def test_soft_apply_errors():
    model = mlp(8)
    spec = permgraph.infer(model, torch.randn(2, 64))
    with pytest.raises(SpecMismatchError, match="must be a"):
        soft_apply(spec, {g: torch.eye(3) for g in spec.names}, model.state_dict())
    with pytest.raises(SpecMismatchError):
        soft_apply(spec, {g: torch.eye(8) for g in spec.names}, mlp(16).state_dict())


# -- the matcher -------------------------------------------------------------------------------


def _hidden(name: str, seed: int = 1):
    entry = ZOO[name]
    model = entry.build()
    spec = permgraph.infer(model, entry.inputs())
    a = model.state_dict()
    secret = spec.random_permutation(torch.Generator().manual_seed(seed))
    return spec, a, spec.apply(secret, a), spec.inverse(secret)


def test_recovers_a_hidden_permutation_of_the_zoo_mlp():
    spec, a, b, truth = _hidden("mlp")
    perm, soft, hist = sinkhorn_matching(spec, a, b, steps=40, lr=1.0, n_iter=20, return_soft=True,
                                         return_history=True)
    assert all(torch.equal(perm[g], truth[g]) for g in perm)
    aligned = spec.apply(perm, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    assert isinstance(hist, SinkhornHistory) and len(hist.loss) == 40 and hist.loss[-1] < 1e-2 * hist.loss[0]
    for g in spec.groups:  # soft permutations (rows exact, columns as far as 20 iterations go)
        s = soft[g.name]
        torch.testing.assert_close(s.sum(1), torch.ones(g.size), atol=1e-5, rtol=0)
        torch.testing.assert_close(s.sum(0), torch.ones(g.size), atol=2e-2, rtol=0)
        assert torch.equal(permgraph.lap.solve(s), perm[g.name])


def test_recovers_a_hidden_permutation_of_resnet18():
    spec, a, b, truth = _hidden("resnet18")
    perm = sinkhorn_matching(spec, a, b, steps=12, lr=2.0)
    wrong = sum(int((perm[g] != truth[g]).sum()) for g in perm)
    assert wrong == 0, f"{wrong} of {spec.num_units} units misplaced"


def test_a_callable_objective_and_determinism():
    spec, a, b, truth = _hidden("mlp", seed=4)

    def l2(soft_b):
        return sum(((a[k] - soft_b[k]) ** 2).sum() for k in a)

    p1, s1 = sinkhorn_matching(spec, a, b, objective=l2, steps=30, lr=1.0, seed=3, return_soft=True)
    p2, s2 = sinkhorn_matching(spec, a, b, objective=l2, steps=30, lr=1.0, seed=3, return_soft=True, progress=True)
    assert all(torch.equal(p1[g], truth[g]) for g in p1)
    assert all(torch.equal(p1[g], p2[g]) and torch.equal(s1[g], s2[g]) for g in p1)
    p3, s3 = sinkhorn_matching(spec, a, b, objective=l2, steps=3, lr=1.0, seed=4, return_soft=True)
    assert not all(torch.equal(s1[g], s3[g]) for g in s1)


def test_midpoint_objective_on_digits():
    ma, mb = trained(0), trained(1)
    data = digits()
    spec = permgraph.infer(ma, data.x_train[:2])
    a, b = ma.state_dict(), mb.state_dict()
    batches = [(data.x_train[i : i + 256], data.y_train[i : i + 256]) for i in range(0, len(data.x_train), 256)]
    naive = evaluate(ma, {k: 0.5 * (a[k] + b[k]) for k in a}, "train")[0]
    perm = sinkhorn_matching(spec, a, b, objective="midpoint", model=ma, batches=batches, steps=150, lr=0.1)
    aligned = spec.apply(perm, b)
    loss = evaluate(ma, {k: 0.5 * (a[k] + aligned[k]) for k in a}, "train")[0]
    wm = spec.apply(weight_matching(spec, a, b), b)
    wm_loss = evaluate(ma, {k: 0.5 * (a[k] + wm[k]) for k in a}, "train")[0]
    ends = max(evaluate(ma, a, "train")[0], evaluate(ma, b, "train")[0])
    print(f"\ndigits midpoint loss (train): naive {naive:.3f}, weight matching {wm_loss:.3f}, Sinkhorn {loss:.3f}; "
          f"endpoints <= {ends:.3f}")
    margin = ends + 0.25 * (naive - ends)  # a quarter of the way from the endpoints to naive
    assert naive > margin  # the identity fails the criterion
    assert loss < margin
    assert loss < 1.5 * wm_loss


def test_bad_input():
    model = mlp(8)
    spec = permgraph.infer(model, torch.randn(2, 64))
    a = model.state_dict()
    b = mlp(8).state_dict()
    for tau in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(SinkhornError, match="temperature"):
            sinkhorn(torch.zeros(3, 3), tau=tau)
        with pytest.raises(SinkhornError, match="temperature"):
            sinkhorn_matching(spec, a, b, tau=tau)
    bad = torch.zeros(3, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(SinkhornError, match="non-finite"):
        sinkhorn(bad)
    with pytest.raises(SinkhornError, match="non-finite"):
        sinkhorn(bad, implicit=False)
    with pytest.raises(SinkhornError, match="square"):
        sinkhorn(torch.zeros(3, 4))
    with pytest.raises(SinkhornError, match="n_iter"):
        sinkhorn(torch.zeros(3, 3), n_iter=0)
    with pytest.raises(SinkhornError, match="solver"):
        sinkhorn(torch.zeros(3, 3), solver="qr")
    with pytest.raises(SinkhornError, match="non-finite|objective is nan"):  # a diverging objective
        sinkhorn_matching(spec, a, b, objective=lambda sb: sb["0.weight"].sum() * float("nan"), steps=3)
    with pytest.raises(SpecMismatchError, match="state_b"):
        sinkhorn_matching(spec, a, mlp(16).state_dict())
    with pytest.raises(MatchError, match="unknown objective"):
        sinkhorn_matching(spec, a, b, objective="l1")
    with pytest.raises(MatchError, match="model="):
        sinkhorn_matching(spec, a, b, objective="midpoint", batches=[(torch.randn(2, 64), torch.tensor([0, 1]))])
    with pytest.raises(MatchError, match="batches"):
        sinkhorn_matching(spec, a, b, objective="midpoint", model=model, batches=[], steps=2)
    with pytest.raises(MatchError, match="steps"):
        sinkhorn_matching(spec, a, b, steps=0)
    assert issubclass(SinkhornError, PermGraphError) and issubclass(SinkhornError, ValueError)


def test_per_head_groups_soft_apply_in_spec_order_and_are_recovered():
    """Per-head groups (``heads="independent"``) do not commute with the heads group: the
    soft permutations compose in spec order, as `PermSpec.apply` does, so a permutation
    matrix per group gives apply's result exactly and a hidden permutation is recovered."""
    model, _, spec = tiny_gpt2(heads="independent", n_layer=1)
    assert len(spec.groups) > 9  # the within-head units split per head
    a = model.state_dict()
    hidden = spec.random_permutation(torch.Generator().manual_seed(1))
    b = spec.apply(hidden, a)
    eye = {g.name: torch.eye(g.size)[hidden[g.name]] for g in spec.groups}
    soft = soft_apply(spec, eye, a)
    assert all(torch.allclose(soft[k], b[k], atol=1e-6) for k in b if b[k].is_floating_point())
    perm = sinkhorn_matching(spec, a, b)
    truth = spec.inverse(hidden)
    assert all(torch.equal(perm[g], truth[g]) for g in perm)
