"""PermSpec: apply / inverse / identity / compose, serialisation, the readable table,
lint on corrupted specs, and verify naming the culprit group of a wrong spec."""

from __future__ import annotations

import dataclasses
import json

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import Layout, Member, PermSpec, SpecMismatchError, VerificationError
from tests.helpers import RunningMean, randomize_norm_stats


class Zoo(nn.Module):
    """One small model with every kind of layout: plain rows, blocks (grouped conv,
    GroupNorm, flatten), repeats (within-group units), offsets (cat), BatchNorm buffers,
    a residual stream, and attention heads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.side = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(12 * 2 * 2, 32)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = h + F.relu(self.gn(self.grouped(h)))
        h = torch.cat([h, F.relu(self.side(x))], 1)
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        t = self.fc(h).view(-1, 2, 16)  # two tokens of 16 features
        B, T, E = t.shape
        q = self.q(t).view(B, T, 4, 4).transpose(1, 2)
        k = self.k(t).view(B, T, 4, 4).transpose(1, 2)
        v = self.v(t).view(B, T, 4, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, E)
        t = self.ln(t + self.o(y))
        return self.head(t)


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    model = randomize_norm_stats(Zoo())
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    spec = permgraph.infer(model, x)
    return model, x, spec


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def test_zoo_spec_has_every_kind_of_layout(zoo):
    _, _, spec = zoo
    layouts = [m.layout for g in spec.groups for m in g.members]
    assert any(lay.block > 1 for lay in layouts)
    assert any(lay.repeats for lay in layouts)
    assert any(lay.offset > 0 for lay in layouts)
    spec.lint()


def test_apply_returns_a_new_dict_and_leaves_the_input_untouched(zoo):
    model, _, spec = zoo
    state = model.state_dict()
    before = _clone(state)
    perm = spec.random_permutation(torch.Generator().manual_seed(1))
    out = spec.apply(perm, state)
    assert out is not state and isinstance(out, dict)
    assert list(out) == list(state)
    assert all(torch.equal(state[k], before[k]) for k in state)
    permuted = {m.key for g in spec.groups for m in g.members}
    assert any(not torch.equal(out[k], state[k]) for k in permuted)
    for k in state.keys() - permuted:  # tensors in no group pass through as they are
        assert torch.equal(out[k], state[k])
    # and the input model still holds its own weights
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_undoes_apply_bit_exactly(zoo, seed):
    model, _, spec = zoo
    state = model.state_dict()
    perm = spec.random_permutation(torch.Generator().manual_seed(seed))
    back = spec.apply(spec.inverse(perm), spec.apply(perm, state))
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    # the inverse really is the inverse: composing gives the identity
    ident = spec.compose(perm, spec.inverse(perm))
    assert all(torch.equal(ident[n], torch.arange(g.size)) for n, g in zip(spec.names, spec.groups))


def test_identity_leaves_the_state_dict_equal(zoo):
    model, _, spec = zoo
    state = model.state_dict()
    out = spec.apply(spec.identity(), state)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert set(spec.identity()) == set(spec.names)


def test_compose_is_apply_one_then_the_other(zoo):
    model, _, spec = zoo
    state = model.state_dict()
    p = spec.random_permutation(torch.Generator().manual_seed(3))
    q = spec.random_permutation(torch.Generator().manual_seed(4))
    once = spec.apply(spec.compose(p, q), state)
    twice = spec.apply(q, spec.apply(p, state))
    assert all(torch.equal(once[k], twice[k]) for k in state)


def test_random_permutation_is_a_seeded_bijection(zoo):
    _, _, spec = zoo
    a = spec.random_permutation(torch.Generator().manual_seed(5))
    b = spec.random_permutation(torch.Generator().manual_seed(5))
    assert set(a) == set(spec.names)
    for g in spec.groups:
        assert a[g.name].dtype == torch.int64
        assert torch.equal(a[g.name].sort().values, torch.arange(g.size))
        assert torch.equal(a[g.name], b[g.name])
    spec.check_permutation(a)


def test_permuted_weights_compute_the_same_function(zoo):
    """apply on a real model: load the permuted weights into a fresh copy and compare."""
    model, x, spec = zoo
    model.eval()
    perm = spec.random_permutation(torch.Generator().manual_seed(6))
    other = Zoo().eval()
    other.load_state_dict(spec.apply(perm, model.state_dict()))
    with torch.no_grad():
        ref, got = model(x), other(x)
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert not torch.equal(other.stem.weight, model.stem.weight)


def test_spec_applies_to_any_state_dict_of_the_architecture(zoo):
    model, x, spec = zoo
    torch.manual_seed(123)
    fresh = randomize_norm_stats(Zoo(), torch.Generator().manual_seed(9))
    assert spec.verify(fresh, x, generator=torch.Generator().manual_seed(0)) < 1e-4


def test_to_dict_json_from_dict_round_trip(zoo):
    _, _, spec = zoo
    data = json.loads(json.dumps(spec.to_dict()))
    back = PermSpec.from_dict(data)
    assert back == spec  # groups (names, sizes, members, layouts, why), unsupported, shapes
    for g, h in zip(spec.groups, back.groups):
        assert (g.name, g.size, g.why) == (h.name, h.size, h.why)
        assert g.members == h.members
        assert all(isinstance(m.layout.repeats, tuple) for m in h.members)
    assert back.fingerprint() == spec.fingerprint()
    assert PermSpec.from_dict(json.loads(spec.to_json())) == spec
    # the rebuilt spec permutes exactly like the original
    state = zoo[0].state_dict()
    perm = spec.random_permutation(torch.Generator().manual_seed(7))
    a, b = spec.apply(perm, state), back.apply(perm, state)
    assert all(torch.equal(a[k], b[k]) for k in state)


class Flip(nn.Module):
    def forward(self, h):
        return torch.flip(h, [-1])


class Flipped(nn.Module):
    """Two hidden layers; the second one's units are flipped by ``mixer`` (blocked)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)
        self.mixer = Flip()

    def forward(self, x):
        return self.c(self.mixer(F.relu(self.b(F.relu(self.a(x))))))


