"""Time ``permgraph.infer`` over the zoo: trace, rules + solve, groups, units, blocked ops.

    python benchmarks/infer.py [MODEL ...]

When torch-pruning is installed, its group counts (DepGraph, conv/linear roots, output
layer ignored) are printed beside ours from the same run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import warnings

import torch

from permgraph import infer
from permgraph.testing import ZOO

_TP_SCRIPT = """
import resource, sys, torch, torch_pruning as tp
from permgraph.testing import ZOO
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
e = ZOO[sys.argv[1]]
model, inputs = e.build().eval(), e.inputs()
dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
last = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1:]
print(len(list(dg.get_all_groups(ignored_layers=last, root_module_types=[torch.nn.Conv2d, torch.nn.Linear]))))
"""


def torch_pruning_groups(name: str) -> str:
    """Torch-Pruning's group count, run in a child process (6 GiB, 120 s) so its failures
    (it runs out of memory on some models) are printed, not fatal."""
    if importlib.util.find_spec("torch_pruning") is None:
        return "n/a"
    try:
        out = subprocess.run([sys.executable, "-c", _TP_SCRIPT, name], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "timeout"
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        return lines[-1]
    err = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
    return "fails: " + err.split(":")[0][:20]


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    header = f"{'model':16s} {'trace s':>8s} {'rules s':>8s} {'total s':>8s} {'groups':>7s} {'units':>7s} {'blocked':>8s} {'torch-pruning':>14s}"
    print(header)
    print("-" * len(header))
    for name in names or list(ZOO):
        entry = ZOO[name]
        model, inputs = entry.build().eval(), entry.inputs()
        t0 = time.perf_counter()
        spec = infer(model, inputs)
        total = time.perf_counter() - t0
        tp_groups = torch_pruning_groups(name)
        print(f"{name:16s} {spec.analysis.traced.seconds:8.2f} {spec.analysis.traced.extra['rules_seconds']:8.2f} {total:8.2f} "
              f"{len(spec.groups):7d} {spec.num_units:7d} {len(spec.unsupported):8d} {tp_groups:>14s}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
