"""The data and the small models of the demo and the examples: scikit-learn's digits (8x8
images, offline; ``pip install scikit-learn``), an MLP builder, a plain Adam trainer and an
evaluator of state_dicts, for reuse on other small models.

Not part of the core: ``import permgraph`` imports none of this (nor scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from permgraph.errors import DemoError

__all__ = ["Digits", "load_digits", "make_mlp", "train", "evaluator", "batches"]


@dataclass
class Digits:
    """scikit-learn's digits, split and standardised with the training split's statistics.

    Attributes:
        x_train: ``(n, 64)`` float32 features, or ``(n, 1, 8, 8)`` images.
        y_train: int64 labels.
        x_test: held-out features.
        y_test: held-out labels.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(*, images: bool = False, test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Load scikit-learn's 1797 digits (shipped with scikit-learn: no download).

    Args:
        images: give ``(n, 1, 8, 8)`` images instead of ``(n, 64)`` vectors.
        test_fraction: the share held out for evaluation.
        seed: seed of the split.

    Returns:
        The `Digits`, standardised per pixel with the training split's mean and std.

    Raises:
        DemoError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:
        raise DemoError("the demo needs scikit-learn for its data: pip install scikit-learn (or '.[demo]')") from exc
    data = _load()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, tr = order[:n_test], order[n_test:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 0.1  # constant border pixels have std 0
    x = (x - mean) / std
    if images:
        x = x.view(-1, 1, 8, 8)
    return Digits(x[tr], y[tr], x[test], y[test])


def make_mlp(widths: tuple[int, ...] = (64, 512, 512, 10)) -> nn.Sequential:
    """An MLP with ReLU between its Linear layers (``widths``: input, hidden..., output)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batches(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 256) -> list[Any]:
    """Consecutive batches of ``x`` (or of ``(x, y)`` pairs), as a list (it can be read many times)."""
    out: list[Any] = []
    for i in range(0, len(x), batch_size):
        out.append(x[i:i + batch_size] if y is None else (x[i:i + batch_size], y[i:i + batch_size]))
    return out


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> nn.Module:
    """Train a classifier with Adam and cross-entropy, shuffling with ``seed``; returns it in eval mode."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for _ in bar:
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{total / len(x):.3f}")
    return model.eval()


def evaluator(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> Callable[[Mapping[str, Any]], tuple[float, float]]:
    """``state_dict -> (mean cross-entropy, accuracy)`` of ``model``'s architecture on ``(x, y)``.

    The state_dict is loaded into ``model`` (which is put in eval mode); use it as the
    evaluation of `interpolation_curve`.
    """

    def evaluate(state: Mapping[str, Any]) -> tuple[float, float]:
        model.load_state_dict(state)
        model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out = model(x[i:i + batch_size])
                loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
                correct += int((out.argmax(-1) == y[i:i + batch_size]).sum())
        return loss / len(x), correct / len(x)

    return evaluate
