"""Mixture-of-experts: routing ops have rules, the experts' hidden units are groups, sound.

Hand-written MoE modules (a router, top-k, experts as separate modules, three ways to send
tokens to experts and back) and tiny Hugging Face MoE families with random init, checked by
the oracle in float64 with three random permutations. The Hugging Face routers take their
softmax in float32 (``softmax(..., dtype=torch.float)``), so a permutation of the residual
stream, which reorders the router's dot products, shows as float32 rounding (~1e-6) even in
a float64 model; a wrong group shows as an error of order one.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import VerificationError
from permgraph.spec import Layout, Member


class ToyMoE(nn.Module):
    """Router Linear -> softmax -> top-k; experts are Linear-ReLU-Linear modules."""

    def __init__(self, dispatch: str, d: int = 16, hidden: int = 24, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.dispatch, self.k, self.n = dispatch, k, experts
        self.inp = nn.Linear(d, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)) for _ in range(experts)
        )
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        w, idx = self.router(h).softmax(-1).topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(h)
        if self.dispatch == "index_add":  # sparse: each expert runs on its tokens only
            for e, expert in enumerate(self.experts):
                tok, slot = torch.where(idx == e)
                y = y.index_add(0, tok, expert(h[tok]) * w[tok, slot, None])
        else:  # dense: every expert runs on every token, weighted by its routing score
            if self.dispatch == "scatter":
                scores = torch.zeros(h.shape[0], self.n, dtype=h.dtype).scatter(1, idx, w)
            else:  # one_hot
                scores = (F.one_hot(idx, self.n).to(h.dtype) * w[..., None]).sum(1)
            for e, expert in enumerate(self.experts):
                y = y + scores[:, e : e + 1] * expert(h)
        return self.out(h + y)


def _sound(spec, model, inputs) -> list[float]:
    return [spec.verify(model, inputs, generator=torch.Generator().manual_seed(s)) for s in range(3)]


@pytest.mark.parametrize("dispatch", ["index_add", "scatter", "one_hot"])
def test_toy_moe_gets_one_group_per_expert(dispatch: str) -> None:
    torch.manual_seed(0)
    model = ToyMoE(dispatch).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    spec = permgraph.infer(model, x)
    for e in range(4):  # each expert's hidden units are a group of their own
        g = next(g for g in spec.groups if any(m.key == f"experts.{e}.0.weight" and m.axis == 0 for m in g.members))
        assert g.size == 24
        assert {(m.key, m.axis) for m in g.members} == {
            (f"experts.{e}.0.weight", 0), (f"experts.{e}.0.bias", 0), (f"experts.{e}.2.weight", 1)}
    # the stream: inp's outputs, read by the router and every expert, written back by each
    stream = next(g for g in spec.groups if any(m.key == "inp.weight" for m in g.members))
    assert {(m.key, m.axis) for m in stream.members} >= {("router.weight", 1), ("experts.3.2.weight", 0)}
    assert len(spec.groups) == 5
    # the router's rows are the experts' order: fixed, and its top-k is the one op reported
    assert not any(m.key == "router.weight" and m.axis == 0 for g in spec.groups for m in g.members)
    assert [u.op for u in spec.unsupported] == ["aten.topk.default"]
    assert max(_sound(spec, model, x)) < 1e-12


def test_moving_an_expert_without_its_router_row_is_caught() -> None:
    """The oracle sees a wrong expert group: swapping experts 0 and 1 (all their weights)
    without the router's rows changes the outputs."""
    torch.manual_seed(0)
    model = ToyMoE("index_add").double()
    x = torch.randn(10, 16, dtype=torch.float64)
    sd = model.state_dict()
    swapped = dict(sd)
    for k in sd:
        if k.startswith("experts.0."):
            swapped[k], swapped["experts.1." + k[len("experts.0."):]] = sd["experts.1." + k[len("experts.0."):]], sd[k]
    ref = model(x)
    model.load_state_dict(swapped)
    assert (model(x) - ref).abs().max() > 1e-3


