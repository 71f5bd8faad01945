"""Linear mode connectivity of MLPs modulo permutation (Git Re-Basin; Benzing et al. 2022).

Pairs of MLPs are trained on scikit-learn's digits from different seeds. The straight line
between two of them crosses a loss barrier; after model B's hidden units are permuted to
match model A's (weight matching, activation matching, the straight-through estimator,
Sinkhorn re-basin) the barrier nearly vanishes. The experiment measures, over several seed
pairs (mean ± standard deviation):

1. the loss and accuracy barriers, and the interpolation curves, of naive interpolation and
   of the four matchers on a 64-512-512-10 MLP;
2. the barrier against the hidden width (one to two hidden layers, 16 to 512 units): it
   shrinks as the networks widen (Benzing Fig. 2, Git Re-Basin Fig. 5);
3. the barrier against the depth (1 to 4 hidden layers of 128 units): deeper networks keep
   a larger barrier (Benzing Fig. 2).

    python examples/lmc_mlp.py            # full run: docs/science/lmc_mlp.{json,png} (~3 min, 2 cores)
    python examples/lmc_mlp.py --quick    # CI: smaller models, asserts the claims (~15 s)

Everything is permgraph's public API plus the demo's data loader and trainer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _experiment as experiment
import torch

import permgraph
from permgraph.examples.digits import batches, evaluator, load_digits, make_mlp, train

METHODS = ("naive", "weight_matching", "activation_matching", "ste", "sinkhorn")
LABELS = {"naive": "naive", "weight_matching": "weight matching", "activation_matching": "activation matching",
          "ste": "STE", "sinkhorn": "Sinkhorn (L2)"}



def train_pair(widths: tuple[int, ...], pair: tuple[int, int], data, epochs: int) -> list[torch.nn.Module]:
    """Two MLPs of ``widths`` trained from the seeds of ``pair`` (init and batch order)."""
    models = []
    for seed in pair:
        torch.manual_seed(seed)
        models.append(train(make_mlp(widths), data.x_train, data.y_train, epochs=epochs, seed=seed))
    return models


def align(method: str, spec, a: torch.nn.Module, b: torch.nn.Module, data, cfg: dict) -> dict[str, torch.Tensor]:
    """The permutation aligning B to A by ``method``."""
    sa, sb = a.state_dict(), b.state_dict()
    if method == "naive":
        return spec.identity()
    if method == "weight_matching":
        return permgraph.weight_matching(spec, sa, sb, seed=0)
    if method == "activation_matching":
        return permgraph.activation_matching(spec, a, b, batches(data.x_train))
    if method == "ste":
        return permgraph.ste_matching(spec, a, b, batches(data.x_train, data.y_train, 128), steps=cfg["ste_steps"])
    if method == "sinkhorn":
        return permgraph.sinkhorn_matching(spec, sa, sb, steps=cfg["sinkhorn_steps"], tau=1.0, lr=0.1)
    raise ValueError(method)


def barriers(widths: tuple[int, ...], pair: tuple[int, int], data, methods: tuple[str, ...], cfg: dict
             ) -> dict[str, permgraph.metrics.Curve]:
    """Method -> the test-set interpolation curve of one seed pair."""
    a, b = train_pair(widths, pair, data, cfg["epochs"])
    spec = permgraph.infer(make_mlp(widths), data.x_train[:2])
    evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)
    return {m: permgraph.interpolation_curve(a.state_dict(), spec.apply(align(m, spec, a, b, data, cfg), b.state_dict()),
                                             evaluate, cfg["alphas"])
            for m in methods}


def summarise(curves: list[dict[str, permgraph.metrics.Curve]]) -> dict[str, dict[str, dict[str, float]]]:
    """Method -> {"loss_barrier", "accuracy_barrier"} -> mean_sd over the pairs."""
    return {m: {"loss_barrier": experiment.mean_sd([c[m].loss_barrier for c in curves]),
                "accuracy_barrier": experiment.mean_sd([float(c[m].accuracy_barrier) for c in curves])}
            for m in curves[0]}


def run(cfg: dict) -> dict:
    """Run the three parts; returns the JSON-able results."""
    from tqdm.auto import tqdm

    data = load_digits()
    out: dict = {"config": cfg}
    t0 = time.perf_counter()

    # 1. the matchers on one architecture
    widths = (64, cfg["width"], cfg["width"], 10)
    runs = [barriers(widths, tuple(p), data, METHODS, cfg) for p in tqdm(cfg["pairs"], desc="matchers", leave=False)]
    out["matchers"] = {"widths": list(widths), "barriers": summarise(runs),
                       "curves": {m: {"alphas": runs[0][m].alphas,
                                      "loss": [statistics.fmean(r[m].loss[i] for r in runs) for i in range(len(runs[0][m].alphas))],
                                      "accuracy": [statistics.fmean(r[m].accuracy[i] for r in runs) for i in range(len(runs[0][m].alphas))],
                                      "endpoint_accuracy": experiment.mean_sd([x for r in runs for x in (r[m].accuracy[0], r[m].accuracy[-1])])}
                                  for m in METHODS}}

    # 2. width sweep (two hidden layers)
    sweep = ("naive", "weight_matching", "activation_matching")
    out["width"] = {}
    for w in tqdm(cfg["widths"], desc="width sweep", leave=False):
        rs = [barriers((64, w, w, 10), tuple(p), data, sweep, cfg) for p in cfg["pairs"]]
        out["width"][str(w)] = summarise(rs)

    # 3. depth sweep (hidden width cfg["depth_width"])
    out["depth"] = {}
    for d in tqdm(cfg["depths"], desc="depth sweep", leave=False):
        rs = [barriers((64,) + (cfg["depth_width"],) * d + (10,), tuple(p), data, sweep, cfg) for p in cfg["pairs"]]
        out["depth"][str(d)] = summarise(rs)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def check(res: dict) -> list[str]:
    """The qualitative claims; returns the ones that fail (empty: all hold)."""
    fails = []
    b = res["matchers"]["barriers"]
    naive = b["naive"]["loss_barrier"]
    for m in METHODS[1:]:
        # every matcher removes most of the naive barrier, on every seed pair (max, not mean)
        if not b[m]["loss_barrier"]["max"] < 0.5 * naive["min"]:
            fails.append(f"{m}: loss barrier {b[m]['loss_barrier']['max']:.3f} (worst pair) is not under half "
                         f"the naive one {naive['min']:.3f} (best pair)")
        if not b[m]["accuracy_barrier"]["mean"] < b["naive"]["accuracy_barrier"]["mean"]:
            fails.append(f"{m}: accuracy barrier not below naive")
    ws = sorted(res["width"], key=int)
    for m in ("weight_matching", "activation_matching"):
        lo, hi = res["width"][ws[0]][m]["loss_barrier"]["mean"], res["width"][ws[-1]][m]["loss_barrier"]["mean"]
        if not hi < lo:
            fails.append(f"{m}: barrier does not shrink with width ({ws[0]}: {lo:.3f}, {ws[-1]}: {hi:.3f})")
    ds = sorted(res["depth"], key=int)
    lo, hi = (res["depth"][ds[0]]["activation_matching"]["loss_barrier"]["mean"],
              res["depth"][ds[-1]]["activation_matching"]["loss_barrier"]["mean"])
    if not hi > lo:
        fails.append(f"activation matching: barrier does not grow with depth ({ds[0]}: {lo:.3f}, {ds[-1]}: {hi:.3f})")
    return fails


def table(res: dict) -> str:
    """A plain-text table of the results."""
    lines = [f"MLP {'-'.join(map(str, res['matchers']['widths']))}, {len(res['config']['pairs'])} seed pairs, "
             "test set (mean ± sd)", f"  {'method':<22}{'loss barrier':>20}{'accuracy barrier (pts)':>26}"]
    for m, b in res["matchers"]["barriers"].items():
        lb, ab = b["loss_barrier"], b["accuracy_barrier"]
        lines.append(f"  {LABELS[m]:<22}{lb['mean']:>12.4f} ± {lb['sd']:.4f}{100 * ab['mean']:>16.2f} ± {100 * ab['sd']:.2f}")
    for part, name in (("width", "hidden width (2 layers)"), ("depth", f"hidden layers of {res['config']['depth_width']}")):
        lines += ["", f"  loss barrier by {name}:", f"  {'':>6}" + "".join(f"{LABELS[m]:>24}" for m in ("naive", "weight_matching", "activation_matching"))]
        for k, b in res[part].items():
            lines.append(f"  {k:>6}" + "".join(f"{b[m]['loss_barrier']['mean']:>15.4f} ± {b[m]['loss_barrier']['sd']:.4f}"
                                               for m in ("naive", "weight_matching", "activation_matching")))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Four panels: loss and accuracy along the line, barrier against width and depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    for m, c in res["matchers"]["curves"].items():
        ax[0].plot(c["alphas"], c["loss"], marker="o", ms=3, label=LABELS[m])
        ax[1].plot(c["alphas"], [100 * a for a in c["accuracy"]], marker="o", ms=3, label=LABELS[m])
    ax[0].set(xlabel="alpha (0: A, 1: B)", ylabel="test loss", title=f"MLP {'-'.join(map(str, res['matchers']['widths']))}")
    ax[1].set(xlabel="alpha (0: A, 1: B)", ylabel="test accuracy (%)", title="mean over seed pairs")
    for i, part, xlabel in ((2, "width", "hidden width (2 hidden layers)"), (3, "depth", f"hidden layers ({res['config']['depth_width']} units)")):
        xs = sorted(res[part], key=int)
        for m in ("naive", "weight_matching", "activation_matching"):
            mu = [res[part][x][m]["loss_barrier"]["mean"] for x in xs]
            sd = [res[part][x][m]["loss_barrier"]["sd"] for x in xs]
            ax[i].errorbar([int(x) for x in xs], mu, yerr=sd, marker="o", ms=3, capsize=3, label=LABELS[m])
        ax[i].set(xlabel=xlabel, ylabel="test loss barrier (mean ± sd)")
        if part == "width":
            ax[i].set_xscale("log", base=2)
        ax[i].set_yscale("log")
    experiment.save_figure(fig, ax, path)


def _quick(args: argparse.Namespace) -> dict:
    return {"width": 128, "pairs": [[0, 1], [2, 3]], "epochs": 10, "alphas": 11, "ste_steps": 40,
            "sinkhorn_steps": 100, "widths": [16, 256], "depths": [1, 4], "depth_width": 64}


def _full(args: argparse.Namespace) -> dict:
    return {"width": 512, "pairs": [[0, 1], [2, 3], [4, 5]], "epochs": 10, "alphas": 21, "ste_steps": 200,
            "sinkhorn_steps": 200, "widths": [16, 32, 64, 128, 256, 512], "depths": [1, 2, 3, 4], "depth_width": 128}


def main(argv: list[str] | None = None) -> int:
    return experiment.main("lmc_mlp", __doc__, quick=_quick, full=_full, run=run, table=table, check=check,
                           plot=plot, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
