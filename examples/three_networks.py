"""Three networks: aligning through a third one, against directly (Sharma et al. §5.3, strong
linear connectivity modulo permutation); MergeMany's shared frame and cycle consistency.

Weak connectivity gives each *pair* its own permutation. Strong connectivity asks for one
permutation per network that connects *every* pair at once. Sharma et al. test it with
three networks A, B, C: B and C are each aligned to A (weight or activation matching), and
the barrier between aligned B and aligned C, which nothing aligned to each other, is
compared with the barrier of B and C aligned directly. Over several seed triples and MLP
widths (mean ± standard deviation) the experiment measures:

1. the B-C barrier naive, through A (indirect) and direct, as the width grows: the
   indirect barrier falls with width but stays above the direct one;
2. the fixed points between the direct map C->B and the indirect one C->A->B: the two
   matchers' maps through A are not the direct maps;
3. MergeMany (`merge_many`) on the same three networks: every pair's barrier in its shared
   frame, and the cycle error of its maps against independent pairwise weight matching.

    python examples/three_networks.py            # full run: docs/science/three_networks.{json,png}
    python examples/three_networks.py --quick    # CI: fewer widths, asserts the claims
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import _experiment as experiment
import torch

import permgraph
from permgraph.examples.digits import batches, evaluator, load_digits, make_mlp, train
from permgraph.match.many import cycle_consistent_maps, cycle_error, pairwise_maps

MATCHERS = ("weight_matching", "activation_matching")
LABELS = {"naive": "naive", "weight_matching": "weight matching", "activation_matching": "activation matching"}



def run(cfg: dict) -> dict:
    from tqdm.auto import tqdm

    data = load_digits()
    xb = batches(data.x_train)
    out: dict = {"config": cfg, "width": {}}
    t0 = time.perf_counter()
    for h in tqdm(cfg["widths"], desc="widths", leave=False):
        widths = (64, h, h, 10)
        spec = permgraph.infer(make_mlp(widths), data.x_train[:2])
        evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)

        def barrier(x: dict, y: dict, evaluate=evaluate) -> float:
            return permgraph.interpolation_curve(x, y, evaluate, cfg["alphas"]).loss_barrier

        res: dict[str, list[float]] = {}
        for triple in cfg["triples"]:
            nets = []
            for seed in triple:
                torch.manual_seed(seed)
                nets.append(train(make_mlp(widths), data.x_train, data.y_train, epochs=cfg["epochs"], seed=seed))
            a, b, c = nets
            sa, sb, sc = (n.state_dict() for n in nets)
            res.setdefault("naive", []).append(barrier(sb, sc))
            for m in MATCHERS:
                if m == "weight_matching":
                    to_a = {"b": permgraph.weight_matching(spec, sa, sb), "c": permgraph.weight_matching(spec, sa, sc)}
                    direct = permgraph.weight_matching(spec, sb, sc)  # C -> B
                else:
                    to_a = {"b": permgraph.activation_matching(spec, a, b, xb), "c": permgraph.activation_matching(spec, a, c, xb)}
                    direct = permgraph.activation_matching(spec, b, c, xb)
                res.setdefault(f"{m}/indirect", []).append(barrier(spec.apply(to_a["b"], sb), spec.apply(to_a["c"], sc)))
                res.setdefault(f"{m}/direct", []).append(barrier(sb, spec.apply(direct, sc)))
                res.setdefault(f"{m}/to_a", []).append(statistics.fmean(
                    [barrier(sa, spec.apply(to_a["b"], sb)), barrier(sa, spec.apply(to_a["c"], sc))]))
                through_a = spec.compose(to_a["c"], spec.inverse(to_a["b"]))  # C -> A -> B
                res.setdefault(f"{m}/fixed_points_direct_vs_indirect", []).append(
                    permgraph.fixed_points(direct, through_a).overall)
            if h in cfg["merge_widths"]:
                merged = permgraph.merge_many(spec, [sa, sb, sc])
                frame = merged.states
                pair_barriers = [barrier(frame[i], frame[j]) for i, j in itertools.combinations(range(3), 2)]
                res.setdefault("merge_many/max_pair_barrier", []).append(max(pair_barriers))
                res.setdefault("merge_many/mean_pair_barrier", []).append(statistics.fmean(pair_barriers))
                res.setdefault("merge_many/cycle_error", []).append(cycle_error(spec, cycle_consistent_maps(spec, merged.perms)))
                res.setdefault("pairwise_wm/cycle_error", []).append(cycle_error(spec, pairwise_maps(spec, [sa, sb, sc])))
                loss, acc = evaluate(merged.merged)
                res.setdefault("merge_many/merged_accuracy", []).append(acc)
                res.setdefault("endpoint_accuracy", []).extend(evaluate(s)[1] for s in (sa, sb, sc))
        out["width"][str(h)] = {k: experiment.mean_sd(v) for k, v in res.items()}
    out["chance_fixed_points"] = {str(h): 1 / h for h in cfg["widths"]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def check(res: dict) -> list[str]:
    """The qualitative claims; returns the ones that fail."""
    fails = []
    ws = sorted(res["width"], key=int)
    for m in MATCHERS:
        for h in ws:
            r = res["width"][h]
            ind, dir_ = r[f"{m}/indirect"], r[f"{m}/direct"]
            if not all(i > d for i, d in zip(ind["values"], dir_["values"])):
                fails.append(f"{m}, width {h}: the barrier through A is not above the direct one on every triple "
                             f"({ind['values']} against {dir_['values']})")
            if not ind["mean"] < r["naive"]["mean"]:
                fails.append(f"{m}, width {h}: the barrier through A is not below the naive one")
        lo, hi = res["width"][ws[0]][f"{m}/indirect"]["mean"], res["width"][ws[-1]][f"{m}/indirect"]["mean"]
        if not hi < lo:
            fails.append(f"{m}: the barrier through A does not fall with width ({ws[0]}: {lo:.3f}, {ws[-1]}: {hi:.3f})")
    for h, r in res["width"].items():
        if "merge_many/cycle_error" in r:
            if not (r["merge_many/cycle_error"]["max"] == 0.0 and r["pairwise_wm/cycle_error"]["min"] > 0.0):
                fails.append(f"width {h}: MergeMany's maps are not cycle consistent where pairwise ones are not")
    return fails


def table(res: dict) -> str:
    c = res["config"]
    lines = [f"MLPs 64-h-h-10, {len(c['triples'])} seed triples, test loss barrier between B and C (mean ± sd)",
             f"  {'h':>5}  {'naive':>16}" + "".join(f"  {LABELS[m] + ' ' + k:>32}" for m in MATCHERS for k in ("via A", "direct"))
             + "  fixed points direct vs via A (WM, AM)"]
    for h, r in res["width"].items():
        cells = [r["naive"]] + [r[f"{m}/{k}"] for m in MATCHERS for k in ("indirect", "direct")]
        lines.append(f"  {h:>5}  " + "  ".join(f"{x['mean']:.4f} ± {x['sd']:.4f}".rjust(16 if i == 0 else 32)
                                                for i, x in enumerate(cells))
                     + f"  {r['weight_matching/fixed_points_direct_vs_indirect']['mean']:.3f}, "
                       f"{r['activation_matching/fixed_points_direct_vs_indirect']['mean']:.3f}")
    for h, r in res["width"].items():
        if "merge_many/cycle_error" in r:
            lines.append(f"  MergeMany, h={h}: pair barriers in its frame max {r['merge_many/max_pair_barrier']['mean']:.4f} ± "
                         f"{r['merge_many/max_pair_barrier']['sd']:.4f}, mean {r['merge_many/mean_pair_barrier']['mean']:.4f}; "
                         f"cycle error {r['merge_many/cycle_error']['mean']:.3f} (pairwise weight matching "
                         f"{r['pairwise_wm/cycle_error']['mean']:.3f}); merged accuracy "
                         f"{100 * r['merge_many/merged_accuracy']['mean']:.1f}% (endpoints "
                         f"{100 * r['endpoint_accuracy']['mean']:.1f}%)")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ws = sorted(res["width"], key=int)
    x = [int(h) for h in ws]
    series = [("naive", "naive", "tab:blue", "-")]
    for m, color in (("weight_matching", "tab:orange"), ("activation_matching", "tab:green")):
        series += [(f"{m}/indirect", f"{LABELS[m]}, through A", color, "--"), (f"{m}/direct", f"{LABELS[m]}, direct", color, "-")]
    for key, label, color, ls in series:
        ax[0].errorbar(x, [res["width"][h][key]["mean"] for h in ws], yerr=[res["width"][h][key]["sd"] for h in ws],
                       color=color, ls=ls, marker="o", ms=3, capsize=3, label=label)
    mm = [h for h in ws if "merge_many/max_pair_barrier" in res["width"][h]]
    if mm:
        ax[0].errorbar([int(h) for h in mm], [res["width"][h]["merge_many/max_pair_barrier"]["mean"] for h in mm],
                       yerr=[res["width"][h]["merge_many/max_pair_barrier"]["sd"] for h in mm], color="tab:red", ls="none",
                       marker="*", ms=8, capsize=3, label="MergeMany frame, worst pair")
    ax[0].set(xlabel="hidden width (two hidden layers)", ylabel="test loss barrier between B and C", xscale="log", yscale="log",
              title="B-C barrier: through A vs direct")
    for m, color in (("weight_matching", "tab:orange"), ("activation_matching", "tab:green")):
        key = f"{m}/fixed_points_direct_vs_indirect"
        ax[1].errorbar(x, [res["width"][h][key]["mean"] for h in ws], yerr=[res["width"][h][key]["sd"] for h in ws],
                       color=color, marker="o", ms=3, capsize=3, label=LABELS[m])
    ax[1].plot(x, [res["chance_fixed_points"][h] for h in ws], color="grey", ls=":", label="two random permutations")
    ax[1].set(xlabel="hidden width", ylabel="fixed points, direct C->B vs C->A->B", xscale="log", yscale="log",
              title="do the maps through A equal the direct ones?")
    experiment.save_figure(fig, ax, path)


def _quick(args: argparse.Namespace) -> dict:
    return {"widths": [32, 256], "triples": [[0, 1, 2], [3, 4, 5]], "epochs": 10, "alphas": 5, "merge_widths": [256]}


def _full(args: argparse.Namespace) -> dict:
    return {"widths": [32, 64, 128, 256, 512, 1024], "triples": [[0, 1, 2], [3, 4, 5], [6, 7, 8]], "epochs": 10,
            "alphas": 11, "merge_widths": [128, 512]}


def main(argv: list[str] | None = None) -> int:
    return experiment.main("three_networks", __doc__, quick=_quick, full=_full, run=run, table=table, check=check,
                           plot=plot, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
