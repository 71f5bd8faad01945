"""Merging models trained on disjoint, biased data (Git Re-Basin's federated experiment).

The digits' training set is split in two disjoint halves with opposite biases: model A sees
mostly the digits 0-4 (80% of their images, 20% of those of 5-9), model B the rest (mostly
5-9). Neither does well on all ten digits. B is aligned to A (weight matching, which needs
no data, as a federated setting would want; and activation matching on both halves) and the
two are merged as ``(1-α)·A + α·P(B)``. Over several seed pairs (mean ± standard deviation),
on the whole test set, the experiment compares across α:

- the aligned merges, the naive merge ``(1-α)·A + α·B``,
- each endpoint, the ensemble of A and B (the average of their predicted probabilities),
- a model trained on all the training data.

Git Re-Basin's finding (ResNets on CIFAR-100): the aligned merge beats either model alone;
the naive merge is much worse; the ensemble beats every merge, and training on everything
beats the ensemble. The claims are asserted at the narrowest width (32 hidden units); the
full run also shows how the picture changes with width (wide digits MLPs merge well even
unaligned).

    python examples/disjoint_merge.py            # full run: docs/science/disjoint_merge.{json,png}
    python examples/disjoint_merge.py --quick    # CI: smaller models, asserts the claims
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _experiment as experiment
import torch
import torch.nn.functional as F

import permgraph
from permgraph.examples.digits import batches, evaluator, load_digits, make_mlp, train

MERGES = ("naive", "weight_matching", "activation_matching")
LABELS = {"naive": "naive merge", "weight_matching": "merge after weight matching",
          "activation_matching": "merge after activation matching"}



def biased_halves(y: torch.Tensor, bias: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint index sets: the first holds ``bias`` of the images of 0-4 and ``1 - bias``
    of those of 5-9; the second holds the rest."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    for label in range(10):
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(len(idx) * (bias if label < 5 else 1 - bias))
        first.append(idx[:k])
        second.append(idx[k:])
    return torch.cat(first), torch.cat(second)


def run_width(h: int, cfg: dict, data) -> dict:
    """The experiment at hidden width ``h`` (two hidden layers)."""
    from tqdm.auto import tqdm

    widths = (64, h, h, 10)
    spec = permgraph.infer(make_mlp(widths), data.x_train[:2])
    evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)
    t0 = time.perf_counter()
    curves: dict[str, list] = {m: [] for m in MERGES}
    single: dict[str, list[float]] = {"a": [], "b": [], "ensemble": [], "full": [], "a_on_own_classes": [],
                                      "b_on_own_classes": []}
    for pair in tqdm(cfg["pairs"], desc=f"h={h}: seed pairs", leave=False):
        ia, ib = biased_halves(data.y_train, cfg["bias"], seed=100 + pair[0])
        nets = []
        for seed, idx in zip(pair, (ia, ib)):
            torch.manual_seed(seed)
            nets.append(train(make_mlp(widths), data.x_train[idx], data.y_train[idx], epochs=cfg["epochs"], seed=seed))
        a, b = nets
        torch.manual_seed(pair[0])
        full = train(make_mlp(widths), data.x_train, data.y_train, epochs=cfg["epochs"], seed=pair[0])
        sa, sb = a.state_dict(), b.state_dict()
        perms = {"naive": spec.identity(), "weight_matching": permgraph.weight_matching(spec, sa, sb),
                 "activation_matching": permgraph.activation_matching(spec, a, b, batches(data.x_train))}
        for m, p in perms.items():
            curves[m].append(permgraph.interpolation_curve(sa, spec.apply(p, sb), evaluate, cfg["alphas"]))
        with torch.no_grad():
            probs = (F.softmax(a(data.x_test), -1) + F.softmax(b(data.x_test), -1)) / 2
        single["ensemble"].append(float((probs.argmax(-1) == data.y_test).float().mean()))
        single["a"].append(evaluate(sa)[1])
        single["b"].append(evaluate(sb)[1])
        single["full"].append(evaluate(full.state_dict())[1])
        low, high = data.y_test < 5, data.y_test >= 5
        with torch.no_grad():
            single["a_on_own_classes"].append(float((a(data.x_test[low]).argmax(-1) == data.y_test[low]).float().mean()))
            single["b_on_own_classes"].append(float((b(data.x_test[high]).argmax(-1) == data.y_test[high]).float().mean()))
    alphas = curves["naive"][0].alphas
    out = {"widths": list(widths), "alphas": alphas,
           "accuracy": {m: [statistics.fmean(c.accuracy[i] for c in cs) for i in range(len(alphas))] for m, cs in curves.items()},
           "accuracy_sd": {m: [statistics.stdev(c.accuracy[i] for c in cs) if len(cs) > 1 else 0.0 for i in range(len(alphas))]
                           for m, cs in curves.items()},
           "loss": {m: [statistics.fmean(c.loss[i] for c in cs) for i in range(len(alphas))] for m, cs in curves.items()},
           "best_merge_accuracy": {m: experiment.mean_sd([max(c.accuracy) for c in cs]) for m, cs in curves.items()},
           "midpoint_accuracy": {m: experiment.mean_sd([c.accuracy[len(alphas) // 2] for c in cs]) for m, cs in curves.items()},
           "models": {k: experiment.mean_sd(v) for k, v in single.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    return out


def run(cfg: dict) -> dict:
    """Every width of ``cfg["widths"]``; the claims are checked at the first."""
    data = load_digits()
    return {"config": cfg, "width": {str(h): run_width(h, cfg, data) for h in cfg["widths"]}}


def check(res: dict) -> list[str]:
    """The qualitative claims, at the first (narrowest) width; returns the ones that fail."""
    fails = []
    r = res["width"][str(res["config"]["widths"][0])]
    best, models = r["best_merge_accuracy"], r["models"]
    endpoints = [max(x, y) for x, y in zip(models["a"]["values"], models["b"]["values"])]
    for m in ("weight_matching", "activation_matching"):
        if not all(x > e for x, e in zip(best[m]["values"], endpoints)):
            fails.append(f"{m}: the best aligned merge ({best[m]['values']}) does not beat both endpoints ({endpoints}) "
                         "on every pair")
        if not best[m]["mean"] > best["naive"]["mean"] + 0.05:
            fails.append(f"{m}: the aligned merge ({best[m]['mean']:.3f}) is not 5 points above the naive one "
                         f"({best['naive']['mean']:.3f})")
        if not models["ensemble"]["mean"] > best[m]["mean"]:
            fails.append(f"the ensemble does not beat the merge after {m}")
    if not models["full"]["mean"] > models["ensemble"]["mean"]:
        fails.append("the model trained on all the data does not beat the ensemble")
    return fails


def table(res: dict) -> str:
    c = res["config"]
    lines = []
    for r in res["width"].values():
        m = r["models"]
        lines += [f"MLP {'-'.join(map(str, r['widths']))}, halves biased {c['bias']:.0%}/{1 - c['bias']:.0%}, "
                  f"{len(c['pairs'])} seed pairs, test accuracy on all ten digits (mean ± sd)"]
        rows = [("model A (mostly 0-4)", m["a"]), ("model B (mostly 5-9)", m["b"]),
                ("A on 0-4 only", m["a_on_own_classes"]), ("B on 5-9 only", m["b_on_own_classes"])]
        rows += [(f"{LABELS[k]}, best alpha", r["best_merge_accuracy"][k]) for k in MERGES]
        rows += [(f"{LABELS[k]}, alpha 0.5", r["midpoint_accuracy"][k]) for k in MERGES]
        rows += [("ensemble of A and B", m["ensemble"]), ("one model on all the data", m["full"])]
        for name, v in rows:
            lines.append(f"  {name:<44}{100 * v['mean']:>7.1f}% ± {100 * v['sd']:.1f}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    first = str(res["config"]["widths"][0])
    r = res["width"][first]
    xs = r["alphas"]
    for k, color in zip(MERGES, ("tab:blue", "tab:orange", "tab:green")):
        mu, sd = [100 * v for v in r["accuracy"][k]], [100 * v for v in r["accuracy_sd"][k]]
        ax[0].plot(xs, mu, marker="o", ms=3, color=color, label=LABELS[k])
        ax[0].fill_between(xs, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], color=color, alpha=0.15)
    for k, label, ls in (("ensemble", "ensemble of A and B", "--"), ("full", "one model on all the data", ":")):
        ax[0].axhline(100 * r["models"][k]["mean"], color="black", ls=ls, label=label)
    ax[0].set(xlabel="alpha (0: model A, mostly 0-4; 1: model B, mostly 5-9)", ylabel="test accuracy, all digits (%)",
              title=f"merging models trained on disjoint, biased halves (h={first})")
    ws = sorted(res["width"], key=int)
    for key, label, color, ls in (("naive", "naive merge", "tab:blue", "-"),
                                  ("weight_matching", "merge after weight matching", "tab:orange", "-"),
                                  ("activation_matching", "merge after activation matching", "tab:green", "-")):
        d = [res["width"][h]["best_merge_accuracy"][key] for h in ws]
        ax[1].errorbar([int(h) for h in ws], [100 * v["mean"] for v in d], yerr=[100 * v["sd"] for v in d], color=color,
                       ls=ls, marker="o", ms=3, capsize=3, label=f"{label}, best alpha")
    for key, label, ls in (("ensemble", "ensemble", "--"), ("full", "one model on all the data", ":")):
        ax[1].plot([int(h) for h in ws], [100 * res["width"][h]["models"][key]["mean"] for h in ws], color="black", ls=ls,
                   marker=".", label=label)
    ax[1].plot([int(h) for h in ws], [100 * max(res["width"][h]["models"]["a"]["mean"], res["width"][h]["models"]["b"]["mean"])
                                      for h in ws], color="grey", marker="v", label="better endpoint")
    ax[1].set(xlabel="hidden width", ylabel="test accuracy, all digits (%)", xscale="log", title="against width")
    ax[1].set_xticks([int(h) for h in ws], [h for h in ws])
    ax[1].minorticks_off()
    experiment.save_figure(fig, ax, path)


def _quick(args: argparse.Namespace) -> dict:
    return {"widths": [32], "pairs": [[0, 1], [2, 3]], "epochs": 20, "bias": args.bias, "alphas": 11}


def _full(args: argparse.Namespace) -> dict:
    return {"widths": [32, 64, 128, 512], "pairs": [[0, 1], [2, 3], [4, 5], [6, 7]], "epochs": 20,
            "bias": args.bias, "alphas": 21}


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bias", type=float, default=0.9,
                        help="share of the images of 0-4 in A's half (and of 5-9 in B's); default 0.9")


def main(argv: list[str] | None = None) -> int:
    return experiment.main("disjoint_merge", __doc__, quick=_quick, full=_full, run=run, table=table, check=check,
                           plot=plot,
                           options=_options, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
