"""One rank of the distributed tests (`tests/test_distributed.py`), launched by torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py
SCENARIO CASE_FILE OUT_DIR``: every rank loads the models and data the test wrote to
``CASE_FILE``, takes its shard of the batches (batch ``i`` goes to rank ``i % world``), runs
the scenario and writes what it got (results, or the class and message of the error it
raised) to ``OUT_DIR/rank{r}.pt``. The test compares the ranks with each other and with one
process on all the batches.

The environment can move the models: ``PERMGRAPH_WORKER_DEVICE=cuda`` puts rank ``r``'s
models on GPU ``r % device_count`` (`tests/test_cuda.py`), and ``PERMGRAPH_WORKER_BACKEND``
picks the process group's backend (default gloo).

Scenarios:
    agree: activation matching, similarities, REPAIR and BatchNorm reset, every rank with
        the same models.
    disagree: steps in which the ranks differ (model shapes, weights, a failing batch), then
        a rank that never arrives (last: it leaves a collective unfinished).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import permgraph
from permgraph.distributed import DistributedError
from permgraph.match import activation_matching, activation_similarity
from permgraph.merge import interpolate, repair, reset_batchnorm

TIMEOUT = 20.0  # seconds: far above a step's real wait, far below the test's own timeout


def mlp(widths: tuple[int, ...], bn: bool = False) -> nn.Sequential:
    """The test's MLP (as in `tests/test_distributed.py`)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


DEVICE = torch.device("cpu")


def build(state: dict[str, torch.Tensor], widths: tuple[int, ...], bn: bool = False) -> nn.Module:
    model = mlp(widths, bn)
    model.load_state_dict(state)
    return model.eval().to(DEVICE)


def shard(batches: list[Any], rank: int, world: int) -> list[Any]:
    return batches[rank::world]


