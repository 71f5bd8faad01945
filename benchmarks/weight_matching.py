"""Time weight matching of two independently initialised models, including ``infer``.

    python benchmarks/weight_matching.py [MODEL ...] [--repeat N] [--threads T] [--tol X]

MODEL is any of ``mlp``, ``resnet18``, ``resnet50``, ``vit_b_16`` (torchvision) and ``gpt2``
(a GPT-2 small-shaped ``transformers`` model, 12 layers of width 768, random init); default:
all. For each: the seconds of ``infer``, of ``weight_matching`` and their total, the sweeps it
needed, the objective ``Σ <A, P(B)>`` it reached (with the defaults, row ``ours``; with
``order="graph", tol=1e-3``, row ``graph``; and the same after ``first_pass="forward"``, row
``fwd``), and the *floor*: one sweep's similarity
GEMMs plus the LAPs of every group, computed once at the identity (no algorithm that looks at
every group once can beat it); each total is also given as a multiple of that floor.

When snimu's ``rebasin`` 0.0.47 is installed in the folder named by the environment variable
``REBASIN_DIR`` (``pip install --no-deps --target DIR rebasin==0.0.47 torchview graphviz``;
it is kept off the import path otherwise, since its package name clashes with
``sinkhorn-rebasin``), it runs on the same models in the same process, alternating with ours
(``--repeat`` rounds, best of each shown): its set-up (tracing) and its coordinate descent,
and the objective each reaches. Where it fails, the table says why (``n/a: <reason>``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import signal
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


def _gpt2() -> nn.Module:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12))


def _ids() -> torch.Tensor:
    return torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))


#: name -> (builder, example input for infer, example input for snimu)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], object], Callable[[], object]]] = {
    "mlp": (_mlp, lambda: torch.randn(1, 64), lambda: torch.randn(1, 64)),
    "resnet18": (_tv("resnet18"), lambda: torch.randn(1, 3, 32, 32), lambda: torch.randn(1, 3, 32, 32)),
    "resnet50": (_tv("resnet50"), lambda: torch.randn(1, 3, 32, 32), lambda: torch.randn(1, 3, 32, 32)),
    "vit_b_16": (_tv("vit_b_16"), lambda: torch.randn(1, 3, 224, 224), lambda: torch.randn(1, 3, 224, 224)),
    "gpt2": (_gpt2, lambda: {"input_ids": _ids(), "use_cache": False}, _ids),
}


def pair(name: str, theirs: bool = False) -> tuple[nn.Module, nn.Module, object]:
    """Two independently initialised models (seeds 0 and 1) and an example input (snimu's
    form of it with ``theirs``)."""
    build, inputs, their_inputs = MODELS[name]
    torch.manual_seed(0)
    a = build().eval()
    torch.manual_seed(1)
    b = build().eval()
    return a, b, (their_inputs if theirs else inputs)()


def objective(spec: permgraph.PermSpec, a: dict, b: dict) -> float:
    """``Σ <A_T, B_T>`` over the tensors the groups permute."""
    keys = {m.key for g in spec.groups for m in g.members}
    return sum(float((a[k].double() * b[k].double()).sum()) for k in keys)


def floor_seconds(spec: permgraph.PermSpec, a: dict, b: dict) -> tuple[float, float]:
    """One sweep's GEMMs (every group's ``S_g`` at the identity) and the LAPs of all groups."""
    best = (math.inf, math.inf)
    for _ in range(2):  # the best of two (the first pays one-off set-up costs)
        prob = _Problem(spec, a, b)
        perm = [torch.arange(g.size) for g in spec.groups]
        hist = WeightMatchingHistory()
        t0 = time.perf_counter()
        costs = [prob.cost(gi, perm, hist).to(device="cpu", dtype=torch.float64) for gi in range(len(spec.groups))]
        t1 = time.perf_counter()
        for c in costs:
            lap.solve_cost(c.numpy())
        best = min(best, (t1 - t0, time.perf_counter() - t1), key=sum)
    return best


def ours(name: str, kw: dict) -> dict[str, float]:
    model_a, model_b, x = pair(name)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = permgraph.infer(model_a, x)
    t1 = time.perf_counter()
    a, b = model_a.state_dict(), model_b.state_dict()
    perm, hist = weight_matching(spec, a, b, return_history=True, **kw)
    t2 = time.perf_counter()
    aligned = spec.apply(perm, b)
    return {
        "infer": t1 - t0, "match": t2 - t1, "total": t2 - t0, "sweeps": hist.sweeps, "objective": hist.objective[-1],
        "objective0": hist.objective[0], "check": objective(spec, a, aligned), "gflop": hist.gemm_flops / 1e9,
        "hist": hist, "spec": spec, "a": a, "b": b,
    }


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001, ANN202, ARG001 - a signal handler
    raise _Timeout


def snimu(name: str) -> dict[str, float] | str | None:
    """snimu's rebasin 0.0.47 on the same pair; None when it is not installed, the reason
    when it fails."""
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
    model_a, model_b, x = pair(name, theirs=True)
    b_before = copy.deepcopy(model_b.state_dict())
    sweeps = 0
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SNIMU_TIMEOUT)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pcd = PermutationCoordinateDescent(model_a, model_b, x)
        t1 = time.perf_counter()
        step = pcd._calculate_permutations_step

        def counted(loop):  # noqa: ANN001, ANN202 - their signature
            nonlocal sweeps
            sweeps += 1
            return step(loop)

        pcd._calculate_permutations_step = counted
        pcd.calculate_permutations(max_iterations=100)
        pcd.apply_permutations()
        t2 = time.perf_counter()
    except _Timeout:
        return f"n/a: over {SNIMU_TIMEOUT} s"
    except Exception as exc:  # noqa: BLE001 - the table says why it failed
        return f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return {
        "infer": t1 - t0, "match": t2 - t1, "total": t2 - t0, "sweeps": sweeps,
        "sd_a": model_a.state_dict(), "sd_b": model_b.state_dict(), "sd_b0": b_before,
    }


#: the other configurations of ours in the table: graph order, stop on a sweep gaining <= 0.1%,
#: and the same after a forward first pass
CONFIGS = {"graph": {"order": "graph", "tol": 1e-3}, "fwd": {"first_pass": "forward", "order": "graph", "tol": 1e-3}}

#: snimu gets this many seconds per run before it counts as failed
SNIMU_TIMEOUT = 600


def _row(name: str, who: str, r: dict, floor: float) -> str:
    return (f"{name:9s} {who:6s} {r['infer']:8.2f} {r['match']:8.2f} {r['total']:8.2f} {r['sweeps']:6d} "
            f"{r['total'] / floor:7.1f} {r['objective']:12.2f} {r['objective0']:12.2f}")


def main() -> None:
    global SNIMU_TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"any of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=2, help="alternating rounds of ours and snimu; the best is shown")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tol", type=float, default=None, help="weight_matching's tol (default: its default)")
    parser.add_argument("--snimu-timeout", type=int, default=SNIMU_TIMEOUT, help="seconds before snimu counts as failed")
    args = parser.parse_args()
    SNIMU_TIMEOUT = args.snimu_timeout
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():  # the first export of a process pays ~1.5 s of set-up: not timed
        warnings.simplefilter("ignore")
        permgraph.infer(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(1, 2))
    print(f"torch {torch.__version__}, {args.threads} thread(s), LAP auto = {lap.available_backends()}")
    head = (f"{'model':9s} {'who':6s} {'infer s':>8s} {'match s':>8s} {'total s':>8s} {'sweeps':>6s} "
            f"{'x floor':>7s} {'objective':>12s} {'(start)':>12s}")
    lines = [head, "-" * len(head)]
    print(head, flush=True)
    for name in args.models or list(MODELS):
        runs: dict[str, dict] = {}  # the best run of each configuration of ours
        theirs: dict | str | None = None
        configs = {"ours": {} if args.tol is None else {"tol": args.tol}, **CONFIGS}
        for _ in range(args.repeat):
            for who, kw in configs.items():
                r = ours(name, kw)
                assert abs(r["objective"] - r["check"]) <= 1e-4 * abs(r["check"]), "history objective is off"
                if who not in runs or r["total"] < runs[who]["total"]:
                    runs[who] = r
            if isinstance(theirs, str):
                continue  # it failed once: it fails again
            s = snimu(name)
            if s is None or isinstance(s, str):
                theirs = s
            elif theirs is None or s["total"] < theirs["total"]:
                theirs = s
        best = runs["ours"]
        gemm, laps = floor_seconds(best["spec"], best["a"], best["b"])
        floor = gemm + laps
        hist = best["hist"]
        out = [_row(name, "ours", best, floor)]
        per_sweep = " ".join(str(len(c)) for c in hist.changed)
        out.append(f"{'':16s} floor {floor:.3f} s = {gemm:.3f} s GEMMs + {laps:.3f} s LAPs; {len(best['spec'].groups)} "
                   f"groups; {best['gflop']:.0f} GFLOP; products {hist.product_seconds:.2f} s, LAPs {hist.lap_seconds:.2f} s "
                   f"({hist.laps}); changed per sweep: {per_sweep}")
        for who, kw in CONFIGS.items():
            out.append(_row(name, who, runs[who], floor))
            out.append(f"{'':16s} ({', '.join(f'{k}={v!r}' for k, v in kw.items())}): {runs[who]['gflop']:.0f} GFLOP; "
                       "changed per sweep: " + " ".join(str(len(c)) for c in runs[who]["hist"].changed))
        if isinstance(theirs, dict):
            spec = best["spec"]
            theirs["objective"] = objective(spec, theirs["sd_a"], theirs["sd_b"])
            theirs["objective0"] = objective(spec, theirs["sd_a"], theirs["sd_b0"])
            out.append(_row(name, "snimu", theirs, floor))
            out.append(f"{'':16s} in total, ours (defaults) is {theirs['total'] / best['total']:.1f}x faster, "
                       + ", ".join(f"{who} {theirs['total'] / runs[who]['total']:.1f}x" for who in CONFIGS))
        elif isinstance(theirs, str):
            out.append(f"{name:9s} {'snimu':6s} {theirs}")
        print("\n".join(out), flush=True)
        lines += out
        del best, runs, theirs
    print("\nsummary\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
