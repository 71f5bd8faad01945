"""Learned alignment: Sinkhorn re-basin's seconds per step on ResNet-50, and the four
matchers side by side on scikit-learn's digits.

    python benchmarks/sinkhorn.py [--threads T] [--steps N] [--rebasin-steps M]
                                  [--skip-resnet50] [--skip-digits]

**ResNet-50.** Two independently initialised torchvision ResNet-50s, the L2 objective
``Σ_T ||A_T - P(B)_T||²``: the seconds of each optimisation step of `sinkhorn_matching`
(Sinkhorn forward of every group, the objective with its backward, the implicit backward of
every group, Adam), split into those parts. The objective applies a dense ``n x n`` matrix
to both permuted axes of every weight, so it costs ``F = Σ_T Σ_axes 2·numel(T)·n`` flops
forward and about ``2.5 F`` with its backward: the *floor* of a step, given beside the
GEMM throughput of this machine.

When sinkhorn-rebasin 0.0.2 (Peña et al.'s package; it is named ``rebasin``) is installed
in the folder named by the environment variable ``SINKHORN_REBASIN_DIR``::

    pip install --no-deps --target DIR sinkhorn-rebasin==0.0.2 torchviz graphviz

its ``RebasinNet`` with ``DistL2Loss`` runs on the same pair in the same process (the
folder is put on the import path only here; its package name clashes with snimu's
``rebasin``).

**Digits.** Two 64-512-512-10 MLPs trained from different seeds (`permgraph.examples.digits`): the
loss and accuracy on the held-out digits of the midpoint ``0.5 * (A + P(B))`` for the
identity (naive), weight matching, activation matching, the straight-through estimator and
Sinkhorn with the midpoint objective, and each matcher's seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

# benchmarks/lap.py would shadow the lapx package's module ``lap``: keep this folder off the
# import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import permgraph  # noqa: E402
from permgraph.match._soft import SoftPermuter  # noqa: E402
from permgraph.match.sinkhorn import sinkhorn_matching  # noqa: E402


def _gemm_gflops() -> float:
    """This machine's float32 GEMM throughput at the current thread count (best of 8: the
    machine is shared)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 4608)
    a @ b
    best = float("inf")
    for _ in range(8):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 * 1024 * 4608 / best / 1e9


def _objective_flops(spec: permgraph.PermSpec) -> int:
    flops = 0
    for key, steps in SoftPermuter(spec).plan.items():
        numel = 1
        for s in spec.shapes[key]:
            numel *= s
        flops += sum(2 * numel * spec.groups[gi].size for _, gi, _ in steps)
    return flops


def resnet50(steps: int, rebasin_steps: int) -> None:
    import torchvision

    torch.manual_seed(0)
    model_a = torchvision.models.resnet50(weights=None)
    torch.manual_seed(1)
    model_b = torchvision.models.resnet50(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = permgraph.infer(model_a, torch.randn(1, 3, 64, 64))
    sizes = sorted(g.size for g in spec.groups)
    flops = _objective_flops(spec)
    gflops = _gemm_gflops()
    print(f"ResNet-50: {len(spec.groups)} groups, {spec.num_units} units (largest {sizes[-3:]}); "
          f"objective {flops / 1e9:.1f} GFLOP forward, ~{2.5 * flops / 1e9:.0f} GFLOP with its backward; "
          f"GEMM throughput {gflops:.0f} GFLOP/s -> floor {2.5 * flops / 1e9 / gflops:.2f} s per step")
    _, hist = sinkhorn_matching(spec, model_a.state_dict(), model_b.state_dict(), steps=steps,
                                return_history=True)
    per = hist.step_seconds[1:] or hist.step_seconds  # the first step pays one-off allocations
    best, med = min(per), statistics.median(per)
    fwd = hist.sinkhorn_seconds / steps
    bwd = hist.backward_seconds / steps
    rest = sum(hist.step_seconds) / steps - fwd - bwd
    print(f"permgraph sinkhorn_matching (L2, tau 1, 20 Sinkhorn iterations): best {best:.2f} s, median {med:.2f} s "
          f"per step (steps 2..{steps}; all: {', '.join(f'{s:.2f}' for s in hist.step_seconds)})")
    print(f"  mean per step: Sinkhorn forward {fwd:.2f} s, implicit backward {bwd:.2f} s, objective + backward + "
          f"Adam {rest:.2f} s ({2.5 * flops / 1e9 / max(rest, 1e-9):.0f} GFLOP/s)")
    print(f"  Sinkhorn iterations per step, all groups: {hist.iterations}")

    folder = os.environ.get("SINKHORN_REBASIN_DIR")
    if not folder:
        print("sinkhorn-rebasin 0.0.2: not run (set SINKHORN_REBASIN_DIR, see the module docstring)")
        return
    sys.path.insert(0, folder)
    try:
        from rebasin import RebasinNet  # type: ignore[import-not-found]
        from rebasin.loss import DistL2Loss  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"sinkhorn-rebasin 0.0.2: not importable from SINKHORN_REBASIN_DIR={folder}: {exc}")
        return
    finally:
        sys.path.remove(folder)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = RebasinNet(model_b, input_shape=(1, 3, 64, 64))
    setup = time.perf_counter() - t0
    criterion = DistL2Loss(model_a)
    opt = torch.optim.Adam(net.p.parameters(), lr=0.1)
    net.train()
    times = []
    for _ in range(rebasin_steps):
        t0 = time.perf_counter()
        loss = criterion(net())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(f"sinkhorn-rebasin 0.0.2 (RebasinNet + DistL2Loss, tau 1, 20 iterations): best {min(times):.2f} s, "
          f"median {statistics.median(times):.2f} s per step (all: {', '.join(f'{s:.2f}' for s in times)}); "
          f"set-up {setup:.1f} s; best {min(times) / best:.1f}x permgraph's")