def test_round_trip_keeps_the_blocked_op_report():
    spec = permgraph.infer(Flipped(), torch.randn(3, 4))
    assert spec.unsupported
    back = PermSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.unsupported == spec.unsupported
    assert back == spec


def _row(text: str, name: str, size: int) -> bool:
    return any(line.split()[:2] == [name, str(size)] for line in text.splitlines())


def test_str_shows_groups_sizes_and_the_blocked_op_report():
    spec = permgraph.infer(Flipped(), torch.randn(3, 4))
    text = str(spec)
    assert len(spec.groups) == 1
    g = spec.groups[0]
    assert _row(text, g.name, g.size), text
    assert "a.weight" in text and "b.weight" in text
    assert "why:" in text
    blocked = text[text.index("blocked"):]
    assert "aten.flip" in blocked and "mixer" in blocked and "no rule" in blocked
    # a spec with nothing blocked says so
    clean = permgraph.infer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4))
    assert "blocked ops: none" in str(clean)


def test_str_lists_every_group_with_its_layouts(zoo):
    _, _, spec = zoo
    text = str(spec)
    for g in spec.groups:
        assert _row(text, g.name, g.size), text
    assert "blocks of" in text and "offset" in text


def test_every_group_records_why_it_is_tied(zoo):
    _, _, spec = zoo
    missing = [g.name for g in spec.groups if not g.why]
    assert not missing, f"groups without provenance: {missing}\n{spec}"


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1)),
    nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 2, 1)),
], ids=["group_norm", "grouped_conv"])
def test_refined_groups_record_why_they_are_tied(model):
    """Provenance for groups that are parts of a refined axis (the norm groups of a
    GroupNorm, the groups of a grouped conv): they are tied by the same ops as the axis
    they refine (the conv that produced the channels, the norm that split them)."""
    spec = permgraph.infer(model, torch.randn(2, 3, 6, 6))
    assert len(spec.groups) >= 2
    missing = [g.name for g in spec.groups if not g.why]
    assert not missing, f"groups without provenance: {missing}\n{spec}"


def test_graph_is_annotated_with_groups(zoo):
    _, _, spec = zoo
    assert isinstance(spec.analysis.graph, nx.MultiDiGraph)
    params = {n: d for n, d in spec.analysis.graph.nodes(data=True) if d.get("kind") == "parameter"}
    assert any("stem.weight" in d["keys"] for d in params.values())
    named = {n for _, d in spec.analysis.graph.nodes(data=True) for dims in [d.get("groups", ())] for n in _flat(dims)}
    assert set(spec.names) <= named


