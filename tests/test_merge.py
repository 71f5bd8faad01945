"""Interpolation, BatchNorm reset and REPAIR.

REPAIR is checked against statistics measured independently (forward hooks on the modules,
not the fx program REPAIR runs), and on the barrier of two BatchNorm CNNs trained on digits.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph.examples.digits import batches, evaluator, load_digits, train
from permgraph.match import weight_matching
from permgraph.merge import MergeError, interpolate, repair, reset_batchnorm
from permgraph.metrics import interpolation_curve

pytestmark = pytest.mark.usefixtures("one_thread")


# -- interpolate ---------------------------------------------------------------------------------


def _bn_state() -> dict[str, torch.Tensor]:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    net.train()
    net(torch.randn(5, 1, 8, 8))  # running stats and num_batches_tracked move
    sd = net.state_dict()
    sd["half"] = torch.randn(7).to(torch.bfloat16)
    sd["mask"] = torch.tensor([True, False])
    return sd


def test_interpolate_endpoints_are_bit_exact() -> None:
    a = _bn_state()
    torch.manual_seed(1)
    b = {k: (v + torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v + 3 if v.dtype != torch.bool else ~v)
         for k, v in _bn_state().items()}
    at0, at1 = interpolate(a, b, 0.0), interpolate(a, b, 1.0)
    assert list(at0) == list(a)
    for k in a:
        assert torch.equal(at0[k], a[k]) and at0[k].dtype == a[k].dtype, k
        if a[k].is_floating_point():
            assert torch.equal(at1[k], b[k]), k
        else:  # integer and boolean tensors come from A at every alpha
            assert torch.equal(at1[k], a[k]), k
        assert at0[k].data_ptr() != a[k].data_ptr()  # new tensors: the inputs stay untouched
    mid = interpolate(a, b, 0.25)
    assert torch.equal(mid["0.weight"], torch.lerp(a["0.weight"], b["0.weight"], 0.25))
    assert torch.equal(mid["1.num_batches_tracked"], a["1.num_batches_tracked"])
    assert mid["half"].dtype == torch.bfloat16
    assert torch.allclose(mid["half"].float(), 0.75 * a["half"].float() + 0.25 * b["half"].float(), atol=1e-2)


def test_interpolate_refuses_mismatches() -> None:
    a = {"w": torch.zeros(2), "n": torch.tensor(1)}
    with pytest.raises(permgraph.SpecMismatchError, match=r"only in A \['n'\]"):
        interpolate(a, {"w": torch.zeros(2)}, 0.5)
    with pytest.raises(permgraph.SpecMismatchError, match=r"'w' has shape \(2,\) in A but \(3,\) in B"):
        interpolate(a, {"w": torch.zeros(3), "n": torch.tensor(1)}, 0.5)
    with pytest.raises(permgraph.SpecMismatchError, match="float32 in A but torch.float64"):
        interpolate(a, {"w": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(1)}, 0.5)
    with pytest.raises(MergeError, match="finite"):
        interpolate(a, a, float("nan"))


# -- BatchNorm reset ---------------------------------------------------------------------------------

def test_reset_batchnorm_recomputes_running_stats_from_data() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Dropout(0.5), nn.Linear(4, 2))
    net.eval()
    data = [torch.randn(16, 3) * 2 + 1 for _ in range(4)]
    assert reset_batchnorm(net, data) == 1
    with torch.no_grad():
        h = torch.cat([net[0](x) for x in data])
    bn = net[1]
    # momentum=None: the cumulative average of the batch means (equal batches: the data mean)
    # and of the unbiased batch variances
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)
    expected_var = torch.stack([net[0](x).detach().var(0, unbiased=True) for x in data]).mean(0)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 4
    assert bn.momentum == 0.3 and not net.training and not bn.training and not net[2].training
    assert reset_batchnorm(net, data, max_batches=2) == 1 and int(bn.num_batches_tracked) == 2
    pairs = [(x, torch.zeros(len(x))) for x in data]
    reset_batchnorm(net, pairs, inputs=lambda b: b[0])
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)


def test_reset_batchnorm_errors() -> None:
    with pytest.raises(MergeError, match="no BatchNorm layer"):
        reset_batchnorm(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(MergeError, match="yielded nothing"):
        reset_batchnorm(nn.BatchNorm1d(2), [])
    with pytest.raises(MergeError, match="cannot read a batch of type int"):
        reset_batchnorm(nn.BatchNorm1d(2), [3])


# -- REPAIR: exact statistics --------------------------------------------------------------------

def _stats(model: nn.Module, x: torch.Tensor, modules: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of the outputs of named modules, by forward hooks."""
    out: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(m).register_forward_hook(lambda mod, i, o, m=m: out.__setitem__(m, o)) for m in modules]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {m: (o.double().mean(0), o.double().var(0, unbiased=False).sqrt()) for m, o in out.items()}