def outcome(fn: Any) -> dict[str, Any]:
    """Run ``fn``; the error it raised (class, message, attributes), or its result."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - the test checks which error
        return {"error": type(exc).__name__, "named": isinstance(exc, (DistributedError, permgraph.PermGraphError)),
                "message": str(exc), "item": getattr(exc, "item", None), "ranks": getattr(exc, "ranks", None),
                "seconds": time.perf_counter() - t0}
    return {"value": value, "seconds": time.perf_counter() - t0}


def agree(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    widths = case["widths"]
    a, b = build(case["a"], widths), build(case["b"], widths)
    batches = shard(case["batches"], rank, world)
    spec = permgraph.infer(a, case["batches"][0][:2].to(DEVICE))
    out: dict[str, Any] = {}
    out["perm"] = activation_matching(spec, a, b, batches, timeout=TIMEOUT)
    # (x, y) pairs with inputs= picking x: the same statistics
    pairs = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
    out["perm_pairs"] = activation_matching(spec, a, b, pairs, inputs=lambda p: p[0], timeout=TIMEOUT)
    sims, _ = activation_similarity(spec, a, b, batches, method="covariance", timeout=TIMEOUT)
    out["covariance"] = sims
    cos, _ = activation_similarity(spec, a, b, batches, method="cosine", timeout=TIMEOUT)
    out["cosine"] = cos
    # this rank's statistics alone
    out["perm_local"] = activation_matching(spec, a, b, batches, process_group=False)
    # REPAIR of the midpoint of A and B aligned
    b_aligned = build(spec.apply(out["perm"], b.state_dict()), widths)
    merged = build(interpolate(a.state_dict(), b_aligned.state_dict(), 0.5), widths)
    report = repair(a, b_aligned, merged, batches, spec, 0.5, timeout=TIMEOUT)
    out["repair"] = {k: v.clone() for k, v in merged.state_dict().items()}
    out["repair_device"] = str(next(merged.parameters()).device)
    out["repair_batches"] = report.batches
    # BatchNorm reset of the BN MLP
    bn = build(case["bn"], widths, bn=True)
    out["bn_layers"] = reset_batchnorm(bn, batches, timeout=TIMEOUT)
    out["bn"] = {k: v.clone() for k, v in bn.state_dict().items()}
    out["bn_device"] = str(bn[1].running_mean.device)
    # SyncBatchNorm layers (which would all-reduce every batch, and only on GPUs) as well
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(build(case["bn"], widths, bn=True))
    reset_batchnorm(sync, batches, timeout=TIMEOUT)
    out["sync_bn"] = {k: v.clone() for k, v in sync.state_dict().items()}
    out["sync_bn_forward_restored"] = all("forward" not in vars(m) for m in sync.modules())
    # one rank with no batch at all still takes part
    out["perm_uneven"] = activation_matching(spec, a, b, case["batches"] if rank == 0 else [], timeout=TIMEOUT)
    # rank 0 without a batch: each rank centres on its own first batch, the sums are re-centred
    out["perm_rank0_empty"] = activation_matching(spec, a, b, case["batches"] if rank == world - 1 else [],
                                                  timeout=TIMEOUT)
    sims, _ = activation_similarity(spec, a, b, [] if rank == 0 else batches, method="covariance", timeout=TIMEOUT)
    out["covariance_rank0_empty"] = sims
    return out


def disagree(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    widths = case["widths"]
    batches = shard(case["batches"], rank, world)
    out: dict[str, Any] = {}
    # another width on the last rank: another spec, other statistics shapes
    mine = widths if rank < world - 1 else tuple(w if i in (0, len(widths) - 1) else w // 2 for i, w in enumerate(widths))
    torch.manual_seed(0)
    a, b = mlp(mine).eval(), mlp(mine).eval()
    spec = permgraph.infer(a, batches[0][:2])
    out["shapes"] = outcome(lambda: activation_matching(spec, a, b, batches, timeout=TIMEOUT))
    # same architecture, another B on the last rank
    a, b = build(case["a"], widths), build(case["b"], widths)
    spec = permgraph.infer(a, batches[0][:2])
    if rank == world - 1:
        torch.manual_seed(5)
        b = mlp(widths).eval()
    out["weights"] = outcome(lambda: activation_matching(spec, a, b, batches, timeout=TIMEOUT))
    # the same B up to float rounding (one weight one ulp off): a warning, and the reduction
    b = build(case["b"], widths)
    if rank == world - 1:
        with torch.no_grad():
            b[0].weight[0, 0] = torch.nextafter(b[0].weight[0, 0], torch.tensor(1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["drift"] = outcome(lambda: activation_matching(spec, a, b, batches, timeout=TIMEOUT))
    out["drift_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    b = build(case["b"], widths)
    merged = build(interpolate(a.state_dict(), b.state_dict(), 0.5), widths)
    alpha = 0.5 if rank < world - 1 else 0.25
    out["repair_alpha"] = outcome(lambda: repair(a, b, merged, batches, spec, alpha, timeout=TIMEOUT))
    bn = build(case["bn"], widths, bn=True)
    if rank == world - 1:
        bn = mlp(mine, bn=True)
    out["bn_shapes"] = outcome(lambda: reset_batchnorm(bn, batches, timeout=TIMEOUT))
    # the last rank's data cannot run (wrong feature count): it fails, the others are told
    bad = batches if rank < world - 1 else [torch.randn(4, widths[0] + 1)]
    out["failed"] = outcome(lambda: activation_matching(spec, a, b, bad, timeout=TIMEOUT))
    # the last rank fails its own checks, before any data: the others are told as well
    method = "correlation" if rank < world - 1 else "bogus"
    out["failed_early"] = outcome(lambda: activation_matching(spec, a, b, batches, method=method, timeout=TIMEOUT))
    # the last rank never calls: the others give up after the timeout (this leaves an
    # unfinished collective behind, so it comes last)
    if rank < world - 1:
        out["absent"] = outcome(lambda: activation_matching(spec, a, b, batches, timeout=3.0))
    else:
        time.sleep(6.0)
    return out


def main() -> None:
    scenario, case_file, out_dir = sys.argv[1:4]
    global DEVICE
    torch.set_num_threads(1)
    dist.init_process_group(os.environ.get("PERMGRAPH_WORKER_BACKEND", "gloo"))
    rank, world = dist.get_rank(), dist.get_world_size()
    if os.environ.get("PERMGRAPH_WORKER_DEVICE", "cpu") == "cuda":
        DEVICE = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(DEVICE)
    case = torch.load(case_file, weights_only=False)
    out = {"agree": agree, "disagree": disagree}[scenario](case, rank, world)
    out["rank"], out["world"] = rank, world
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: a collective the "absent" step left open would block it


if __name__ == "__main__":
    main()