def _flat(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, tuple):
        for y in x:
            yield from _flat(y)


# --------------------------------------------------------------------------------------
# lint


def _replace_group(spec: PermSpec, i: int, **changes) -> PermSpec:
    groups = list(spec.groups)
    groups[i] = dataclasses.replace(groups[i], **changes)
    return dataclasses.replace(spec, groups=tuple(groups))


@pytest.fixture(scope="module")
def mlp_spec():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    return permgraph.infer(model, torch.randn(3, 4))


def test_lint_passes_on_inferred_specs(mlp_spec, zoo):
    mlp_spec.lint()
    zoo[2].lint()


def test_lint_catches_a_member_reaching_past_the_axis(mlp_spec):
    g = mlp_spec.groups[0]
    bad = _replace_group(mlp_spec, 0, members=(Member(g.members[0].key, 0, Layout(offset=3)), *g.members[1:]))
    with pytest.raises(SpecMismatchError, match="reaches past"):
        bad.lint()


def test_lint_catches_duplicate_names(mlp_spec):
    bad = _replace_group(mlp_spec, 1, name=mlp_spec.groups[0].name)
    with pytest.raises(SpecMismatchError, match="used 2 times"):
        bad.lint()


def test_lint_catches_unknown_keys_and_axes(mlp_spec):
    g = mlp_spec.groups[0]
    with pytest.raises(SpecMismatchError, match="not in the state_dict"):
        _replace_group(mlp_spec, 0, members=(*g.members, Member("nope.weight", 0))).lint()
    with pytest.raises(SpecMismatchError, match="no axis"):
        _replace_group(mlp_spec, 0, members=(*g.members, Member("0.bias", 1))).lint()


def test_lint_catches_a_member_listed_twice_and_sizes_that_disagree(mlp_spec):
    g = mlp_spec.groups[0]
    with pytest.raises(SpecMismatchError, match="appears twice"):
        _replace_group(mlp_spec, 0, members=(*g.members, g.members[0])).lint()
    with pytest.raises(SpecMismatchError):
        _replace_group(mlp_spec, 0, size=g.size + 1).lint()


def test_lint_catches_overlapping_groups_and_tiny_groups(mlp_spec):
    g0, g1 = mlp_spec.groups[:2]
    # group 1 also claims rows of 0.weight that group 0 permutes
    overlap = _replace_group(mlp_spec, 1, members=(*g1.members, Member("0.weight", 0, Layout())))
    with pytest.raises(SpecMismatchError):
        overlap.lint()
    with pytest.raises(SpecMismatchError, match="unit"):
        _replace_group(mlp_spec, 0, size=1, members=(Member("0.bias", 0),)).lint()
    with pytest.raises(SpecMismatchError, match="no members"):
        _replace_group(mlp_spec, 0, members=()).lint()


def test_lint_reports_every_problem_at_once(mlp_spec):
    g0, g1 = mlp_spec.groups[:2]
    groups = (
        dataclasses.replace(g0, members=(*g0.members, Member("nope", 0))),
        dataclasses.replace(g1, name=g0.name),
    )
    with pytest.raises(SpecMismatchError) as info:
        dataclasses.replace(mlp_spec, groups=groups).lint()
    assert "nope" in str(info.value) and "used 2 times" in str(info.value)


# --------------------------------------------------------------------------------------
# verify on wrong specs


def test_verify_names_the_group_whose_bias_was_forgotten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    spec = permgraph.infer(model, x)
    assert spec.verify(model, x) < 1e-4
    target = next(i for i, g in enumerate(spec.groups) if any(m.key == "2.bias" for m in g.members))
    name = spec.groups[target].name
    members = tuple(m for m in spec.groups[target].members if m.key != "2.bias")
    bad = _replace_group(spec, target, members=members)
    bad.lint()  # structurally fine: only the oracle can tell
    with pytest.raises(VerificationError) as info:
        bad.verify(model, x, generator=torch.Generator().manual_seed(0))
    assert info.value.culprits == (name,)
    assert info.value.error > 1e-4
    assert name in str(info.value) and "2.weight" in str(info.value)