def digits(seed_a: int = 0, seed_b: int = 1) -> None:
    from permgraph.examples.digits import batches, load_digits, make_mlp, train
    from permgraph.match.activation import activation_matching
    from permgraph.match.ste import ste_matching
    from permgraph.match.weight import weight_matching

    data = load_digits()
    t0 = time.perf_counter()
    torch.manual_seed(seed_a)
    model_a = train(make_mlp(), data.x_train, data.y_train, epochs=10, seed=seed_a)
    torch.manual_seed(seed_b)
    model_b = train(make_mlp(), data.x_train, data.y_train, epochs=10, seed=seed_b)
    print(f"\ndigits: two 64-512-512-10 MLPs trained in {time.perf_counter() - t0:.1f} s")
    spec = permgraph.infer(model_a, data.x_train[:2])
    a, b = model_a.state_dict(), model_b.state_dict()
    pairs = batches(data.x_train, data.y_train, batch_size=256)

    def midpoint(perm: dict[str, torch.Tensor]) -> tuple[float, float]:
        aligned = spec.apply(perm, b)
        mid = {k: 0.5 * (a[k] + aligned[k]) for k in a}
        with torch.no_grad():
            out = torch.func.functional_call(model_a, mid, (data.x_test,))
        return float(nn.functional.cross_entropy(out, data.y_test)), float((out.argmax(1) == data.y_test).float().mean())

    def ends(model: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            out = model(data.x_test)
        return float(nn.functional.cross_entropy(out, data.y_test)), float((out.argmax(1) == data.y_test).float().mean())

    methods = {
        "naive (identity)": lambda: spec.identity(),
        "weight matching": lambda: weight_matching(spec, a, b),
        "activation matching": lambda: activation_matching(spec, model_a, model_b, batches(data.x_train)),
        "STE (200 steps, lr 1e-2)": lambda: ste_matching(spec, model_a, model_b, pairs, steps=200, lr=1e-2),
        "Sinkhorn, midpoint (200 steps, lr 0.1)": lambda: sinkhorn_matching(
            spec, a, b, objective="midpoint", model=model_a, batches=pairs, steps=200, lr=0.1),
        "Sinkhorn, L2 (200 steps, lr 0.1)": lambda: sinkhorn_matching(spec, a, b, steps=200, lr=0.1),
    }
    la, aa = ends(model_a)
    lb, ab = ends(model_b)
    print(f"endpoints on the held-out digits: A loss {la:.3f} acc {aa:.3f}; B loss {lb:.3f} acc {ab:.3f}")
    print("| method | midpoint loss | midpoint accuracy | seconds |")
    print("|---|---|---|---|")
    for name, run in methods.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            perm = run()
        seconds = time.perf_counter() - t0
        loss, acc = midpoint(perm)
        print(f"| {name} | {loss:.3f} | {acc:.3f} | {seconds:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="sinkhorn_matching steps on ResNet-50")
    parser.add_argument("--rebasin-steps", type=int, default=3, help="sinkhorn-rebasin steps on ResNet-50")
    parser.add_argument("--skip-resnet50", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_resnet50:
        resnet50(args.steps, args.rebasin_steps)
    if not args.skip_digits:
        digits()


if __name__ == "__main__":
    main()