class GroupedExperts(nn.Module):
    """Stacked expert weights applied with ``torch._grouped_mm`` to tokens sorted by expert."""

    def __init__(self, d: int = 8, hidden: int = 16, experts: int = 3) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 2)
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, d, hidden) / d**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, d) / hidden**0.5)
        self.n = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        ids = self.router(h).argmax(-1)
        ids_sorted, order = ids.sort()
        offs = torch.cumsum(torch.histc(ids_sorted.float(), bins=self.n, min=0, max=self.n - 1), 0).int()
        z = torch._grouped_mm(torch.relu(torch._grouped_mm(h[order], self.up, offs=offs)), self.down, offs=offs)
        back = torch.empty_like(order).index_put((order,), torch.arange(order.shape[0]))
        return self.out(h + z[back])


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
def test_grouped_mm_ties_the_contracted_and_output_units() -> None:
    torch.manual_seed(0)
    model = GroupedExperts().bfloat16()  # the kernel (and its export) takes bfloat16
    x = torch.randn(9, 8).bfloat16()
    spec = permgraph.infer(model, x)
    hidden = next(g for g in spec.groups if ("up", 2) in {(m.key, m.axis) for m in g.members})
    assert hidden.size == 16 and {(m.key, m.axis) for m in hidden.members} == {("up", 2), ("down", 1)}
    stream = next(g for g in spec.groups if ("up", 1) in {(m.key, m.axis) for m in g.members})
    assert {("down", 2), ("inp.weight", 0), ("router.weight", 1)} <= {(m.key, m.axis) for m in stream.members}
    assert not any(m.axis == 0 and m.key in ("up", "down") for g in spec.groups for m in g.members)
    assert not any("no rule" in u.reason for u in spec.unsupported)
    assert {u.op for u in spec.unsupported} == {"aten.sort.default"}
    # bfloat16 rounding of reordered sums is ~1e-2; a wrong group is an error of order one
    errs = [spec.verify(model, x, rtol=0.1, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert max(errs) < 0.1


_COMMON = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
# family -> (config class, model class, MoE settings, groups reached; 4 before the routing rules)
_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), 7),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=24,
        decoder_sparse_step=1), 9),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=1, head_dim=8), 7),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2), 7),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), 7),
}


