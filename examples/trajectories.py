"""One permutation aligns two whole training trajectories (Sharma et al., simultaneous weak
linear connectivity modulo permutation; their §5.1, §6 and App. H.1).

Two MLPs are trained on scikit-learn's digits from two seeds, with checkpoints along the way.
Over several seed pairs (mean ± standard deviation) the experiment measures:

1. with the permutation found at the *end* of training (weight and activation matching),
   the loss barrier between the two networks at every checkpoint, against the naive one:
   one permutation connects every pair of checkpoints (simultaneous weak connectivity);
2. permutations computed *early* (at checkpoint t), applied to the final networks: weight
   matching computed early fails to connect them while activation matching does not;
3. the fixed points (`fixed_points`) between the permutation found at t and the final one:
   how much of the final correspondence is already there at t, for each matcher.

    python examples/trajectories.py            # full run: docs/science/trajectories.{json,png}
    python examples/trajectories.py --quick    # CI: smaller models, asserts the claims
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _experiment as experiment
import torch

import permgraph
from permgraph.examples.digits import batches, evaluator, load_digits, make_mlp

MATCHERS = ("weight_matching", "activation_matching")
LABELS = {"naive": "naive", "weight_matching": "weight matching", "activation_matching": "activation matching"}



def trajectory(widths: tuple[int, ...], seed: int, data, steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """State_dicts of a ``make_mlp(widths)`` made from ``seed`` after each number of Adam updates
    in ``steps`` (`_experiment.train_steps`)."""
    torch.manual_seed(seed)
    return {k: m.state_dict() for k, m in experiment.train_steps(make_mlp(widths), seed, data, steps).items()}


def run(cfg: dict) -> dict:
    from tqdm.auto import tqdm

    data = load_digits()
    xb = batches(data.x_train)
    widths = (64, cfg["width"], cfg["width"], 10)
    spec = permgraph.infer(make_mlp(widths), data.x_train[:2])
    evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)
    steps = cfg["steps"]
    last = max(steps)
    t0 = time.perf_counter()

    def model(sd: dict) -> torch.nn.Module:
        m = make_mlp(widths)
        m.load_state_dict(sd)
        return m.eval()

    def barrier(sa: dict, sb: dict) -> float:
        return permgraph.interpolation_curve(sa, sb, evaluate, cfg["alphas"]).loss_barrier

    along: dict[str, dict[int, list[float]]] = {m: {t: [] for t in steps} for m in ("naive",) + MATCHERS}
    early: dict[str, dict[int, list[float]]] = {m: {t: [] for t in steps} for m in MATCHERS}
    fixed: dict[str, dict[int, list[float]]] = {m: {t: [] for t in steps} for m in MATCHERS + ("wm_vs_am",)}
    for sa_seed, sb_seed in tqdm(cfg["pairs"], desc="seed pairs", leave=False):
        ta, tb = trajectory(widths, sa_seed, data, steps), trajectory(widths, sb_seed, data, steps)
        perms = {t: {"weight_matching": permgraph.weight_matching(spec, ta[t], tb[t]),
                     "activation_matching": permgraph.activation_matching(spec, model(ta[t]), model(tb[t]), xb)}
                 for t in steps}
        for t in tqdm(steps, desc="checkpoints", leave=False):
            along["naive"][t].append(barrier(ta[t], tb[t]))
            for m in MATCHERS:
                along[m][t].append(barrier(ta[t], spec.apply(perms[last][m], tb[t])))   # 1. the final permutation at t
                early[m][t].append(barrier(ta[last], spec.apply(perms[t][m], tb[last])))  # 2. the permutation at t, at the end
                fixed[m][t].append(permgraph.fixed_points(perms[t][m], perms[last][m]).overall)  # 3.
            fixed["wm_vs_am"][t].append(permgraph.fixed_points(perms[t]["weight_matching"], perms[t]["activation_matching"]).overall)
    res = {"config": cfg, "widths": list(widths),
           "final_perm_along_trajectory": {m: {str(t): experiment.mean_sd(v) for t, v in d.items()} for m, d in along.items()},
           "perm_at_t_on_final": {m: {str(t): experiment.mean_sd(v) for t, v in d.items()} for m, d in early.items()},
           "fixed_points_with_final": {m: {str(t): experiment.mean_sd(v) for t, v in d.items()} for m, d in fixed.items()},
           "chance_fixed_points": 1 / cfg["width"], "seconds": round(time.perf_counter() - t0, 1)}
    return res


def check(res: dict) -> list[str]:
    """The qualitative claims; returns the ones that fail."""
    fails = []
    along, early = res["final_perm_along_trajectory"], res["perm_at_t_on_final"]
    steps = sorted(along["naive"], key=int)
    trained = [t for t in steps if int(t) >= res["config"]["from_step"]]
    for m in MATCHERS:
        for t in trained:  # every checkpoint once the networks have learned something
            if not along[m][t]["max"] < 0.5 * along["naive"][t]["min"]:
                fails.append(f"{m}: the final permutation does not connect the checkpoints at step {t} "
                             f"({along[m][t]['max']:.3f} worst pair, naive {along['naive'][t]['min']:.3f} best pair)")
    t_early = str(res["config"]["early_step"])
    wm, am = early["weight_matching"][t_early], early["activation_matching"][t_early]
    if not all(a < w for a, w in zip(am["values"], wm["values"])):
        fails.append(f"at step {t_early}, activation matching's permutation does not beat weight matching's on the final "
                     f"networks on every pair ({am['values']} against {wm['values']})")
    wm_end = early["weight_matching"][steps[-1]]["mean"]
    if not wm["mean"] > 3 * wm_end:
        fails.append(f"weight matching computed at step {t_early} does about as well as at the end "
                     f"({wm['mean']:.3f} against {wm_end:.3f})")
    return fails


def table(res: dict) -> str:
    c = res["config"]
    lines = [f"MLP {'-'.join(map(str, res['widths']))}, {len(c['pairs'])} seed pairs, test loss barrier (mean ± sd)",
             f"  {'step':>6}  {'naive':>16}  {'final WM perm':>16}  {'final AM perm':>16}  |  {'WM at t, final':>16}  "
             f"{'AM at t, final':>16}  |  fixed points with final: WM, AM; WM vs AM at t"]
    along, early, fp = res["final_perm_along_trajectory"], res["perm_at_t_on_final"], res["fixed_points_with_final"]
    for t in sorted(along["naive"], key=int):
        cell = [f"{d[t]['mean']:.4f} ± {d[t]['sd']:.4f}" for d in (along["naive"], along["weight_matching"],
                                                                 along["activation_matching"], early["weight_matching"],
                                                                 early["activation_matching"])]
        lines.append(f"  {t:>6}  {cell[0]:>16}  {cell[1]:>16}  {cell[2]:>16}  |  {cell[3]:>16}  {cell[4]:>16}  |  "
                     f"{fp['weight_matching'][t]['mean']:.3f}, {fp['activation_matching'][t]['mean']:.3f}; "
                     f"{fp['wm_vs_am'][t]['mean']:.3f}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, (part, names, title) in enumerate((
            ("final_perm_along_trajectory", ("naive",) + MATCHERS, "the final permutation, at every step"),
            ("perm_at_t_on_final", MATCHERS, "the permutation found at step t, on the final nets"),
            ("fixed_points_with_final", MATCHERS + ("wm_vs_am",), "fixed points"))):
        for m in names:
            d = res[part][m]
            ts = sorted(d, key=int)
            label = "WM vs AM at step t" if m == "wm_vs_am" else (LABELS[m] + (" with the final one" if i == 2 else ""))
            ax[i].errorbar([int(t) for t in ts], [d[t]["mean"] for t in ts], yerr=[d[t]["sd"] for t in ts],
                           marker="o", ms=3, capsize=3, label=label)
        ax[i].set(title=title, xscale="symlog")
        ax[i].set_xlim(left=0)
    naive_end = res["final_perm_along_trajectory"]["naive"][max(res["final_perm_along_trajectory"]["naive"], key=int)]["mean"]
    ax[1].axhline(naive_end, color="tab:blue", ls=":", label="naive, final nets")
    ax[2].axhline(res["chance_fixed_points"], color="grey", ls=":", label="two random permutations")
    ax[0].set(xlabel="training step of both networks", ylabel="test loss barrier")
    ax[1].set(xlabel="step t at which the permutation is found", ylabel="test loss barrier of the final networks")
    ax[2].set(xlabel="step t", ylabel="fraction of units mapped alike")
    experiment.save_figure(fig, ax, path)


def _quick(args: argparse.Namespace) -> dict:
    return {"width": 128, "pairs": [[0, 1], [2, 3]], "steps": [0, 5, 25, 220], "alphas": 5, "early_step": 5,
            "from_step": 25}


def _full(args: argparse.Namespace) -> dict:
    return {"width": 512, "pairs": [[0, 1], [2, 3], [4, 5]], "steps": [0, 2, 5, 10, 25, 50, 100, 150, 220],
            "alphas": 11, "early_step": 5, "from_step": 25}


def main(argv: list[str] | None = None) -> int:
    return experiment.main("trajectories", __doc__, quick=_quick, full=_full, run=run, table=table, check=check,
                           plot=plot, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
