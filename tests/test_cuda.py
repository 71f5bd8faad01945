"""The GPU path: every matcher, metric and merge step runs on the tensors' device, keeps
its results there, and agrees with the CPU.

The module runs where CUDA is available and is skipped elsewhere. ``PERMGRAPH_TEST_DEVICE=cpu``
runs it on the CPU instead (to check the tests themselves on a machine without a GPU; the
"stays on the device" checks are then trivially true).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import permgraph
from permgraph.match import (
    activation_matching,
    merge_many,
    sinkhorn_matching,
    ste_matching,
    weight_matching,
)
from permgraph.merge import interpolate, repair, reset_batchnorm
from permgraph.metrics import fixed_points, interpolation_curve, loss_barrier

DEVICE = torch.device(os.environ.get("PERMGRAPH_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("one_thread"),
]


def _mlp(widths: tuple[int, ...] = (64, 128, 128, 10), bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _on(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in state.items()}


def _hidden(model: nn.Module, example: torch.Tensor, seed: int = 0):
    """The spec, A's state, B = A under a hidden permutation (plus a little noise), and the
    permutation that aligns B back."""
    spec = permgraph.infer(model, example)
    a = model.state_dict()
    secret = spec.random_permutation(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    b = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
         for k, v in spec.apply(secret, a).items()}
    return spec, a, b, spec.inverse(secret)


def _batches(count: int = 8, rows: int = 64, features: int = 64) -> list[torch.Tensor]:
    return [torch.randn(rows, features, generator=torch.Generator().manual_seed(100 + i)) for i in range(count)]


def _agree(p: dict[str, torch.Tensor], q: dict[str, torch.Tensor]) -> float:
    return sum(int((p[g].cpu() == q[g].cpu()).sum()) for g in p) / sum(p[g].numel() for g in p)


def test_weight_matching_runs_on_the_device_and_agrees_with_the_cpu() -> None:
    spec, a, b, truth = _hidden(_mlp(), torch.randn(2, 64))
    on_cpu = weight_matching(spec, a, b)
    da, db = _on(a, DEVICE), _on(b, DEVICE)
    perm = weight_matching(spec, da, db)
    assert all(torch.equal(perm[g].cpu(), truth[g]) and torch.equal(on_cpu[g], truth[g]) for g in truth)
    aligned = spec.apply(perm, db)
    assert all(v.device.type == DEVICE.type for v in aligned.values())
    torch.testing.assert_close(_on(aligned, torch.device("cpu")), a, atol=1e-2, rtol=0)
    # a permutation on the device applies too
    again = spec.apply({g: p.to(DEVICE) for g, p in perm.items()}, db)
    assert all(torch.equal(again[k], aligned[k]) for k in aligned)


def test_activation_matching_with_models_on_the_device() -> None:
    model = _mlp()
    spec, a, b, truth = _hidden(model, torch.randn(2, 64))
    ma, mb = _mlp(), _mlp()
    ma.load_state_dict(a)
    mb.load_state_dict(b)
    on_cpu = activation_matching(spec, ma, mb, _batches())
    ma.to(DEVICE)
    mb.to(DEVICE)
    perm = activation_matching(spec, ma, mb, _batches())  # CPU batches, moved to the models
    perm_dev = activation_matching(spec, ma, mb, [x.to(DEVICE) for x in _batches()])
    assert _agree(perm, on_cpu) >= 0.99 and _agree(perm_dev, perm) == 1.0
    assert _agree(perm, truth) >= 0.95  # dead units on this data cannot be told apart
    assert next(ma.parameters()).device.type == DEVICE.type  # the models stay where they were


def test_activation_statistics_live_on_the_models_device() -> None:
    from permgraph.match.activation import _accumulate

    model = _mlp().to(DEVICE)
    spec = permgraph.infer(model, torch.randn(2, 64, device=DEVICE))
    stats, _ = _accumulate(spec, model, copy.deepcopy(model), _batches(2), "correlation", False)
    assert all(s.cross.device.type == DEVICE.type and s.shift_a.device.type == DEVICE.type for s in stats.values())
    assert all(s.similarity().device.type == "cpu" for s in stats.values())  # the LAP's input


def test_sinkhorn_recovers_the_hidden_permutation_on_the_device() -> None:
    spec, a, b, truth = _hidden(_mlp((16, 32, 32, 4)), torch.randn(2, 16))
    perm = sinkhorn_matching(spec, _on(a, DEVICE), _on(b, DEVICE), steps=40, lr=1.0, n_iter=20)
    assert all(torch.equal(perm[g].cpu(), truth[g]) for g in truth)


def test_ste_runs_on_the_device_and_keeps_the_true_alignment() -> None:
    model = _mlp((64, 64, 64, 10))
    spec, a, b, truth = _hidden(model, torch.randn(2, 64))
    ma, mb = _mlp((64, 64, 64, 10)).to(DEVICE), _mlp((64, 64, 64, 10)).to(DEVICE)
    ma.load_state_dict(a)
    mb.load_state_dict(b)
    g = torch.Generator().manual_seed(0)
    data = [(x, torch.randint(0, 10, (len(x),), generator=g)) for x in _batches(4)]
    perm = ste_matching(spec, ma, mb, data, steps=6, lr=1e-3)
    spec.check_permutation({k: v.cpu() for k, v in perm.items()})
    assert _agree(perm, truth) >= 0.95
    assert next(mb.parameters()).device.type == DEVICE.type


def test_merge_many_on_the_device() -> None:
    model = _mlp((16, 32, 32, 4))
    spec = permgraph.infer(model, torch.randn(2, 16))
    states = [_on(_mlp((16, 32, 32, 4)).state_dict(), DEVICE) for _ in range(3)]
    result = merge_many(spec, states, max_iter=5)
    merged = result.merged if hasattr(result, "merged") else result[0]
    assert all(v.device.type == DEVICE.type for v in merged.values() if isinstance(v, torch.Tensor))


def test_interpolation_barrier_and_fixed_points_on_the_device() -> None:
    spec, a, b, truth = _hidden(_mlp(), torch.randn(2, 64))
    da, db = _on(a, DEVICE), _on(b, DEVICE)
    mid = interpolate(da, db, 0.5)
    assert all(v.device.type == DEVICE.type for v in mid.values())
    net = _mlp().to(DEVICE)
    x = torch.randn(256, 64, device=DEVICE)
    net.load_state_dict(da)
    with torch.no_grad():
        target = net(x)

    def evaluate(state):  # distance to A's function: 0 at both ends (B is A permuted)
        net.load_state_dict(state)
        with torch.no_grad():
            return float((net(x) - target).square().mean())

    aligned = spec.apply(weight_matching(spec, da, db), db)
    naive = loss_barrier(interpolation_curve(da, db, evaluate, 5))
    after = loss_barrier(interpolation_curve(da, aligned, evaluate, 5))
    assert naive > 1e-3 and after < 1e-5, (naive, after)
    fp = fixed_points({g: p.to(DEVICE) for g, p in truth.items()})
    assert 0.0 <= fp.overall <= 1.0


def test_reset_batchnorm_and_repair_on_the_device_agree_with_the_cpu() -> None:
    x = _batches(6)
    bn = _mlp(bn=True)
    bn_dev = copy.deepcopy(bn).to(DEVICE)
    reset_batchnorm(bn, x)
    reset_batchnorm(bn_dev, x)
    for k, v in bn.state_dict().items():
        got = bn_dev.state_dict()[k]
        assert got.device.type == DEVICE.type
        torch.testing.assert_close(got.cpu(), v, rtol=1e-4, atol=1e-5)

    a, b = _mlp(), _mlp()
    spec = permgraph.infer(a, x[0][:2])
    merged = _mlp()
    merged.load_state_dict(interpolate(a.state_dict(), b.state_dict(), 0.5))
    devs = [copy.deepcopy(m).to(DEVICE) for m in (a, b, merged)]
    repair(a, b, merged, x, spec, 0.5)
    report = repair(*devs, x, spec, 0.5)
    assert report.corrected
    for k, v in merged.state_dict().items():
        got = devs[2].state_dict()[k]
        assert got.device.type == DEVICE.type
        torch.testing.assert_close(got.cpu(), v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_two_ranks_with_models_on_gpus(tmp_path: Path, backend: str) -> None:
    """Two ranks whose models (and so statistics) live on GPUs: gloo reduces through the
    CPU, NCCL on the GPUs (one each: NCCL needs two devices); the results equal one CPU
    process on all the batches."""
    if DEVICE.type != "cuda":
        pytest.skip("the models are on the CPU: tests/test_distributed.py covers that")
    if backend == "nccl" and (torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available()):
        pytest.skip("NCCL with two ranks needs two GPUs")
    from tests.test_distributed import WORKER, _case

    case = _case()
    torch.save(case, tmp_path / "case.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PERMGRAPH_WORKER_DEVICE": "cuda", "PERMGRAPH_WORKER_BACKEND": backend}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), "agree", str(tmp_path / "case.pt"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(2)]
    from tests.distributed_worker import build

    widths = case["widths"]
    a, b = build(case["a"], widths).cpu(), build(case["b"], widths).cpu()
    spec = permgraph.infer(a, case["batches"][0][:2])
    single = activation_matching(spec, a, b, case["batches"])
    bn = build(case["bn"], widths, bn=True).cpu()
    reset_batchnorm(bn, case["batches"])
    for r in ranks:
        assert r["repair_device"].startswith("cuda") and r["bn_device"].startswith("cuda")
        assert _agree(r["perm"], single) >= 0.99 and _agree(r["perm"], ranks[0]["perm"]) == 1.0
        for k, v in bn.state_dict().items():
            torch.testing.assert_close(r["bn"][k], v, rtol=1e-4, atol=1e-5, msg=k)
