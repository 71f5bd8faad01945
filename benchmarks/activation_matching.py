"""Activation matching: throughput and peak memory against the number of samples.

    python benchmarks/activation_matching.py [--threads T]

For each model (the MLP 64-128-128-128-10 and torchvision resnet18 on 32x32 images, two
independently initialised copies) and each number of samples, a fresh child process infers
the spec, then matches on that many random samples in batches of a fixed size. It reports
the samples per second of ``activation_matching`` (both models' forward passes, the
statistics and the LAPs), beside the samples per second of the two models' plain forward
passes (the bound), and the process's peak resident memory, before matching (models and
spec) and at the end: the statistics are ``O(n²)`` per group, so the peak must stay flat as
the samples grow.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import warnings

# benchmarks/lap.py would shadow the lapx package's module ``lap``: keep this folder off the
# import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402

CONFIGS = {
    "mlp": ((1024,), [4096, 32768, 262144]),
    "resnet18": ((64,), [256, 1024, 4096]),
}


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
            nn.Linear(128, 10),
        ).eval()
    import torchvision

    return torchvision.models.resnet18(weights=None).eval()


def _shape(name: str, batch: int) -> tuple[int, ...]:
    return (batch, 64) if name == "mlp" else (batch, 3, 32, 32)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(name: str, samples: int, batch: int, threads: int) -> None:
    """One measurement, printed as ``seconds peak_before_MiB peak_after_MiB forward_samples_per_s``."""
    import permgraph
    from permgraph.match import activation_matching

    torch.set_num_threads(threads)
    model_a, model_b = _build(name, 0), _build(name, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = permgraph.infer(model_a, torch.randn(*_shape(name, batch)))
    # one warm-up batch, so the first call's one-off costs are not counted
    activation_matching(spec, model_a, model_b, [torch.randn(*_shape(name, batch))])
    before = _peak_mib()
    gen = torch.Generator().manual_seed(0)
    batches = (torch.randn(*_shape(name, batch), generator=gen) for _ in range(samples // batch))
    t0 = time.perf_counter()
    activation_matching(spec, model_a, model_b, batches)
    seconds = time.perf_counter() - t0
    after = _peak_mib()
    # reference: the two models' plain forward passes on (up to 1024 of) the same samples
    ref = min(samples, 1024) // batch
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(ref):
            x = torch.randn(*_shape(name, batch), generator=gen)
            model_a(x)
            model_b(x)
    forward = ref * batch / (time.perf_counter() - t0)
    print(f"{seconds} {before} {after} {forward}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SAMPLES", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.threads)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s); peak RSS of a fresh process per row")
    head = (f"{'model':9s} {'samples':>8s} {'batch':>6s} {'seconds':>8s} {'samples/s':>10s} {'fwd A+B /s':>10s} "
            f"{'peak MiB before':>16s} {'peak MiB after':>15s}")
    print(head)
    print("-" * len(head))
    for name, ((batch,), counts) in CONFIGS.items():
        for samples in counts:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--child", name,
                 str(samples), str(batch)],
                capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                print(f"{name:9s} {samples:8d} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            seconds, before, after, forward = map(float, out.stdout.split()[-4:])
            print(f"{name:9s} {samples:8d} {batch:6d} {seconds:8.2f} {samples / seconds:10.0f} {forward:10.0f} "
                  f"{before:16.0f} {after:15.0f}")


if __name__ == "__main__":
    main()