def _pair(make, seed_b: int = 1) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(seed_b)
    return a, make()


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_repair_gives_each_unit_the_interpolated_statistics(alpha: float) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))

    model_a, model_b = _pair(make)
    x = torch.randn(256, 6) * 1.5 + 0.5
    spec = permgraph.infer(make(), x)
    merged = make()
    merged.load_state_dict(interpolate(model_a.state_dict(), model_b.state_dict(), alpha))
    hidden = ["0", "2"]
    before = _stats(merged, x, hidden)
    report = repair(model_a, model_b, merged, [x], spec, alpha)  # one batch: batch statistics are exact
    sa, sb, after = _stats(model_a, x, hidden), _stats(model_b, x, hidden), _stats(merged, x, hidden)
    for m in hidden:
        target_mean = (1 - alpha) * sa[m][0] + alpha * sb[m][0]
        target_std = (1 - alpha) * sa[m][1] + alpha * sb[m][1]
        assert not torch.allclose(before[m][1], target_std, rtol=0.05)  # it needed repair
        assert torch.allclose(after[m][0], target_mean, atol=1e-4), m
        assert torch.allclose(after[m][1], target_std, rtol=1e-3, atol=1e-4), m
    # the logits belong to no group: untouched
    assert torch.equal(merged[4].weight, interpolate(model_a.state_dict(), model_b.state_dict(), alpha)["4.weight"])
    assert [(c.module, c.keys) for c in report.corrected] == [("0", ("0.weight", "0.bias")), ("2", ("2.weight", "2.bias"))]
    assert report.skipped == [] and report.uncovered == {}
    assert "REPAIR at alpha=" in str(report) and "0.weight, 0.bias" in str(report)


def test_repair_corrects_a_norm_after_a_bias_free_layer_and_says_why_it_skips() -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 8, bias=False), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))

    model_a, model_b = _pair(make)
    with torch.no_grad():  # give the norms distinct affine parameters
        model_a[1].weight.uniform_(0.5, 2)
        model_b[1].bias.uniform_(-1, 1)
    x = torch.randn(128, 5)
    spec = permgraph.infer(make(), x[:4])  # other batch shapes: traced again
    merged = make()
    merged.load_state_dict(interpolate(model_a.state_dict(), model_b.state_dict(), 0.5))
    report = repair(model_a, model_b, merged, [x], spec, 0.5)
    assert [(c.op, c.keys) for c in report.corrected] == [("aten.layer_norm.default", ("1.weight", "1.bias"))]
    assert len(report.skipped) == 1
    assert report.skipped[0].op == "aten.linear.default"
    assert "no additive parameter (bias)" in report.skipped[0].reason
    assert "aten.layer_norm.default in 1 right after it is corrected" in report.skipped[0].reason
    sa, sb, after = (_stats(m, x, ["1"])["1"] for m in (model_a, model_b, merged))
    assert torch.allclose(after[0], (sa[0] + sb[0]) / 2, atol=1e-4)
    assert torch.allclose(after[1], (sa[1] + sb[1]) / 2, rtol=1e-3, atol=1e-4)


def test_repair_errors() -> None:
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = permgraph.infer(mlp, torch.randn(2, 3))
    with pytest.raises(MergeError, match="yielded nothing"):
        repair(mlp, mlp, copy.deepcopy(mlp), [], spec, 0.5)
    with pytest.raises(MergeError, match="at least two samples"):
        repair(mlp, mlp, copy.deepcopy(mlp), [torch.randn(1, 3)], spec, 0.5)
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(permgraph.SpecMismatchError, match="model_b"):
        repair(mlp, other, mlp, [torch.randn(4, 3)], spec, 0.5)


def test_outside_torch_distributed_the_new_arguments_change_nothing() -> None:
    from permgraph.distributed import DistributedError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x = [torch.randn(16, 3) for _ in range(4)]
    twin = copy.deepcopy(net)
    reset_batchnorm(net, x)
    reset_batchnorm(twin, x, process_group=False, timeout=5)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(DistributedError, match="not initialised"):
        reset_batchnorm(net, x, process_group=object())
    a, b = _pair(lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)))
    spec = permgraph.infer(a, x[0][:2])
    merged = [copy.deepcopy(a) for _ in range(2)]
    for m in merged:
        m.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.5))
    repair(a, b, merged[0], x, spec, 0.5)
    repair(a, b, merged[1], x, spec, 0.5, process_group=False, timeout=5)
    assert all(torch.equal(v, merged[1].state_dict()[k]) for k, v in merged[0].state_dict().items())
    with pytest.raises(DistributedError, match="not initialised"):
        repair(a, b, merged[0], x, spec, 0.5, process_group=object())


