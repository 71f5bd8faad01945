"""Random initialisations performing above chance, once permuted (Benzing et al. 2022, Fig. 3, App. B).

Two MLPs are initialised from two seeds and trained on scikit-learn's digits. The
permutation that aligns the *trained* networks (activation matching, as in the paper) is
applied to B's *initialisation*: the average of A's initialisation and the permuted one of B
classifies far above chance, where the plain average of the two initialisations stays at
chance. The experiment measures, over several seed pairs (mean ± standard deviation):

1. accuracy along the line between the two initialisations, naive and permuted (Fig. 3 left);
2. the average of n = 2 ... 6 permuted initialisations, for several widths of a one-hidden-
   layer MLP (Fig. 3 mid): more networks, better average;
3. permutations found after k steps of training, applied to the initialisations
   (Fig. 3 right): a few dozen steps already reveal the shared valley;
4. permutations found at initialisation without any training, from the gradients of the
   loss (Appendix B, eq. 4; `permgraph.match.gradient.gradient_matching`), plain and FOOF.

    python examples/permuted_inits.py            # full run: docs/science/permuted_inits.{json,png} (~3 min)
    python examples/permuted_inits.py --quick    # CI: smaller models, asserts the claims
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import _experiment as experiment
import torch

import permgraph
from permgraph.examples.digits import batches, evaluator, load_digits, make_mlp, train
from permgraph.match.gradient import gradient_matching, loss_directions

CHANCE = 0.1



def init(widths: tuple[int, ...], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_mlp(widths)


def state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def trained(model: torch.nn.Module, seed: int, data, epochs: int) -> torch.nn.Module:
    """A trained copy of ``model`` (``permgraph.examples.digits.train``: Adam, lr 1e-3, batch 64)."""
    return train(copy.deepcopy(model), data.x_train, data.y_train, epochs=epochs, seed=seed)


def run(cfg: dict) -> dict:
    from tqdm.auto import tqdm

    data = load_digits()
    xb = batches(data.x_train)
    full = batches(data.x_train, data.y_train, len(data.x_train))
    out: dict = {"config": cfg, "chance": CHANCE}
    t0 = time.perf_counter()

    widths = (64, cfg["width"], cfg["width"], 10)
    spec = permgraph.infer(make_mlp(widths), data.x_train[:2])
    evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)
    parts: dict[str, list] = {k: [] for k in ("naive", "trained_perm", "gradient", "foof", "curves")}
    perm_at: dict[int, list[float]] = {k: [] for k in cfg["steps"]}
    barrier_at: dict[int, list[float]] = {k: [] for k in cfg["steps"]}
    damped: dict[float, list[float]] = {}
    for sa_seed, sb_seed in tqdm(cfg["pairs"], desc="seed pairs", leave=False):
        ia, ib = init(widths, sa_seed), init(widths, sb_seed)
        a0, b0 = state(ia), state(ib)
        ta, tb = trained(ia, sa_seed, data, cfg["epochs"]), trained(ib, sb_seed, data, cfg["epochs"])
        # 1. the trained networks' permutation, applied to the initialisations
        p = permgraph.activation_matching(spec, ta, tb, xb)
        curves = {name: permgraph.interpolation_curve(a0, spec.apply(q, b0), evaluate, cfg["alphas"])
                  for name, q in (("naive", spec.identity()), ("trained_perm", p))}
        # 4. Appendix B: permutations from gradients at initialisation, no training
        for name, pre, damping in (("gradient", "none", 0.1), ("foof", "foof", 0.1)):
            q = gradient_matching(spec, a0, b0, loss_directions(ia, full, precondition=pre, damping=damping),
                                  loss_directions(ib, full, precondition=pre, damping=damping))
            curves[name] = permgraph.interpolation_curve(a0, spec.apply(q, b0), evaluate, cfg["alphas"])
        for damping in cfg["foof_dampings"]:  # FOOF tends to the plain gradient as the damping grows
            q = gradient_matching(spec, a0, b0, loss_directions(ia, full, precondition="foof", damping=damping),
                                  loss_directions(ib, full, precondition="foof", damping=damping))
            damped.setdefault(damping, []).append(evaluate(permgraph.interpolate(a0, spec.apply(q, b0), 0.5))[1])
        mid = len(curves["naive"].alphas) // 2
        for name, c in curves.items():
            parts[name].append(c.accuracy[mid])
        parts["curves"].append({n: c.accuracy for n, c in curves.items()})
        # 3. permutations found after k steps, applied to the initialisations (and to the trained nets)
        ca = experiment.train_steps(ia, sa_seed, data, cfg["steps"])
        cb = experiment.train_steps(ib, sb_seed, data, cfg["steps"])
        for k in cfg["steps"]:
            q = permgraph.activation_matching(spec, ca[k], cb[k], xb)
            perm_at[k].append(evaluate(permgraph.interpolate(a0, spec.apply(q, b0), 0.5))[1])
            barrier_at[k].append(permgraph.interpolation_curve(state(ta), spec.apply(q, state(tb)), evaluate, 9).loss_barrier)
    alphas = permgraph.interpolation_curve(a0, b0, lambda sd: 0.0, cfg["alphas"]).alphas
    out["two_inits"] = {
        "widths": list(widths),
        "midpoint_accuracy": {n: experiment.mean_sd(parts[n]) for n in ("naive", "trained_perm", "gradient", "foof")},
        "curves": {"alphas": alphas, **{n: [statistics.fmean(c[n][i] for c in parts["curves"]) for i in range(len(alphas))]
                                        for n in ("naive", "trained_perm", "gradient", "foof")}},
    }
    out["foof_damping"] = {repr(d): experiment.mean_sd(v) for d, v in damped.items()}
    out["perm_after_steps"] = {str(k): {"init_midpoint_accuracy": experiment.mean_sd(perm_at[k]),
                                        "trained_loss_barrier": experiment.mean_sd(barrier_at[k])} for k in cfg["steps"]}

    # 2. averaging n permuted initialisations (one hidden layer)
    out["many"] = {}
    for h in tqdm(cfg["many_widths"], desc="averaging n inits", leave=False):
        w1 = (64, h, 10)
        spec1 = permgraph.infer(make_mlp(w1), data.x_train[:2])
        ev1 = evaluator(make_mlp(w1), data.x_test, data.y_test)
        acc: dict[int, list[float]] = {n: [] for n in cfg["many_n"]}
        for base in cfg["many_bases"]:
            seeds = [base + i for i in range(max(cfg["many_n"]))]
            inits = [init(w1, s) for s in seeds]
            nets = [trained(m, s, data, cfg["epochs"]) for m, s in zip(inits, seeds)]
            permuted = [state(inits[0])] + [
                spec1.apply(permgraph.activation_matching(spec1, nets[0], nets[i], xb), state(inits[i])) for i in range(1, len(nets))]
            for n in cfg["many_n"]:
                avg = {k: torch.stack([s[k] for s in permuted[:n]]).mean(0) for k in permuted[0]}
                acc[n].append(ev1(avg)[1])
        out["many"][str(h)] = {str(n): experiment.mean_sd(v) for n, v in acc.items()}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def check(res: dict) -> list[str]:
    """The qualitative claims; returns the ones that fail."""
    fails = []
    m = res["two_inits"]["midpoint_accuracy"]
    if not m["naive"]["max"] < CHANCE + 0.12:
        fails.append(f"the plain average of two initialisations is not near chance ({m['naive']['max']:.3f})")
    for name in ("trained_perm", "gradient"):
        if not m[name]["min"] > max(CHANCE + 0.15, m["naive"]["max"] + 0.1):
            fails.append(f"{name}: the permuted average of the initialisations ({m[name]['min']:.3f}, worst pair) "
                         f"is not far above chance and the naive average ({m['naive']['max']:.3f})")
    steps = sorted(res["perm_after_steps"], key=int)
    first, last = (res["perm_after_steps"][steps[0]]["init_midpoint_accuracy"]["mean"],
                   res["perm_after_steps"][steps[-1]]["init_midpoint_accuracy"]["mean"])
    if not last > first + 0.1:
        fails.append(f"a permutation found after training ({steps[-1]} steps: {last:.3f}) is not better than one at "
                     f"initialisation ({steps[0]} steps: {first:.3f}) on the initialisations")
    for h, by_n in res["many"].items():
        ns = sorted(by_n, key=int)
        if not by_n[ns[-1]]["mean"] > by_n[ns[0]]["mean"]:
            fails.append(f"width {h}: averaging {ns[-1]} permuted inits ({by_n[ns[-1]]['mean']:.3f}) does not beat "
                         f"{ns[0]} ({by_n[ns[0]]['mean']:.3f})")
    return fails


def table(res: dict) -> str:
    t = res["two_inits"]
    lines = [f"MLP {'-'.join(map(str, t['widths']))}, {len(res['config']['pairs'])} seed pairs: test accuracy of the "
             "average of two initialisations (mean ± sd; chance 10%)"]
    names = {"naive": "plain average", "trained_perm": "trained networks' permutation",
             "gradient": "gradient matching at init", "foof": "gradient matching at init, FOOF"}
    for n, label in names.items():
        v = t["midpoint_accuracy"][n]
        lines.append(f"  {label:<34}{100 * v['mean']:>7.1f}% ± {100 * v['sd']:.1f}")
    if res.get("foof_damping"):
        lines.append("  FOOF by damping: " + ", ".join(f"{d}: {100 * v['mean']:.1f}% ± {100 * v['sd']:.1f}"
                                                     for d, v in res["foof_damping"].items()))
    lines += ["", "  permutation found after k steps:  init average accuracy   trained-network loss barrier"]
    for k, v in res["perm_after_steps"].items():
        a, b = v["init_midpoint_accuracy"], v["trained_loss_barrier"]
        lines.append(f"  {k:>8} steps {100 * a['mean']:>18.1f}% ± {100 * a['sd']:.1f} {b['mean']:>20.4f} ± {b['sd']:.4f}")
    lines += ["", "  average of n permuted inits, one hidden layer (test accuracy):"]
    for h, by_n in res["many"].items():
        lines.append(f"  h={h:<6}" + "".join(f"  n={n}: {100 * v['mean']:5.1f}% ± {100 * v['sd']:.1f}" for n, v in by_n.items()))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    c = res["two_inits"]["curves"]
    names = {"naive": "plain", "trained_perm": "trained nets' permutation", "gradient": "gradient matching (App. B)",
             "foof": "gradient matching, FOOF"}
    for n, label in names.items():
        ax[0].plot(c["alphas"], [100 * v for v in c[n]], marker="o", ms=3, label=label)
    ax[0].axhline(100 * CHANCE, color="grey", ls=":", label="chance")
    ax[0].set(xlabel="alpha (0: init A, 1: permuted init B)", ylabel="test accuracy (%)",
              title=f"two initialisations, MLP {'-'.join(map(str, res['two_inits']['widths']))}")
    for h, by_n in res["many"].items():
        ns = sorted(by_n, key=int)
        ax[1].errorbar([int(n) for n in ns], [100 * by_n[n]["mean"] for n in ns], yerr=[100 * by_n[n]["sd"] for n in ns],
                       marker="o", ms=3, capsize=3, label=f"64-{h}-10")
    ax[1].axhline(100 * CHANCE, color="grey", ls=":")
    ax[1].set(xlabel="initialisations averaged (permuted to the first)", ylabel="test accuracy (%)", title="averaging more")
    ks = sorted(res["perm_after_steps"], key=int)
    ax[2].errorbar([int(k) for k in ks], [100 * res["perm_after_steps"][k]["init_midpoint_accuracy"]["mean"] for k in ks],
                   yerr=[100 * res["perm_after_steps"][k]["init_midpoint_accuracy"]["sd"] for k in ks],
                   marker="o", ms=3, capsize=3, label="average of the permuted inits")
    ax[2].axhline(100 * CHANCE, color="grey", ls=":")
    ax[2].set(xlabel="training steps before the permutation is found", ylabel="test accuracy (%)",
              title="permutation found after k steps")
    ax[2].set_xscale("symlog", linthresh=10)
    ax[2].set_xlim(left=0)
    twin = ax[2].twinx()
    twin.plot([int(k) for k in ks], [res["perm_after_steps"][k]["trained_loss_barrier"]["mean"] for k in ks],
              color="tab:red", marker="s", ms=3, ls="--", label="loss barrier of the trained nets (right)")
    twin.set_ylabel("trained networks' loss barrier")
    twin.legend(fontsize=8, loc="center right")
    experiment.save_figure(fig, ax, path)


def _quick(args: argparse.Namespace) -> dict:
    return {"width": 256, "pairs": [[0, 1], [2, 3]], "epochs": 10, "alphas": 5, "steps": [0, 50],
            "foof_dampings": [], "many_widths": [256], "many_n": [2, 4], "many_bases": [10, 20]}


def _full(args: argparse.Namespace) -> dict:
    return {"width": 512, "pairs": [[0, 1], [2, 3], [4, 5]], "epochs": 10, "alphas": 11,
            "steps": [0, 5, 10, 25, 50, 100, 220], "foof_dampings": [0.01, 1.0, 10.0],
            "many_widths": [64, 256, 1024], "many_n": [2, 3, 4, 6],
            "many_bases": [10, 20, 30]}


def main(argv: list[str] | None = None) -> int:
    return experiment.main("permuted_inits", __doc__, quick=_quick, full=_full, run=run, table=table, check=check,
                           plot=plot, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
