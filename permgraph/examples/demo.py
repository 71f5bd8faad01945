"""The ``permgraph demo``: Git Re-Basin's headline result in well under a minute on a laptop.

Two MLPs (64-512-512-10, ReLU) are trained from different seeds on scikit-learn's digits
(8x8 images, offline; ``pip install scikit-learn``), their groups are inferred, model B is
aligned to model A by weight matching and by activation matching, and the loss and
accuracy barriers of the naive and the aligned interpolations are measured on held-out
digits, with the fraction of units the two matchers map alike.

Everything here is plain permgraph API; the data, the trainer and the evaluation are in
`permgraph.examples.digits`. Not part of the core: ``import permgraph`` imports none of this.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from permgraph.errors import DemoError
from permgraph.examples.digits import batches, evaluator, load_digits, make_mlp, train
from permgraph.metrics import Curve, FixedPoints, fixed_points, interpolation_curve

__all__ = ["DemoResult", "run_demo", "plot_curves", "METHODS"]

METHODS = ("naive", "weight_matching", "activation_matching")
LABELS = {"naive": "naive", "weight_matching": "weight matching", "activation_matching": "activation matching"}

@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class DemoResult:
    """What `run_demo` measured.

    Attributes:
        curves: method (``"naive"``, ``"weight_matching"``, ``"activation_matching"``) ->
            the interpolation `Curve` on the held-out digits.
        fixed_points: the fixed points of the weight-matching permutation against the
            activation-matching one (the units both matchers map alike).
        permutations: method -> the permutation that aligns B to A (the identity for naive).
        groups: group name -> size.
        seconds: wall time of the whole demo.
        timings: seconds per stage (``train``, ``infer``, ``weight_matching``, ...).
        config: the settings it ran with.
        spec: the `PermSpec` of the MLP.
        states: ``"a"`` and ``"b"`` -> the trained models' state_dicts (B not aligned).
    """

    curves: dict[str, Curve]
    fixed_points: FixedPoints
    permutations: dict[str, dict[str, torch.Tensor]]
    groups: dict[str, int]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    spec: Any = field(default=None, repr=False)
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``a.safetensors``, ``b.safetensors`` (the two models) and
        ``perm_weight_matching.safetensors`` / ``perm_activation_matching.safetensors``
        (the permutations aligning B to A) into ``folder`` (created if needed).

        Returns:
            The paths written.
        """
        from permgraph.io import save_aligned, save_permutation

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [save_aligned(folder / f"{k}.safetensors", sd, spec=self.spec) for k, sd in self.states.items()]
        for method in ("weight_matching", "activation_matching"):
            paths.append(save_permutation(folder / f"perm_{method}.safetensors", self.spec, self.permutations[method]))
        return paths

    @property
    def loss_barrier(self) -> dict[str, float]:
        """Method -> loss barrier."""
        return {m: c.loss_barrier for m, c in self.curves.items()}

    @property
    def accuracy_barrier(self) -> dict[str, float]:
        """Method -> accuracy barrier (a fraction: 0.03 is 3 points of accuracy)."""
        return {m: float(c.accuracy_barrier) for m, c in self.curves.items()}  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document ``permgraph demo --json`` prints."""
        naive = self.curves["naive"]
        return {
            "loss_barrier": self.loss_barrier,
            "accuracy_barrier": self.accuracy_barrier,
            "fixed_point_fraction": self.fixed_points.overall,
            "seconds": round(self.seconds, 2),
            "endpoints": {
                "a": {"loss": naive.loss[0], "accuracy": naive.accuracy[0]},  # type: ignore[index]
                "b": {"loss": naive.loss[-1], "accuracy": naive.accuracy[-1]},  # type: ignore[index]
            },
            "fixed_points": self.fixed_points.to_dict(),
            "groups": dict(self.groups),
            "curves": {m: {"alphas": c.alphas, "loss": c.loss, "accuracy": c.accuracy} for m, c in self.curves.items()},
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "config": dict(self.config),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __str__(self) -> str:
        c = self.config
        naive = self.curves["naive"]
        acc, loss = naive.accuracy or [], naive.loss
        widths = "-".join(map(str, c.get("widths", ())))
        lines = [
            f"Two MLPs {widths} (ReLU) trained from seeds {c.get('seed_a')} and {c.get('seed_b')}, {c.get('epochs')} epochs "
            f"each on {c.get('n_train')} scikit-learn digits",
            f"  on {c.get('n_test')} held-out digits: model A loss {loss[0]:.4f}, accuracy {acc[0]:.2%}; "
            f"model B loss {loss[-1]:.4f}, accuracy {acc[-1]:.2%}",
            f"  groups: {', '.join(f'{g} ({n} units)' for g, n in self.groups.items())}",
            "",
            f"  {'interpolating A and B':<22} {'loss barrier':>13} {'accuracy barrier':>17} {'loss at alpha=0.5':>18}",
        ]
        for m, curve in self.curves.items():
            mid = curve.loss[min(range(len(curve.alphas)), key=lambda i: abs(curve.alphas[i] - 0.5))]
            lines.append(f"  {LABELS[m]:<22} {curve.loss_barrier:>13.4f} {float(curve.accuracy_barrier or 0) * 100:>12.2f} pts "
                         f"{mid:>18.4f}")
        fp = self.fixed_points
        chance = sum(1 for _ in fp.groups) / max(fp.units, 1)
        lines += [
            "",
            f"  fixed points: weight and activation matching map {fp.overall:.1%} of the units alike "
            f"(two random permutations: {chance:.1%})",
            f"  done in {self.seconds:.1f} s ("
            + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in self.timings.items()) + ")",
        ]
        return "\n".join(lines)


def run_demo(
    *,
    seed_a: int = 0,
    seed_b: int = 1,
    widths: tuple[int, ...] = (64, 512, 512, 10),
    epochs: int = 10,
    alphas: int = 11,
    progress: bool = True,
    threads: int | None = 1,
) -> DemoResult:
    """Train two MLPs on digits from two seeds, align B to A two ways, measure the barriers.

    Args:
        seed_a: seed of model A (initialisation and batch order).
        seed_b: seed of model B.
        widths: the MLP's layer widths (input 64, output 10).
        epochs: training epochs per model.
        alphas: number of interpolation points from 0 to 1.
        progress: show tqdm progress bars (on stderr).
        threads: torch CPU threads while it runs (restored afterwards); one is fastest for
            models this small, and does not fight other processes for cores.

    Returns:
        A `DemoResult`; ``str()`` is the report ``permgraph demo`` prints.

    Raises:
        DemoError: scikit-learn is missing, or the widths do not start at 64 and end at 10.
    """
    if len(widths) < 3 or widths[0] != 64 or widths[-1] != 10:
        raise DemoError(f"widths must start with 64 (the pixels) and end with 10 (the classes), with hidden widths between; got {widths}")
    from permgraph.analysis import infer
    from permgraph.match import activation_matching, weight_matching

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with _threads(threads):
        data = load_digits()
        t = time.perf_counter()
        models = {}
        for name, seed in (("A", seed_a), ("B", seed_b)):
            torch.manual_seed(seed)
            models[name] = train(make_mlp(widths), data.x_train, data.y_train, epochs=epochs, seed=seed,
                                 progress=progress, desc=f"train model {name}")
        timings["train"] = time.perf_counter() - t
        state_a, state_b = models["A"].state_dict(), models["B"].state_dict()

        t = time.perf_counter()
        spec = infer(make_mlp(widths), data.x_train[:2])
        timings["infer"] = time.perf_counter() - t

        t = time.perf_counter()
        p_wm = weight_matching(spec, state_a, state_b, seed=0, progress=progress)
        timings["weight_matching"] = time.perf_counter() - t

        t = time.perf_counter()
        p_am = activation_matching(spec, models["A"], models["B"], batches(data.x_train), progress=progress)
        timings["activation_matching"] = time.perf_counter() - t

        t = time.perf_counter()
        evaluate = evaluator(make_mlp(widths), data.x_test, data.y_test)
        perms = {"naive": spec.identity(), "weight_matching": p_wm, "activation_matching": p_am}
        curves = {
            m: interpolation_curve(state_a, spec.apply(p, state_b), evaluate, alphas, progress=progress,
                                   desc=f"interpolate ({LABELS[m]})")
            for m, p in perms.items()
        }
        timings["interpolation"] = time.perf_counter() - t
    config = {"seed_a": seed_a, "seed_b": seed_b, "widths": list(widths), "epochs": epochs, "alphas": alphas,
              "n_train": len(data.x_train), "n_test": len(data.x_test), "threads": threads}
    return DemoResult(curves, fixed_points(p_wm, p_am), perms, {g.name: g.size for g in spec.groups},
                      time.perf_counter() - t_start, timings, config, spec, {"a": state_a, "b": state_b})


def plot_curves(curves: Mapping[str, Curve], path: str, *, title: str = "") -> None:
    """Save loss and accuracy against alpha, one line per curve, as an image (PNG, SVG, PDF).

    Args:
        curves: label -> `Curve` (the method names of `run_demo` get readable labels).
        path: the image file to write.
        title: a title over both panels.

    Raises:
        DemoError: matplotlib is not installed (``pip install matplotlib``, or ``'.[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DemoError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from exc
    has_acc = any(c.accuracy is not None for c in curves.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.8), squeeze=False)
    for name, c in curves.items():
        axes[0][0].plot(c.alphas, c.loss, marker="o", ms=3, label=f"{LABELS.get(name, name)} (barrier {c.loss_barrier:.3f})")
        if has_acc and c.accuracy is not None:
            axes[0][1].plot(c.alphas, [100 * a for a in c.accuracy], marker="o", ms=3,
                            label=f"{LABELS.get(name, name)} (barrier {100 * float(c.accuracy_barrier or 0):.2f} pts)")
    axes[0][0].set(xlabel="alpha (0: model A, 1: model B)", ylabel="test loss (cross-entropy)")
    if has_acc:
        axes[0][1].set(xlabel="alpha (0: model A, 1: model B)", ylabel="test accuracy (%)")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise DemoError(f"cannot write the plot to {path!r}: {exc}") from exc
    finally:
        plt.close(fig)
