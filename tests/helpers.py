"""Shared test helpers: norm-statistics randomisation, the soundness check, and small
queries over a PermSpec's groups.

Import them as ``from tests.helpers import assert_sound`` (pytest runs from the repo root
with ``--import-mode=importlib``, which makes ``tests`` importable as a namespace package).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import Layout, PermSpec

__all__ = [
    "randomize_norm_stats",
    "assert_sound",
    "groups_touching",
    "group_with",
    "member_set",
    "permuted_rows",
    "sizes",
    "M",
    "structure",
    "assert_structure",
    "tiny_gpt2",
]

_NORMS = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def randomize_norm_stats(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Randomise (in place) every norm layer's running statistics and affine parameters.

    A fresh BatchNorm has ``running_mean = 0``, ``running_var = 1``, ``weight = 1`` and
    ``bias = 0``: permuting them or not makes no difference, so a spec that forgot them
    would pass the oracle. After this call it cannot. Modules whose class name contains
    ``Norm`` (hand-written RMSNorm and the like) are randomised too.
    ``num_batches_tracked`` and other integer buffers are left alone.

    Returns:
        the model, for chaining.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if not (isinstance(m, _NORMS) or "Norm" in type(m).__name__):
                continue
            tensors = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            for name, t in tensors:
                if t is None or not t.is_floating_point():
                    continue
                if "var" in name or name == "weight":  # positive, away from 1
                    t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
                else:  # running_mean, bias: away from 0
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model


def assert_sound(
    model: nn.Module,
    inputs: Any,
    *,
    min_groups: int = 1,
    rtol: float = 1e-4,
    seeds: tuple[int, ...] = (0, 1),
    randomize: bool = True,
) -> PermSpec:
    """Infer the spec of ``model`` and check it is sound.

    Norm statistics are randomised first (unless ``randomize=False``); then ``lint()``
    must pass, every member must name a state_dict tensor of the model, the spec's shapes
    must be the state_dict's, ``verify`` must pass (relative max error < ``rtol``) for
    every seed, and there must be at least ``min_groups`` groups.

    Returns:
        the PermSpec, for structural assertions.
    """
    if randomize:
        randomize_norm_stats(model, torch.Generator().manual_seed(1234))
    model.eval()
    spec = permgraph.infer(model, inputs)
    spec.lint()
    state = model.state_dict()
    tensors = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}  # not extra state
    assert spec.shapes == tensors, "spec.shapes differ from the state_dict's tensors"
    for g in spec.groups:
        for m in g.members:
            assert m.key in state, f"group {g.name}: member {m.key} is not in the state_dict"
    for seed in seeds:
        err = spec.verify(model, inputs, rtol=rtol, generator=torch.Generator().manual_seed(seed))
        assert err < rtol, f"relative error {err} >= {rtol}"
    assert len(spec.groups) >= min_groups, f"expected at least {min_groups} groups, got:\n{spec}"
    return spec


def groups_touching(spec: PermSpec, key: str, axis: int | None = None) -> list[permgraph.Group]:
    """The groups with a member on ``key`` (and ``axis``, when given)."""
    return [g for g in spec.groups if any(m.key == key and (axis is None or m.axis == axis) for m in g.members)]


def group_with(spec: PermSpec, key: str, axis: int, layout: Layout | None = None) -> permgraph.Group:
    """The one group with a member ``key[axis]`` (of ``layout`` when given); fails if none or several."""
    found = [
        g
        for g in spec.groups
        if any(m.key == key and m.axis == axis and (layout is None or m.layout == layout) for m in g.members)
    ]
    assert len(found) == 1, f"expected one group with {key}[{axis}] {layout or ''}, got {[g.name for g in found]}:\n{spec}"
    return found[0]


def member_set(group: permgraph.Group) -> set[tuple[str, int, Layout]]:
    """A group's members as ``(key, axis, layout)`` triples."""
    return {(m.key, m.axis, m.layout) for m in group.members}


def permuted_rows(spec: PermSpec, key: str, axis: int = 0) -> int:
    """How many positions along ``key[axis]`` some group moves (0 when the axis is fixed)."""
    covered: set[int] = set()
    for g in spec.groups:
        for m in g.members:
            if m.key == key and m.axis == axis:
                covered.update(m.layout.positions(g.size).reshape(-1).tolist())
    return len(covered)


def sizes(spec: PermSpec) -> list[int]:
    """The sorted group sizes."""
    return sorted(g.size for g in spec.groups)


def M(key: str, axis: int, **layout: Any) -> tuple[str, int, Layout]:
    """A member triple for expected structures: ``M("fc.weight", 1, block=16)``."""
    if "repeats" in layout:
        layout["repeats"] = tuple(tuple(r) for r in layout["repeats"])
    return (key, axis, Layout(**layout))


def structure(spec: PermSpec) -> list[tuple[int, frozenset[tuple[str, int, Layout]]]]:
    """The groups as ``(size, members)`` pairs, names ignored, in a canonical order."""
    return sorted(((g.size, frozenset(member_set(g))) for g in spec.groups), key=repr)


def assert_structure(spec: PermSpec, expected: list[tuple[int, set[tuple[str, int, Layout]]]]) -> None:
    """The spec has exactly the expected groups (sizes and members; names ignored)."""
    want = sorted(((n, frozenset(ms)) for n, ms in expected), key=repr)
    got = structure(spec)
    if got != want:
        def fmt(items):
            return "\n".join(
                f"  size {n}: " + ", ".join(sorted(f"{k}[{a}] ({lay})" for k, a, lay in ms)) for n, ms in items
            )

        raise AssertionError(f"group structure differs.\nexpected:\n{fmt(want)}\ngot:\n{fmt(got)}\n{spec}")


class RunningMean(nn.Module):
    """Updates a per-channel buffer in forward (in eval mode too) and reads it back."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("avg", torch.randn(8))

    def forward(self, x):
        h = F.relu(self.a(x))
        self.avg.mul_(0.5).add_(0.5 * h.mean(0).detach())
        return self.b(h - self.avg)


def tiny_gpt2(seed: int = 0, heads: str | None = None, n_layer: int = 2) -> tuple[nn.Module, dict[str, Any], PermSpec | None]:
    """A Hugging Face GPT-2 of width 64 and 4 heads (eval mode, weights from ``seed``), its
    example inputs, and, with ``heads`` (``"shared"`` or ``"independent"``), its spec;
    skips the test when transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
        ).eval()
        spec = None if heads is None else permgraph.infer(model, inputs, heads=heads)
    return model, inputs, spec
