"""Time weight matching of two independently initialised models, including ``infer``.

    python benchmarks/weight_matching.py [MODEL ...] [--repeat N] [--threads T]

MODEL is any of ``mlp``, ``resnet18``, ``resnet50`` (default: all three). For each: the
seconds of ``infer``, of ``weight_matching`` and their total, the sweeps it needed, and the
*floor*: one sweep's similarity GEMMs plus the LAPs of every group, computed once at the
identity (no algorithm that looks at every group once can beat it); our total is also given
as a multiple of that floor. Times are the best of ``--repeat`` runs (the machine is shared).

When snimu's ``rebasin`` 0.0.47 is installed in the folder named by the environment variable
``REBASIN_DIR`` (``pip install --no-deps --target DIR rebasin==0.0.47 torchview graphviz``;
it is kept off the import path otherwise, since its package name clashes with
``sinkhorn-rebasin``), it runs on the same models in the same process: its set-up (tracing)
and its coordinate descent, and the objective ``Σ <A, P(B)>`` each reaches.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from collections.abc import Callable

# benchmarks/lap.py would shadow the lapx package's module ``lap``: keep this folder off the
# import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import permgraph  # noqa: E402
from permgraph import lap  # noqa: E402
from permgraph.match import weight_matching  # noqa: E402
from permgraph.match.weight import WeightMatchingHistory, _Problem  # noqa: E402


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "mlp": (_mlp, lambda: torch.randn(1, 64)),
    "resnet18": (_tv("resnet18"), lambda: torch.randn(1, 3, 32, 32)),
    "resnet50": (_tv("resnet50"), lambda: torch.randn(1, 3, 32, 32)),
}


def pair(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Two independently initialised models (seeds 0 and 1) and an example input."""
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    a = build().eval()
    torch.manual_seed(1)
    b = build().eval()
    return a, b, inputs()


def objective(spec: permgraph.PermSpec, a: dict, b: dict) -> float:
    """``Σ <A_T, B_T>`` over the tensors the groups permute."""
    keys = {m.key for g in spec.groups for m in g.members}
    return sum(float((a[k].double() * b[k].double()).sum()) for k in keys)


def floor_seconds(spec: permgraph.PermSpec, a: dict, b: dict) -> tuple[float, float]:
    """One sweep's GEMMs (every group's ``S_g`` at the identity) and the LAPs of all groups."""
    prob = _Problem(spec, a, b)
    perm = [torch.arange(g.size) for g in spec.groups]
    hist = WeightMatchingHistory()
    t0 = time.perf_counter()
    costs = [prob.cost(gi, perm, hist).to(device="cpu", dtype=torch.float64) for gi in range(len(spec.groups))]
    t1 = time.perf_counter()
    for c in costs:
        lap.solve_cost(c.numpy())
    return t1 - t0, time.perf_counter() - t1


def ours(name: str, repeat: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(repeat):
        model_a, model_b, x = pair(name)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = permgraph.infer(model_a, x)
        t1 = time.perf_counter()
        a, b = model_a.state_dict(), model_b.state_dict()
        perm, hist = weight_matching(spec, a, b, return_history=True)
        t2 = time.perf_counter()
        aligned = spec.apply(perm, b)
        t3 = time.perf_counter()
        gemm, laps = floor_seconds(spec, a, b)
        row = {
            "infer": t1 - t0, "match": t2 - t1, "apply": t3 - t2, "total": t3 - t0, "sweeps": hist.sweeps,
            "floor": gemm + laps, "gemm": gemm, "lap": laps, "objective": hist.objective[-1],
            "objective0": hist.objective[0], "check": objective(spec, a, aligned), "gflop": hist.gemm_flops / 1e9,
        }
        if not best or row["total"] < best["total"]:
            best = row
    return best


def snimu(name: str) -> dict[str, float] | None:
    """snimu's rebasin 0.0.47 on the same pair, or None when it is not installed."""
    folder = os.environ.get("REBASIN_DIR")
    if not folder:
        return None
    sys.path.insert(0, folder)
    try:
        from rebasin import PermutationCoordinateDescent  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"(snimu rebasin not importable from REBASIN_DIR={folder}: {exc})")
        return None
    finally:
        sys.path.remove(folder)
    model_a, model_b, x = pair(name)
    b_before = copy.deepcopy(model_b.state_dict())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcd = PermutationCoordinateDescent(model_a, model_b, x)
    t1 = time.perf_counter()
    sweeps = 0
    step = pcd._calculate_permutations_step

    def counted(loop):  # noqa: ANN001, ANN202 - their signature
        nonlocal sweeps
        sweeps += 1
        return step(loop)

    pcd._calculate_permutations_step = counted
    pcd.calculate_permutations(max_iterations=100)
    pcd.apply_permutations()
    t2 = time.perf_counter()
    spec = permgraph.infer(model_a, x)
    return {
        "infer": t1 - t0, "match": t2 - t1, "total": t2 - t0, "sweeps": sweeps,
        "objective": objective(spec, model_a.state_dict(), model_b.state_dict()),
        "objective0": objective(spec, model_a.state_dict(), b_before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of ours; the best is shown")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():  # the first export of a process pays ~1.5 s of set-up: not timed
        warnings.simplefilter("ignore")
        permgraph.infer(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(1, 2))
    print(f"torch {torch.__version__}, {args.threads} thread(s), LAP auto = {lap.available_backends()}")
    head = (f"{'model':9s} {'who':7s} {'infer s':>8s} {'match s':>8s} {'total s':>8s} {'sweeps':>6s} "
            f"{'floor s':>8s} {'x floor':>7s} {'GFLOP':>6s} {'objective':>12s} {'(start)':>12s}")
    print(head)
    print("-" * len(head))
    for name in args.models or list(MODELS):
        r = ours(name, args.repeat)
        assert abs(r["objective"] - r["check"]) <= 1e-4 * abs(r["check"]), "history objective is off"
        print(f"{name:9s} {'ours':7s} {r['infer']:8.2f} {r['match']:8.2f} {r['infer'] + r['match']:8.2f} "
              f"{r['sweeps']:6d} {r['floor']:8.3f} {(r['infer'] + r['match']) / r['floor']:7.1f} {r['gflop']:6.0f} "
              f"{r['objective']:12.2f} {r['objective0']:12.2f}")
        print(f"{'':9s} {'':7s} floor = {r['gemm']:.3f} s GEMMs + {r['lap']:.3f} s LAPs; apply {r['apply']:.3f} s")
        s = snimu(name)
        if s is not None:
            print(f"{name:9s} {'snimu':7s} {s['infer']:8.2f} {s['match']:8.2f} {s['total']:8.2f} {s['sweeps']:6d} "
                  f"{'':8s} {s['total'] / r['floor']:7.1f} {'':6s} {s['objective']:12.2f} {s['objective0']:12.2f}")
            print(f"{'':9s} {'':7s} ours is {s['total'] / (r['infer'] + r['match']):.1f}x faster in total")


if __name__ == "__main__":
    main()