def _hf_moe(family: str, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, dict]:
    """A tiny float64 model of ``family`` (seed 0) and its inputs, its experts run eagerly
    with the loop export traces (the native grouped kernel has no float64)."""
    transformers = pytest.importorskip("transformers")
    moe = pytest.importorskip("transformers.integrations.moe")
    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *a, **k: False)
    cfg_cls, model_cls, kw, _ = _FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**_COMMON, **kw)).double().eval()
    ids = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0)), "use_cache": False}
    return model, ids


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_hf_moe_experts_hidden_units_are_groups(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = _hf_moe(family, monkeypatch)
    floor = _FAMILIES[family][3]
    spec = permgraph.infer(model, ids)
    members = {(m.key, m.axis): g for g in spec.groups for m in g.members}
    stacked = [k for k, v in model.state_dict().items() if v.ndim == 3 and k.endswith("down_proj")]
    assert len(stacked) == 2  # one stacked expert layer per decoder layer
    for key in stacked:  # each expert layer's hidden units: one group, shared by its experts
        g = members[(key, 2)]
        assert g.size == model.state_dict()[key].shape[2]
        assert any(m.key.endswith(("gate_up_proj", "up_proj")) for m in g.members)
        assert (key, 0) not in members  # the experts' order is the router's: fixed
    assert len(spec.groups) >= floor
    # what is still reported: each layer's top-k and sort (their indices name positions)
    # and the rotary frequencies (a non-persistent buffer); no op without a rule
    ops = collections.Counter(u.op for u in spec.unsupported)
    assert ops == {"aten.topk.default": 2, "aten.sort.default": 2, "placeholder": 1}, spec.unsupported
    assert max(_sound(spec, model, ids)) < 1e-4


def test_hf_moe_expert_axis_is_not_a_symmetry_alone() -> None:
    """Negative control on stacked weights: permuting the experts of one layer (their
    weights' axis 0) without the router's rows is caught by the oracle."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg_cls, model_cls, kw, _ = _FAMILIES["mixtral"]
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**_COMMON, **kw)).eval()
    ids = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0)), "use_cache": False}
    spec = permgraph.infer(model, ids)
    keys = [k for k, v in model.state_dict().items() if v.ndim == 3 and k.startswith("model.layers.0.")]
    fake = permgraph.Group("experts", 4, tuple(Member(k, 0, Layout()) for k in keys))
    wrong = dataclasses.replace(spec, groups=(fake,))
    with pytest.raises(VerificationError):
        wrong.verify(model, ids, generator=torch.Generator().manual_seed(0))


class Masked(nn.Module):
    """Boolean masks index as many dims as they have: over (batch, token) the features stay
    free; a fixed mask over (token, feature) pins the features."""

    def __init__(self, over_features: bool) -> None:
        super().__init__()
        self.over_features = over_features
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("mask", torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) > 0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # [2, 5, 6]
        if self.over_features:  # index_put and index with a [5, 6] mask on dims 1 and 2
            h2 = h.clone()
            h2[:, self.mask] = 0.0
            return self.b(h2).sum() + h[:, self.mask].sum()
        m = x[..., 0] > 0  # a [2, 5] mask on dims 0 and 1
        h2 = h.clone()
        h2[m] = 0.0
        return self.b(h2).sum() + self.b(h[m]).sum()


@pytest.mark.parametrize("over_features", [False, True])
def test_boolean_masks_index_all_their_dims(over_features: bool) -> None:
    torch.manual_seed(0)
    model = Masked(over_features).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    spec = permgraph.infer(model, x)
    features = [g for g in spec.groups if any(m.key == "a.weight" and m.axis == 0 for m in g.members)]
    assert len(features) == (0 if over_features else 1)
    assert not spec.unsupported
    assert max(_sound(spec, model, x)) < 1e-12


# -- per-expert units of stacked weights (infer(..., experts="independent")) --------------------


def _grouped_fallback():
    pytest.importorskip("transformers.integrations.moe")  # registers the op
    return torch.ops.transformers.grouped_mm_fallback


class FallbackExperts(nn.Module):
    """Stacked experts in Hugging Face's layout (``up`` ``[E, 2I, H]``: gate rows, then up
    rows; ``down`` ``[E, H, I]``), run with its grouped-mm fallback on tokens sorted by expert,
    in float64. ``mix`` adds one step between the two products: ``"rows"`` adds the rows in
    reverse order (mixing experts; inputs of 12 tokens), ``"mean"`` subtracts the mean over rows, ``"bias"`` adds a
    bias shared by every expert. Each breaks the per-expert symmetry, not the shared one."""

    def __init__(self, mix: str = "", d: int = 8, hidden: int = 6, experts: int = 3) -> None:
        super().__init__()
        self.mix, self.n = mix, experts
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 2)
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, 2 * hidden, d) / d**0.5)
        self.down = nn.Parameter(torch.randn(experts, d, hidden) / hidden**0.5)
        if mix == "bias":
            self.bias = nn.Parameter(torch.randn(hidden))
        self.register_buffer("reverse", torch.arange(11, -1, -1), persistent=False)  # 12 rows, last first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = _grouped_fallback()
        h = self.inp(x)
        ids_sorted, order = self.router(h).argmax(-1).sort()
        offs = torch.cumsum(torch.histc(ids_sorted.double(), bins=self.n, min=0, max=self.n - 1), 0).int()
        gate, up = grouped(h[order], self.up.transpose(-2, -1), offs).chunk(2, dim=-1)
        y = F.silu(gate) * up
        if self.mix == "rows":
            y = y + y[self.reverse]
        elif self.mix == "mean":
            y = y - y.mean(0, keepdim=True)
        elif self.mix == "bias":
            y = y + self.bias
        z = grouped(y, self.down.transpose(-2, -1), offs)
        back = torch.empty_like(order).index_put((order,), torch.arange(order.shape[0]))
        return self.out(h + z[back])


def _experts_input(model: FallbackExperts) -> torch.Tensor:
    """Tokens that reach every expert (the oracle must see each expert's slice at work)."""
    for seed in range(100):
        x = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            if model.router(model.inp(x)).argmax(-1).unique().numel() == model.n:
                return x
    raise AssertionError("no input reaches every expert")


def _per_expert(group: permgraph.Group, n: int, swap_down: bool = False) -> tuple[permgraph.Group, ...]:
    """``group`` split by hand into one group per expert, its stacked members only (a shared
    bias has no expert slice; ``swap_down``: expert 0's and 1's ``down`` slices exchanged, a
    wrong spec)."""
    def at(m: Member, e: int) -> tuple[tuple[int, int], ...]:
        if swap_down and m.key == "down" and e < 2:
            e = 1 - e
        return ((0, e),)
    return tuple(permgraph.Group(f"{group.name}.e{e}", group.size,
                                 tuple(dataclasses.replace(m, at=at(m, e)) for m in group.members if m.key in ("up", "down")))
                 for e in range(n))


def test_stacked_experts_get_one_group_per_expert() -> None:
    torch.manual_seed(0)
    model = FallbackExperts().double()
    x = _experts_input(model)
    shared = permgraph.infer(model, x)
    spec = permgraph.infer(model, x, experts="independent")
    hidden = next(g for g in shared.groups if ("down", 2) in {(m.key, m.axis) for m in g.members})
    assert {(m.key, m.axis, m.layout.offset) for m in hidden.members} == {("up", 1, 0), ("up", 1, 6), ("down", 2, 0)}
    mine = [g for g in spec.groups if any(m.key == "down" and m.axis == 2 for m in g.members)]
    assert [g.name for g in mine] == [f"{hidden.name}.e{e}" for e in range(3)]
    for e, g in enumerate(mine):  # the shared group's members, each in its expert's slice
        assert g.members == tuple(dataclasses.replace(m, at=((0, e),)) for m in hidden.members)
    assert len(spec.groups) == len(shared.groups) + 2
    assert [(g.size, g.members) for g in spec.groups if g not in mine] == [(g.size, g.members) for g in shared.groups if g is not hidden]
    assert max(_sound(spec, model, x)) < 1e-12
    # negative control: two experts' down slices exchanged
    wrong = dataclasses.replace(spec, groups=_per_expert(hidden, 3, swap_down=True))
    with pytest.raises(VerificationError):
        wrong.verify(model, x, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mix", ["rows", "mean", "bias"])
def test_stacked_experts_stay_shared_where_a_step_mixes_them(mix: str) -> None:
    """A step between the two products that mixes rows of different experts (or adds a
    bias all experts share) leaves the hidden units shared; splitting them by hand is caught
    by the oracle, so the split would have been wrong."""
    torch.manual_seed(0)
    model = FallbackExperts(mix).double()
    x = _experts_input(model)
    shared = permgraph.infer(model, x)
    assert permgraph.infer(model, x, experts="independent") == shared
    hidden = next(g for g in shared.groups if ("down", 2) in {(m.key, m.axis) for m in g.members})
    assert max(_sound(shared, model, x)) < 1e-12
    forced = dataclasses.replace(shared, groups=tuple(g for g in shared.groups if g is not hidden) + _per_expert(hidden, 3))
    with pytest.raises(VerificationError):
        forced.verify(model, x, generator=torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_hf_moe_experts_independent(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids = _hf_moe(family, monkeypatch)
    floor = _FAMILIES[family][3]
    shared = permgraph.infer(model, ids)
    spec = permgraph.infer(model, ids, experts="independent")
    sd = model.state_dict()
    stacked = [k for k, v in sd.items() if v.ndim == 3 and k.endswith("down_proj")]
    for key in stacked:  # each expert's hidden units: a group of its own, in its slice
        mine = [g for g in spec.groups if any(m.key == key and m.axis == 2 for m in g.members)]
        assert len(mine) == 4
        assert [{m.at for m in g.members} for g in mine] == [{((0, e),)} for e in range(4)]
    assert len(spec.groups) == len(shared.groups) + 3 * len(stacked) >= floor + 6
    assert max(_sound(spec, model, ids)) < 1e-4
    # negative control: layer 0's experts 0 and 1 swap their down_proj slices
    e0, e1 = (next(g for g in spec.groups if Member(stacked[0], 2, Layout(), ((0, e),)) in g.members) for e in (0, 1))
    swap = {e0.name: e1.name, e1.name: e0.name}
    groups = tuple(dataclasses.replace(g, members=tuple(dataclasses.replace(m, at=((0, 1 - m.at[0][1]),)) if m.key == stacked[0] else m
                                                        for m in g.members)) if g.name in swap else g for g in spec.groups)
    with pytest.raises(VerificationError):
        dataclasses.replace(spec, groups=groups).verify(model, ids, generator=torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore")
def test_weight_matching_recovers_per_expert_permutations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hidden permutation of every group of a tiny Mixtral, each expert its own, is undone
    by weight matching exactly."""
    from permgraph.match import weight_matching

    model, ids = _hf_moe("mixtral", monkeypatch)
    spec = permgraph.infer(model, ids, experts="independent")
    a = model.state_dict()
    hidden = spec.random_permutation(torch.Generator().manual_seed(1))
    b = spec.apply(hidden, a)
    perm = weight_matching(spec, a, b)
    aligned = spec.apply(perm, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    experts = [g.name for g in spec.groups if g.members[0].at]
    assert len(experts) == 8 and any(not torch.equal(hidden[n], torch.arange(len(hidden[n]))) for n in experts)


def fallback_experts() -> FallbackExperts:
    """The CLI's MODULE:CALLABLE for `FallbackExperts` (float64, seed 0)."""
    torch.manual_seed(0)
    return FallbackExperts().double()


def test_cli_aligns_per_expert_groups(tmp_path, capsys) -> None:
    """``--experts independent`` reaches ``infer``: inspect lists one group per expert, and
    align undoes a hidden per-expert permutation of checkpoint files exactly."""
    import json

    from safetensors.torch import load_file, save_file

    from permgraph.cli import main

    target = "tests.test_moe:fallback_experts"
    shape = ["--input-shape", "12,8", "--input-dtype", "float64"]
    arch = ["--model", target, *shape]
    assert main(["inspect", target, *shape]) == 0
    assert ".e0" not in capsys.readouterr().out
    assert main(["inspect", target, *shape, "--experts", "independent"]) == 0
    shown = capsys.readouterr().out
    assert "down[2] (at [0]=2)" in shown and ".e2" in shown
    model = fallback_experts()
    spec = permgraph.infer(model, _experts_input(model), experts="independent")
    a = model.state_dict()
    b = spec.apply(spec.random_permutation(torch.Generator().manual_seed(1)), a)
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    out = tmp_path / "aligned.safetensors"
    assert main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), *arch, "--experts",
                 "independent", "--out", str(out), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["group"] for r in report["groups"]} >= {g.name for g in spec.groups if g.members[0].at}
    aligned = load_file(out)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
