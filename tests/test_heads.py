"""Per-head units (``infer(..., heads="independent")``) and group names with roles.

Every head may permute its own query/key units and its own value units: the oracle checks
it in float64 with three permutations on tiny real models. Where an op mixes the heads (a
mean, a sum, a softmax or a roll across them) the units stay shared, and a negative control
shows that splitting them there would be wrong.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import InferArgumentError, SpecMismatchError, VerificationError
from permgraph.testing import EXTRA_ZOO, ZOO


class Attn(nn.Module):
    """Hand-written attention; ``mix`` names something done across the heads of its output."""

    def __init__(self, width: int = 16, heads: int = 4, mix: str | None = None, order: str = "qkvo") -> None:
        super().__init__()
        self.heads, self.mix = heads, mix
        for name in order:  # registration (state_dict) order must not change the names
            setattr(self, name, nn.Linear(width, width if name != "o" or mix != "sum" else width))
        if mix == "sum":
            self.o = nn.Linear(width // heads, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape

        def split(z):
            return z.view(b, t, self.heads, e // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        if self.mix == "sum":  # heads summed away
            return self.o(a.sum(1))
        if self.mix == "mean":  # the mean over heads added back to every head
            a = a + a.mean(1, keepdim=True)
        elif self.mix == "softmax":  # normalised across heads
            a = torch.softmax(a, dim=1)
        elif self.mix == "roll":  # each head reads its neighbour
            a = a + 0.5 * a.roll(1, dims=1)
        return self.o(a.transpose(1, 2).reshape(b, t, e))


def _net(**kw) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), Attn(**kw), nn.ReLU(), nn.Linear(16, 3)).double()


X = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _per_head(spec, role: str) -> list[str]:
    return [n for n in spec.names if re.search(rf"\.{role}\.h\d+$", n)]


def _sound(spec, model, inputs) -> None:
    spec.lint()
    for seed in range(3):
        assert spec.verify(model, inputs, generator=torch.Generator().manual_seed(seed), draws=1) < 1e-8


def _positions(spec, names) -> dict[tuple[str, int], set[int]]:
    out: dict[tuple[str, int], set[int]] = {}
    for n in names:
        g = spec[n]
        for m in g.members:
            out.setdefault((m.key, m.axis), set()).update(m.layout.positions(g.size).reshape(-1).tolist())
    return out


def test_hand_written_attention_gets_one_group_per_head() -> None:
    model = _net()
    shared, ind = permgraph.infer(model, X), permgraph.infer(model, X, heads="independent")
    assert {"1.heads", "1.qk", "1.v"} <= set(shared.names)
    assert _per_head(ind, "qk") == [f"1.qk.h{i}" for i in range(4)]
    assert _per_head(ind, "v") == [f"1.v.h{i}" for i in range(4)]
    assert "1.heads" in ind.names and "1.qk" not in ind.names
    # the heads' groups cover exactly the positions of the shared group, one head each
    for role in ("qk", "v"):
        assert _positions(ind, _per_head(ind, role)) == _positions(shared, [f"1.{role}"])
        assert all(ind[n].size == 4 for n in _per_head(ind, role))
    _sound(ind, model, X)


@pytest.mark.parametrize("mix", ["mean", "softmax", "roll"])
def test_ops_across_heads_keep_value_units_shared(mix: str) -> None:
    model = _net(mix=mix)
    ind = permgraph.infer(model, X, heads="independent")
    assert not _per_head(ind, "v"), ind.names  # mixed across heads: not proven per head
    assert any(n.endswith(".v") for n in ind.names), ind.names  # still shared, as before
    assert len(_per_head(ind, "qk")) == 4  # queries and keys are not touched by the mix
    _sound(ind, model, X)
    # negative control: the per-head split of the same weights without the mix is wrong here
    clean = permgraph.infer(_net(), X, heads="independent")
    with pytest.raises(VerificationError):
        clean.verify(model, X, generator=torch.Generator().manual_seed(0))


def test_sum_over_heads_keeps_value_units_shared() -> None:
    model = _net(mix="sum")
    ind = permgraph.infer(model, X, heads="independent")
    assert not _per_head(ind, "v") and any(n.endswith(".v") for n in ind.names), ind.names
    _sound(ind, model, X)


def _tv_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)


def _timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def _mha() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                 enable_nested_tensor=False)


_IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
_SEQ = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
REAL = {
    "gpt2": (ZOO["gpt2"].build, ZOO["gpt2"].inputs, {"qk": 4, "v": 4}),
    "bert": (ZOO["bert"].build, ZOO["bert"].inputs, {"qk": 4, "v": 4}),
    # grouped-query attention: the value units split per key/value head (2), and so do the
    # query heads that share one (the subheads); rotary embeddings fix the query/key units
    "llama": (EXTRA_ZOO["llama"].build, EXTRA_ZOO["llama"].inputs, {"qk": 0, "v": 2, "subheads": 2}),
    "t5": (EXTRA_ZOO["t5"].build, EXTRA_ZOO["t5"].inputs, {"qk": 4, "v": 4}),
    "torchvision_vit": (_tv_vit, lambda: _IMG, {"qk": 4, "v": 4}),
    "timm_vit": (_timm_vit, lambda: _IMG, {"qk": 4, "v": 4}),
    "multihead_attention": (_mha, lambda: _SEQ, {"qk": 4, "v": 4}),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(REAL))
def test_real_models_are_sound_per_head(name: str) -> None:
    build, inputs, per_layer = REAL[name]
    model, x = build().double(), inputs()
    if isinstance(x, torch.Tensor):
        x = x.double()
    shared, ind = permgraph.infer(model, x), permgraph.infer(model, x, heads="independent")
    for role, heads in per_layer.items():
        # every shared group of this role is split into `heads` groups (or left alone)
        whole = [n for n in shared.names if n.endswith(f".{role}")]
        split = _per_head(ind, role)
        assert len(split) == heads * len(whole), (role, whole, split)
        for n in whole:
            mine = [s for s in split if s.startswith(n + ".h")]
            assert _positions(ind, mine) == _positions(shared, [n])
    assert len(ind.groups) > len(shared.groups)
    # float64 oracle, three permutations (Llama's rotary tables are float32 by design)
    for seed in range(3):
        assert ind.verify(model, x, generator=torch.Generator().manual_seed(seed), draws=1) < 1e-4
    ind.lint()


def test_inverse_and_compose_of_nested_groups() -> None:
    model = _net()
    spec = permgraph.infer(model, X, heads="independent")
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    p, q = spec.derangement(gen), spec.derangement(gen)  # every group moves, heads too
    back = spec.apply(spec.inverse(p), spec.apply(p, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    two, one = spec.apply(q, spec.apply(p, sd)), spec.apply(spec.compose(p, q), sd)
    assert all(torch.equal(two[k], one[k]) for k in sd)
    # group by group inversion is wrong for groups that do not commute: the test can fail
    naive = spec.apply({k: torch.argsort(v) for k, v in p.items()}, spec.apply(p, sd))
    assert not all(torch.equal(naive[k], sd[k]) for k in sd)


def test_lint_rejects_inner_groups_before_outer_ones() -> None:
    spec = permgraph.infer(_net(), X, heads="independent")
    inner = [g for g in spec.groups if g.name.startswith("1.qk.h")]
    wrong = dataclasses.replace(spec, groups=tuple(inner) + tuple(g for g in spec.groups if g not in inner))
    with pytest.raises(SpecMismatchError, match="neither commute nor nest"):
        wrong.lint()


def test_names_follow_structure_not_state_dict_order() -> None:
    a = permgraph.infer(_net(order="qkvo"), X, heads="independent")
    b = permgraph.infer(_net(order="ovkq"), X, heads="independent")
    assert sorted(a.names) == sorted(b.names)
    assert len(set(a.names)) == len(a.names)
    assert a.names == permgraph.infer(_net(order="qkvo"), X, heads="independent").names


@pytest.mark.filterwarnings("ignore")
def test_roles_in_real_models() -> None:
    gpt2 = permgraph.infer(ZOO["gpt2"].build(), ZOO["gpt2"].inputs())
    assert {"transformer.h.0.attn.heads", "transformer.h.0.attn.qk", "transformer.h.0.attn.v",
            "transformer.h.1.attn.v"} <= set(gpt2.names)
    assert not any("#" in n for n in gpt2.names)


def test_unknown_heads_mode_is_a_clear_error() -> None:
    with pytest.raises(InferArgumentError, match="heads='per-head'.*'shared', 'independent'"):
        permgraph.infer(_net(), X, heads="per-head")