def test_verify_names_the_group_whose_running_var_was_forgotten():
    torch.manual_seed(0)
    model = randomize_norm_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                                               nn.ReLU(), nn.Conv2d(6, 2, 1)))
    x = torch.randn(2, 3, 7, 7)
    spec = permgraph.infer(model, x)
    target = next(i for i, g in enumerate(spec.groups) if any(m.key == "1.running_var" for m in g.members))
    bad = _replace_group(spec, target, members=tuple(m for m in spec.groups[target].members if m.key != "1.running_var"))
    with pytest.raises(VerificationError) as info:
        bad.verify(model, x, generator=torch.Generator().manual_seed(0))
    assert info.value.culprits == (spec.groups[target].name,)


def test_verify_leaves_the_model_and_its_mode_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    spec = permgraph.infer(model, x)
    model.train()
    before = _clone(model.state_dict())
    spec.verify(model, x)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_verify_on_a_model_that_updates_a_buffer_in_forward():
    """The spec is sound (checked by hand below), so verify must pass; and verify must not
    change the model's buffers (its docstring: "the model is not modified")."""

    torch.manual_seed(0)
    model, x = RunningMean(), torch.randn(5, 4)
    spec = permgraph.infer(model, x)
    assert any(m.key == "avg" for g in spec.groups for m in g.members)
    # by hand: the permuted weights, from the same starting state, give the same outputs
    ref, other = RunningMean(), RunningMean()
    ref.load_state_dict(model.state_dict())
    other.load_state_dict(spec.apply(spec.random_permutation(torch.Generator().manual_seed(0)), model.state_dict()))
    with torch.no_grad():
        assert torch.allclose(ref(x), other(x), atol=1e-5)
    before = _clone(model.state_dict())
    spec.verify(model, x, generator=torch.Generator().manual_seed(0))
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "verify changed the model's buffers"


def test_spec_is_plain_data_and_the_analysis_stays_apart():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    a = permgraph.analyze(mlp, torch.randn(3, 4))
    assert isinstance(a, permgraph.Analysis) and a.spec.analysis is a
    assert a.program is a.traced.program and a.unsupported == a.spec.unsupported == ()
    back = permgraph.PermSpec.from_dict(json.loads(a.spec.to_json()))
    assert back == a.spec and back.analysis is None  # the analysis is neither serialised nor compared
    with pytest.warns(DeprecationWarning, match="spec.analysis.graph"):
        assert a.spec.graph is a.graph
    with pytest.warns(DeprecationWarning, match="spec.analysis.traced"):
        assert a.spec.traced is a.traced
    with pytest.warns(DeprecationWarning):
        assert back.graph is None
    with pytest.warns(DeprecationWarning, match="analyze"):  # the old analyze(traced) still answers
        _, unsupported = permgraph.analysis.analyze(a.traced)
    assert list(unsupported) == []
    # verify is a function of (spec, model, inputs); the method is a thin wrapper over it
    x = torch.randn(5, 4)
    assert permgraph.verify(back, mlp, x, perm=back.identity()) == 0.0
    assert back.verify(mlp, x, perm=back.identity()) == 0.0


def test_lint_catches_two_unit_groups_that_overlap_whatever_the_seed():
    """Groups of two units on overlapping positions neither commute nor nest; lint moves
    every unit when it tries them (a random permutation of two units is the identity half
    the time, which would hide the overlap)."""
    for offset in range(2):
        groups = tuple(permgraph.Group(f"g{i}", 2, (Member("w", 0, Layout(offset=i)),)) for i in range(2))
        spec = PermSpec(groups[offset:] + groups[:offset], shapes={"w": (3,)})
        with pytest.raises(SpecMismatchError, match=r"neither commute nor nest"):
            spec.lint()


def test_verify_names_a_malformed_spec_before_running_it():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    spec = permgraph.infer(mlp, torch.randn(3, 4))
    bad = dataclasses.replace(spec, groups=(dataclasses.replace(spec.groups[0], members=(
        *spec.groups[0].members, Member("0.bias", 0, at=((0, 1),)))),))
    with pytest.raises(SpecMismatchError, match=r"0\.bias\[0\].*the axis the member permutes"):
        bad.verify(mlp, torch.randn(3, 4))
