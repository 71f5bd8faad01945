"""The command line shared by the science experiments in this folder (not an example itself).

Each experiment is ``run(cfg) -> results``, ``table(results) -> str``, ``check(results) ->
[failed claims]`` and ``plot(results, path)``; `main` gives it the same options everywhere:
no argument runs the full experiment and writes ``docs/science/NAME.json`` and ``.png``;
``--quick`` runs a small one, writes nothing and exits 1 when a claim fails (CI runs that);
``--replot`` redraws the figure from the JSON of a full run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent.parent / "docs" / "science"

Config = Callable[[argparse.Namespace], dict[str, Any]]


def main(name: str, doc: str | None, *, quick: Config, full: Config, run: Callable[[dict[str, Any]], dict[str, Any]],
         table: Callable[[dict[str, Any]], str], check: Callable[[dict[str, Any]], list[str]],
         plot: Callable[[dict[str, Any], Path], None], options: Callable[[argparse.ArgumentParser], None] | None = None,
         argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(doc or name).split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run, no files, assert the claims (CI)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder of {name}.json/.png (full mode)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON of a full run, and stop")
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    data, figure = args.out / f"{name}.json", args.out / f"{name}.png"
    if args.replot:
        plot(json.loads(data.read_text()), figure)
        return 0
    torch.set_num_threads(1)
    res = run((quick if args.quick else full)(args))
    print(table(res))
    fails = check(res)
    res["claims_hold"] = not fails
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps(res, indent=1))
        plot(res, figure)
        print(f"wrote {data} and {figure}" + (f" ({res['seconds']} s)" if "seconds" in res else ""))
    for f in fails:
        print("CLAIM FAILED:", f, file=sys.stderr)
    return 1 if fails else 0


def mean_sd(xs: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (0 for one value), min, max, count and the values of ``xs``."""
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs), "values": list(xs)}


def save_figure(fig: Any, axes: Any, path: Path) -> None:
    """Grid and legend on every axis, then the figure written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_steps(model: torch.nn.Module, seed: int, data: Any, steps: list[int]) -> dict[int, torch.nn.Module]:
    """Copies of ``model`` (in eval mode) after each number of Adam updates in ``steps``: the
    settings of ``permgraph.examples.digits.train`` (lr 1e-3, batch 64, reshuffled each epoch with
    ``seed``), counted in updates instead of epochs. ``model`` itself is not changed."""
    import copy

    import torch.nn.functional as F

    model = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out, done, order = {}, 0, torch.empty(0, dtype=torch.int64)
    for k in sorted(steps):
        while done < k:
            if len(order) == 0:
                order = torch.randperm(len(data.x_train), generator=gen)
            idx, order = order[:64], order[64:]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
        out[k] = copy.deepcopy(model).eval()
    return out
