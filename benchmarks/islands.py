"""Islands: groups found on models torch.export cannot trace whole, and the oracle on them.

    python benchmarks/islands.py [NAME ...] [--threads T]

For each model of ``permgraph.testing.ISLAND_ZOO`` (or the ones named): norm statistics
randomised (left at their defaults where random ones make a detector keep no box, so that the
oracle compares real outputs: column ``norms``), ``infer`` (which falls back to islands), ``lint``, then the oracle on a float64
copy of the whole model with three random permutations (a derangement first), and a negative
control (the largest group with several members permuted in its first member only must change
the outputs). Before islands, ``infer`` raised ``TraceError`` on all of them: 0 groups.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

import permgraph  # noqa: E402
from permgraph.testing import ISLAND_ZOO, randomize_norm_stats  # noqa: E402
from permgraph.tracing import tensors_in  # noqa: E402


def _double(x):
    return tree_map(lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v, x)


def _detections(model, x) -> int:
    """How many output elements the model returns (0 for a detector that kept no box)."""
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(**x)
    return sum(t.numel() for t in tensors_in(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(ISLAND_ZOO))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"{'model':40} {'groups':>6} {'units':>6} {'left out':>8} {'infer s':>7} {'outputs':>7} {'norms':>7} "
          f"{'oracle f64':>10} {'control':>8}")
    for name in args.names:
        entry = ISLAND_ZOO[name]
        model = randomize_norm_stats(entry.build(), torch.Generator().manual_seed(0)).eval()
        x = entry.inputs()
        norms = "random"
        if not _detections(model, x):  # random norms can blow activations up until no box is kept
            model, norms = entry.build().eval(), "default"
        t0 = time.perf_counter()
        spec = permgraph.infer(model, x)
        seconds = time.perf_counter() - t0
        spec.lint()
        m64, x64 = copy.deepcopy(model).double(), _double(x)
        err = spec.verify(m64, x64, draws=3, rtol=1e-9, generator=torch.Generator().manual_seed(1))
        group = max((g for g in spec.groups if len(g.members) > 1), key=lambda g: g.size)
        broken = dataclasses.replace(spec, groups=(dataclasses.replace(group, members=group.members[:1]),))
        try:
            broken.verify(m64, x64, generator=torch.Generator().manual_seed(1))
            control = "PASSED?!"
        except permgraph.VerificationError:
            control = "fails"
        print(f"{name:40} {len(spec.groups):>6} {spec.num_units:>6} {len(spec.unsupported):>8} {seconds:>7.1f} "
              f"{_detections(model, x):>7} {norms:>7} {err:>10.2g} {control:>8}", flush=True)


if __name__ == "__main__":
    main()