# -- BN reset and REPAIR on two BatchNorm CNNs trained on digits ---------------------------------

def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def test_bn_reset_and_repair_lower_the_barrier_of_batchnorm_cnns() -> None:
    data = load_digits(images=True)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(train(_cnn(), data.x_train, data.y_train, epochs=4, seed=seed))
    model_a, model_b = models
    n = (len(data.x_train) // 128) * 128  # equal batches: one traced program
    fit = batches(data.x_train[:n], batch_size=128)
    spec = permgraph.infer(_cnn(), fit[0])
    sa, sb = model_a.state_dict(), model_b.state_dict()
    aligned = spec.apply(weight_matching(spec, sa, sb), sb)
    model_b_aligned = _cnn().eval()
    model_b_aligned.load_state_dict(aligned)
    work = _cnn()
    evaluate = evaluator(work, data.x_test, data.y_test)

    def bn_reset(alpha: float, sd: dict) -> dict:
        work.load_state_dict(sd)
        reset_batchnorm(work, fit)
        return copy.deepcopy(work.state_dict())

    reports = []

    def repaired(alpha: float, sd: dict) -> dict:
        work.load_state_dict(sd)
        reports.append(repair(model_a, model_b_aligned, work, fit, spec, alpha))
        return copy.deepcopy(work.state_dict())

    alphas = [0.0, 0.5, 1.0]
    plain = interpolation_curve(sa, aligned, evaluate, alphas)
    reset = interpolation_curve(sa, aligned, evaluate, alphas, transform=bn_reset)
    fixed = interpolation_curve(sa, aligned, evaluate, alphas, transform=repaired)
    assert min(plain.accuracy[0], plain.accuracy[-1]) > 0.9  # both endpoints learned digits
    assert plain.loss_barrier > 0.2  # interpolating BatchNorm nets collapses the variance
    assert reset.loss_barrier < 0.6 * plain.loss_barrier, (plain.loss_barrier, reset.loss_barrier)
    assert fixed.loss_barrier < 0.6 * plain.loss_barrier, (plain.loss_barrier, fixed.loss_barrier)
    # the endpoints barely move: REPAIR at alpha 0 and 1 restores the models' own statistics
    assert abs(fixed.loss[0] - plain.loss[0]) < 0.02 and abs(fixed.loss[-1] - plain.loss[-1]) < 0.02
    mid = reports[1]
    assert {c.module for c in mid.corrected} == {"1", "4"}  # the BatchNorms
    assert {c.module for c in mid.skipped} == {"0", "3"}  # the bias-free convolutions before them
    assert all(r < 1 for r in mid.std_ratio.values())  # the collapse REPAIR undid
    assert mid.uncovered == {}


def test_cross_entropy_helper_matches_torch() -> None:
    # evaluator is the demo's and the tests' evaluation: check it against a direct computation
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loss, acc = evaluator(model, x, y, batch_size=3)(model.state_dict())
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)
    assert acc == pytest.approx(float((out.argmax(1) == y).float().mean()))


def test_a_spec_read_back_from_a_dict_drives_weight_matching_and_repair() -> None:
    # (replaces the check that such a spec was refused: the model is now analysed on the
    # first batch, and the spec's groups found in it by their members)
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))

    a, b = make(0), make(1)
    batches = [torch.randn(32, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    spec = permgraph.infer(a, batches[0])
    loaded = permgraph.PermSpec.from_dict(json.loads(spec.to_json()))
    assert loaded.analysis is None
    perm = permgraph.weight_matching(spec, a.state_dict(), b.state_dict())
    again = permgraph.weight_matching(loaded, a.state_dict(), b.state_dict())
    assert all(torch.equal(perm[k], again[k]) for k in perm)
    aligned = spec.apply(perm, b.state_dict())
    b.load_state_dict(aligned)
    results = []
    for s in (spec, loaded):
        merged = make(2)
        merged.load_state_dict(interpolate(a.state_dict(), aligned, 0.5))
        report = repair(a, b, merged, batches, s, 0.5)
        results.append((report, merged.state_dict()))
    (r1, sd1), (r2, sd2) = results
    assert [c.node for c in r1.corrected] == [c.node for c in r2.corrected] == ["linear", "linear_1"]
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert loaded.analysis is None
    with pytest.raises(MergeError, match="empty"):
        repair(a, b, make(2), [], permgraph.PermSpec.from_dict(spec.to_dict()), 0.5)
