"""Transporting lottery-ticket masks between networks by permutation (Sharma et al. §5.2).

Iterative magnitude pruning (IMP) finds sparse subnetworks that train to the dense
network's accuracy, at the cost of many rounds of training. Sharma et al. ask whether the
mask found on one network A can be moved onto an independently trained network B by the
permutation that aligns the two *dense* networks. Here, on digits MLPs, over several seed
pairs (mean ± standard deviation) and at each IMP level (sparsity ``1 - (1 - rate)^level``),
B's test accuracy after rewinding, masking and retraining is measured with:

- A's IMP mask moved onto B by the dense-to-dense permutation (weight matching of the
  trained dense networks): ``spec.apply(spec.inverse(P), mask_A)``;
- A's IMP mask as it is (unpermuted: A's units are not B's);
- one-shot magnitude pruning of B's trained dense weights at the same sparsity;
- B's own IMP mask (the gold standard, the expensive way).

Pruning is per layer, on the Linear weights (biases are kept); a pruned weight stays zero
during retraining (its gradient is zeroed, so Adam never moves it); rewinding is to the
weights after one epoch of training.

    python examples/mask_transport.py            # full run: docs/science/mask_transport.{json,png}
    python examples/mask_transport.py --quick    # CI: smaller models, fewer levels, asserts the claims
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
from permgraph.examples.digits import evaluator, load_digits, make_mlp, train

KINDS = ("own_imp", "transported", "unpermuted", "one_shot")
LABELS = {"own_imp": "B's own IMP mask (gold standard)", "transported": "A's mask, permuted onto B",
          "unpermuted": "A's mask, unpermuted", "one_shot": "one-shot pruning of B"}



def prunable(state: dict[str, torch.Tensor]) -> list[str]:
    """The weight matrices (the Linear layers' ``weight``)."""
    return [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2]


def magnitude_mask(state: dict, keep: dict | None, rate: float) -> dict[str, torch.Tensor]:
    """Per layer, prune ``rate`` of the weights still kept (``keep``; all when None), smallest magnitude first."""
    out = {}
    for k in prunable(state):
        alive = torch.ones_like(state[k]) if keep is None else keep[k]
        n_alive = int(alive.sum())
        n_prune = int(round(n_alive * rate))
        scores = state[k].abs().masked_fill(alive == 0, float("inf")).flatten()
        mask = alive.clone().flatten()
        mask[torch.argsort(scores)[:n_prune]] = 0
        out[k] = mask.view_as(state[k])
    return out


def one_shot_mask(state: dict, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, keep the ``1 - sparsity`` largest-magnitude weights."""
    return magnitude_mask(state, None, sparsity)


def retrain(rewound: dict, mask: dict, widths: tuple[int, ...], data, seed: int, epochs: int) -> dict[str, torch.Tensor]:
    """Load ``rewound``, zero the masked weights, train with their gradients zeroed; return the state."""
    model = make_mlp(widths)
    model.load_state_dict({k: v * mask[k] if k in mask else v for k, v in rewound.items()})
    hooks = [p.register_hook(lambda g, m=mask[name]: g * m) for name, p in model.named_parameters() if name in mask]
    train(model, data.x_train, data.y_train, epochs=epochs, seed=seed)
    for h in hooks:
        h.remove()
    sd = model.state_dict()
    assert all(bool((sd[k][mask[k] == 0] == 0).all()) for k in mask), "a pruned weight moved"
    return sd


def full_mask(spec_state: dict, mask: dict) -> dict[str, torch.Tensor]:
    """``mask`` completed with ones for every other tensor, so that ``spec.apply`` can move it."""
    return {k: mask[k] if k in mask else torch.ones_like(v) for k, v in spec_state.items()}


def run(cfg: dict) -> dict:
    from tqdm.auto import tqdm

    data = load_digits()
    widths = (64, cfg["width"], cfg["width"], 10)
    spec = permgraph.infer(make_mlp(widths), data.x_train[:2])
    evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)
    levels = list(range(1, cfg["levels"] + 1))
    acc: dict[str, dict[int, list[float]]] = {k: {lv: [] for lv in levels} for k in KINDS}
    dense: list[float] = []
    t0 = time.perf_counter()
    for pa, pb in tqdm(cfg["pairs"], desc="seed pairs", leave=False):
        rewound, trained = {}, {}
        for name, seed in (("a", pa), ("b", pb)):
            torch.manual_seed(seed)
            m = train(make_mlp(widths), data.x_train, data.y_train, epochs=1, seed=seed)  # the rewind point
            rewound[name] = copy.deepcopy(m.state_dict())
            trained[name] = train(m, data.x_train, data.y_train, epochs=cfg["epochs"] - 1, seed=seed + 1000).state_dict()
        dense.append(evaluate(trained["b"])[1])
        perm = permgraph.weight_matching(spec, trained["a"], trained["b"])  # aligns B to A
        to_b = spec.inverse(perm)                                            # moves A's units onto B's
        masks = {"a": None, "b": None}
        current = dict(trained)
        for lv in tqdm(levels, desc="IMP levels", leave=False):
            sparsity = 1 - (1 - cfg["rate"]) ** lv
            for name, seed in (("a", pa), ("b", pb)):  # one IMP round on each network
                masks[name] = magnitude_mask(current[name], masks[name], cfg["rate"])
                current[name] = retrain(rewound[name], masks[name], widths, data, seed, cfg["epochs"])
            moved = spec.apply(to_b, full_mask(trained["a"], masks["a"]))
            candidates = {"own_imp": None, "transported": {k: moved[k] for k in masks["a"]},
                          "unpermuted": masks["a"], "one_shot": one_shot_mask(trained["b"], sparsity)}
            for kind, mask in candidates.items():
                sd = current["b"] if mask is None else retrain(rewound["b"], mask, widths, data, pb, cfg["epochs"])
                acc[kind][lv].append(evaluate(sd)[1])
    return {"config": cfg, "widths": list(widths),
            "sparsity": {str(lv): 1 - (1 - cfg["rate"]) ** lv for lv in levels},
            "dense_accuracy": experiment.mean_sd(dense),
            "accuracy": {k: {str(lv): experiment.mean_sd(v) for lv, v in d.items()} for k, d in acc.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def check(res: dict) -> list[str]:
    """The qualitative claims; returns the ones that fail."""
    fails = []
    a = res["accuracy"]
    top = max(a["transported"], key=int)
    if not all(t > u for t, u in zip(a["transported"][top]["values"], a["unpermuted"][top]["values"])):
        fails.append(f"at the sparsest level ({res['sparsity'][top]:.0%}), the permuted mask does not beat the unpermuted one "
                     f"on every pair ({a['transported'][top]['values']} against {a['unpermuted'][top]['values']})")
    gap_t = statistics.fmean(a["own_imp"][lv]["mean"] - a["transported"][lv]["mean"] for lv in a["own_imp"])
    gap_u = statistics.fmean(a["own_imp"][lv]["mean"] - a["unpermuted"][lv]["mean"] for lv in a["own_imp"])
    if not gap_t < 0.5 * gap_u:
        fails.append(f"the permuted mask is not much closer to B's own IMP mask than the unpermuted one "
                     f"(mean shortfall {gap_t:.3f} against {gap_u:.3f})")
    return fails


def table(res: dict) -> str:
    c = res["config"]
    lines = [f"MLP {'-'.join(map(str, res['widths']))}, {len(c['pairs'])} seed pairs: test accuracy of B after rewinding, "
             f"masking and retraining (dense B: {100 * res['dense_accuracy']['mean']:.1f}%)",
             f"  {'level':>5} {'sparsity':>9}" + "".join(f"{k:>18}" for k in KINDS)]
    for lv, sp in res["sparsity"].items():
        lines.append(f"  {lv:>5} {100 * sp:>8.1f}%" + "".join(
            f"{100 * res['accuracy'][k][lv]['mean']:>11.1f}% ± {100 * res['accuracy'][k][lv]['sd']:.1f}" for k in KINDS))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.2))
    lvs = sorted(res["sparsity"], key=int)
    xs = [100 * res["sparsity"][lv] for lv in lvs]
    for k in KINDS:
        ax.errorbar(xs, [100 * res["accuracy"][k][lv]["mean"] for lv in lvs], yerr=[100 * res["accuracy"][k][lv]["sd"] for lv in lvs],
                    marker="o", ms=3, capsize=3, label=LABELS[k])
    ax.axhline(100 * res["dense_accuracy"]["mean"], color="black", ls=":", label="dense B")
    ax.set(xlabel="sparsity of the Linear weights (%)", ylabel="test accuracy of B, retrained (%)",
           title=f"moving IMP masks from A to B (MLP {'-'.join(map(str, res['widths']))})")
    experiment.save_figure(fig, [ax], path)


def _quick(args: argparse.Namespace) -> dict:
    return {"width": 128, "pairs": [[0, 1], [2, 3]], "epochs": 10, "rate": 0.5, "levels": 4}


def _full(args: argparse.Namespace) -> dict:
    return {"width": 256, "pairs": [[0, 1], [2, 3], [4, 5]], "epochs": 10, "rate": 0.3, "levels": 8}


def main(argv: list[str] | None = None) -> int:
    return experiment.main("mask_transport", __doc__, quick=_quick, full=_full, run=run, table=table, check=check,
                           plot=plot, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
