"""The oracle and the engine around it: ``lookup`` never crashes, traced graphs are
functional, ``verify`` cannot be fooled (derangements, several draws, NaN by position,
element-wise tolerance), never blames a group for float32 rounding, leaves the model as it
was, and nothing is lost silently (layout conflicts and pinning constants are reported;
``apply`` keeps metadata and extra state)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import PermGraphError, VerificationError
from permgraph.errors import OracleArgumentError, RoundingWarning
from permgraph.rules import REGISTRY, lookup
from tests.helpers import M, assert_sound, assert_structure, group_with, permuted_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def _drop(spec: permgraph.PermSpec, name: str, key: str) -> permgraph.PermSpec:
    """The spec with ``key`` left out of group ``name``: structurally fine, but unsound."""
    groups = tuple(
        dataclasses.replace(g, members=tuple(m for m in g.members if m.key != key)) if g.name == name else g
        for g in spec.groups
    )
    return dataclasses.replace(spec, groups=groups)


def _outputs_equal_after(spec, model, x, perm, atol=1e-5):
    """An oracle independent of ``verify``: load the permuted weights into a copy."""
    other = copy.deepcopy(model)
    other.load_state_dict(spec.apply(perm, model.state_dict()))
    with torch.no_grad():
        return torch.allclose(model(x), other(x), atol=atol, rtol=1e-4)


# --------------------------------------------------------------------------------------
# lookup and functional graphs


def test_lookup_never_raises_on_any_aten_overload():
    seen = 0
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            fn = lookup(getattr(packet, overload))
            assert fn is None or callable(fn)
            seen += 1
    assert seen > 1000


@pytest.mark.parametrize("target", [
    torch.ops.aten.multiply_.Tensor, torch.ops.aten.divide_.Tensor, torch.ops.aten.subtract_.Tensor,
    torch.ops.aten.index_fill_.int_Scalar, torch.ops.aten.scatter_.src, torch.ops.aten.xlogy_.Tensor,
    torch.ops.aten.greater_.Tensor, torch.ops.aten.bitwise_and_.Tensor, torch.ops.aten.add_.Tensor,
    torch.ops.aten.relu_.default,
])
def test_in_place_ops_have_no_rule(target):
    """An op that writes into an argument is never guessed to be its functional twin."""
    assert lookup(target) is None


@pytest.mark.parametrize("target", [None, object(), "aten.linear", 3, torch.ops.higher_order.cond, print])
def test_lookup_of_odd_targets_is_none(target):
    assert lookup(target) is None


class InPlace(nn.Module):
    """A forward full of in-place ops on a hidden layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h.multiply_(2.0).subtract_(0.5).divide_(1.5)
        h.relu_()
        h.index_fill_(0, torch.tensor([0]), 1.0)  # fills a row (batch dim): channels keep their order
        return self.b(h)


def test_traced_graph_is_functional():
    spec = assert_sound(InPlace(), _x(5, 4))
    mutable = [n for n in spec.analysis.traced.graph_module.graph.nodes
               if n.op == "call_function" and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]
    assert mutable == []
    assert_structure(spec, [(8, {M("a.weight", 0), M("a.bias", 0), M("b.weight", 1)})])


class ReadsBeforeAndThroughAView(nn.Module):
    """In-place writes whose meaning depends on aliasing: a value read before the write,
    a view taken before the write (it sees the write), and a write into a slice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        before = self.b(h)  # reads h before the write
        v = h.view(-1, 2, 4)  # a view: sees the write below
        h.mul_(2.0)
        h[:, :4] += 1.0  # a write into a slice of h
        return before + self.c(v.reshape(-1, 8))


@pytest.mark.parametrize("model", [InPlace, ReadsBeforeAndThroughAView])
def test_in_place_writes_keep_their_meaning_in_the_functional_graph(model):
    model, x = model(), _x(5, 4)
    spec = assert_sound(model, x, min_groups=0)
    gm = spec.analysis.traced.graph_module
    assert not any(getattr(getattr(n.target, "_schema", None), "is_mutable", False) for n in gm.graph.nodes)
    # the functional graph computes what the model computes
    with torch.no_grad():
        torch.testing.assert_close(spec.analysis.traced.program.module()(x), model(x))


_IN_PLACE = {  # name -> (op on the hidden layer, whether the hidden units stay permutable)
    "multiply_": (lambda h: h.multiply_(2.0), True),
    "divide_": (lambda h: h.divide_(3.0), True),
    "subtract_": (lambda h: h.subtract_(h.mean(0, keepdim=True)), True),
    "xlogy_": (lambda h: h.abs().xlogy_(2.0), True),
    "gt_": (lambda h: h.gt_(0.1), True),
    "not_equal_": (lambda h: h.not_equal_(0.0), True),
    "bitwise_and_": (lambda h: (h * 10).long().bitwise_and_(7).float(), True),
    "masked_fill_": (lambda h: h.masked_fill_(h > 0.5, 0.0), True),
    "addcmul_": (lambda h: h.addcmul_(h, h, value=0.1), True),
    "copy_": (lambda h: h.copy_(h * 2), True),
    "t_": (lambda h: h.t_().t_(), True),
    "index_fill_": (lambda h: h.index_fill_(1, torch.tensor([1]), 0.0), False),
    "scatter_": (lambda h: h.scatter_(1, torch.zeros(5, 1, dtype=torch.long), 1.0), False),
    "index_put_": (lambda h: h.index_put_((torch.arange(5), torch.tensor([0, 2, 1, 0, 3])), torch.tensor(1.0)), False),
}


@pytest.mark.parametrize("name", list(_IN_PLACE))
def test_in_place_ops_on_hidden_units_are_sound_and_never_crash(name):
    fn, permutable = _IN_PLACE[name]
    spec = assert_sound(Around(fn), _x(5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight") == (8 if permutable else 0)
    if not permutable:  # blocked where the op picks positions, and the blocked axis says why
        from permgraph.analysis import block_reasons

        reasons = block_reasons(spec.analysis.traced)
        hidden = [n.name for n in spec.analysis.traced.graph_module.graph.nodes if n.op == "call_function"
                  and any(r and ("index" in r or "scatter" in r) for dims in reasons.get(n.name, ()) for r in dims)]
        assert hidden, reasons


def test_buffer_updated_in_forward_is_a_mutation_output():
    from tests.helpers import RunningMean

    spec = assert_sound(RunningMean(), _x(5, 4))
    assert list(spec.analysis.traced.mutations.values()) == ["b_avg"]
    assert any(m.key == "avg" for g in spec.groups for m in g.members)


# --------------------------------------------------------------------------------------
# rules: einsum letters, strided slices, constant padding, random ops


class Outer(nn.Module):
    def __init__(self, eq: str):
        super().__init__()
        self.eq = eq
        self.p, self.q, self.o = nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(20, 2)

    def forward(self, x):
        y = torch.einsum(self.eq, self.p(x), self.q(x[0]))
        return self.o(y.flatten(-2))


@pytest.mark.parametrize("eq", ["...B,A->...BA", "...A,B->...AB", "...a,b->...ab", "...C,A->...CA"])
def test_einsum_ellipsis_never_reuses_a_letter_of_the_equation(eq):
    model, x = Outer(eq), _x(2, 3)
    spec = assert_sound(model, x, min_groups=2)
    assert sorted(g.size for g in spec.groups) == [4, 5]
    for seed in range(3):
        assert _outputs_equal_after(spec, model, x, spec.random_permutation(torch.Generator().manual_seed(seed)))


class Around(nn.Module):
    def __init__(self, fn, h: int = 8, h2: int | None = None):
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Linear(4, h), nn.Linear(h2 or h, 3)

    def forward(self, x):
        return self.b(self.fn(F.relu(self.a(x))))


@pytest.mark.parametrize("start, step, h, h2, size, block", [
    (1, 2, 8, 4, 4, 2),  # units 1, 3, 5, 7
    (3, 4, 8, 2, 2, 4),  # units 3, 7
    (2, 3, 9, 3, 3, 3),  # units 2, 5, 8
    (1, 3, 10, 3, 3, 3),  # units 1, 4, 7 of 10: runs of 3 from 0, the last unit outside
])
def test_strided_slice_with_any_start_keeps_runs_as_a_group(start, step, h, h2, size, block):
    spec = assert_sound(Around(lambda t: t[:, start::step], h=h, h2=h2), _x(5, 4))
    g = group_with(spec, "b.weight", 1)
    assert g.size == size
    # every pick moves with the run of `step` units around it; the runs hold every pick
    (lay,) = [m.layout for m in g.members if m.key == "a.weight"]
    assert lay.block == block and lay.repeats == ()
    assert start in range(lay.offset, lay.offset + block) and lay.span(size) <= h


def test_strided_slice_that_cannot_be_runs_blocks():
    spec = assert_sound(Around(lambda t: t[:, ::2], h=7, h2=4), _x(5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight") == 0


def test_constant_padding_of_the_channel_axis_keeps_its_group():
    spec = assert_sound(Around(lambda t: F.pad(t, (2, 1), value=0.5), h2=11), _x(5, 4))
    assert_structure(spec, [(8, {M("a.weight", 0), M("a.bias", 0), M("b.weight", 1, offset=2)})])


def test_negative_padding_crops_like_a_slice():
    spec = assert_sound(Around(lambda t: F.pad(t, (-1, -2)), h2=5), _x(5, 4))
    assert group_with(spec, "b.weight", 1).size == 5


def test_constant_padding_of_conv_channels_keeps_them():
    class PadChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(F.pad(F.relu(self.a(x)), (1, 1, 0, 0, 1, 1)))  # width and channels

    spec = assert_sound(PadChannels(), _x(2, 3, 5, 5))
    assert permuted_rows(spec, "a.weight") == 6


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_copying_padding_of_the_channel_axis_blocks(mode):
    fn = lambda t: F.pad(t[:, None], (1, 1), mode=mode)[:, 0]  # noqa: E731
    spec = assert_sound(Around(fn, h2=10), _x(5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight") == 0


class Noisy(nn.Module):
    def __init__(self, noise):
        super().__init__()
        self.noise = noise
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(self.noise(F.relu(self.a(x))))))


@pytest.mark.parametrize("noise", [
    lambda h: F.dropout(h, 0.5, training=True),
    lambda h: h + torch.randn_like(h),
    lambda h: h * torch.bernoulli(torch.full_like(h, 0.5)),
    lambda h: F.rrelu(h - 0.5, training=True),
    lambda h: F.alpha_dropout(h, 0.3, training=True),
], ids=["dropout", "randn_like", "bernoulli", "rrelu", "alpha_dropout"])
def test_random_ops_fix_what_they_draw_for_and_are_reported(noise):
    """One policy: a draw is made by position, so the units it is drawn for stay put; the
    next layer's units stay free; the seeded oracle agrees (it passes, and permuting the
    drawn-for units anyway fails)."""
    model, x = Noisy(noise), _x(5, 4)
    spec = assert_sound(model, x)
    assert permuted_rows(spec, "a.weight") == 0
    assert group_with(spec, "b.weight", 0).size == 6
    assert spec.unsupported and "random" in " ".join(u.reason for u in spec.unsupported)
    # the policy is not over-cautious: moving the drawn-for units really changes the outputs
    guess = dataclasses.replace(spec, groups=spec.groups + (
        permgraph.Group("a", 8, (permgraph.Member("a.weight", 0), permgraph.Member("a.bias", 0),
                                  permgraph.Member("b.weight", 1))),))
    with pytest.raises(VerificationError) as info:
        guess.verify(model, x)
    assert info.value.culprits == ("a",)


@pytest.mark.parametrize("noise", [
    nn.Dropout(0.5), lambda h: F.dropout(h, 0.5, training=False), lambda h: F.dropout(h, 0.0, training=True),
    lambda h: F.rrelu(h, training=False),
], ids=["Dropout-eval", "dropout-off", "dropout-p0", "rrelu-eval"])
def test_random_ops_that_do_not_draw_are_element_wise(noise):
    spec = assert_sound(Noisy(noise), _x(5, 4), min_groups=2)
    assert group_with(spec, "a.weight", 0).size == 8


# --------------------------------------------------------------------------------------
# the oracle cannot be fooled


class TwoUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(2, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_wrong_group_of_two_fails_for_every_seed():
    """A uniform draw leaves a 2-unit group in place half the time; the derangement drawn
    first never does."""
    model, x = TwoUnits(), _x(5, 4)
    spec = permgraph.infer(model, x)
    bad = _drop(spec, "a", "a.bias")
    for seed in range(20):
        with pytest.raises(VerificationError):
            bad.verify(model, x, generator=torch.Generator().manual_seed(seed))


def test_derangement_moves_every_unit_of_every_group():
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 1))
    spec = permgraph.infer(model, _x(3, 4))
    for seed in range(10):
        perm = spec.derangement(torch.Generator().manual_seed(seed))
        spec.check_permutation(perm)
        assert all(bool((p != torch.arange(len(p))).all()) for p in perm.values())


class NaNOut(nn.Module):
    """Returns NaN at fixed positions (a masked-out entry), real values elsewhere."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("mask", torch.tensor([1.0, float("nan"), 1.0]))

    def forward(self, x):
        return self.b(F.relu(self.a(x))) * self.mask


def test_nan_at_the_same_positions_passes_and_does_not_hide_a_wrong_group():
    model, x = NaNOut(), _x(5, 4)
    spec = permgraph.infer(model, x)
    assert spec.verify(model, x) <= 1e-4
    with pytest.raises(VerificationError) as info:
        _drop(spec, "a", "a.bias").verify(model, x)
    assert info.value.culprits == ("a",)


def test_a_nan_where_the_reference_has_none_fails():
    class NaNIfMoved(nn.Module):  # NaN appears only when unit 0 of the hidden layer moves
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            with torch.no_grad():
                self.a.bias[0] = 50.0

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + torch.log(h[:, :1] - 40.0)  # not equivariant: unit 0 is special

    model, x = NaNIfMoved(), _x(5, 4)
    fake = permgraph.PermSpec(
        (permgraph.Group("a", 8, (permgraph.Member("a.weight", 0), permgraph.Member("a.bias", 0),
                                   permgraph.Member("b.weight", 1))),),
        shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
    )
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    with pytest.raises(VerificationError):
        fake.verify(model, x)


def test_tolerance_is_element_wise_so_small_outputs_count():
    """One output tensor holds a huge and a small part; a wrong group changes only the small
    part: a max-scaled error would call that 1e-9 and pass it."""

    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return torch.cat([1e7 * self.b(F.relu(self.a(x))), self.d(F.relu(self.c(x)))], 1)

    model, x = Scales(), _x(5, 4)
    spec = permgraph.infer(model, x)
    assert spec.verify(model, x) <= 1e-4
    with pytest.raises(VerificationError) as info:
        _drop(spec, "c", "c.bias").verify(model, x)
    assert info.value.culprits == ("c",)


def test_atol_and_rtol_follow_assert_close():
    model, x = TwoUnits(), _x(5, 4)
    spec = permgraph.infer(model, x)
    bad = _drop(spec, "a", "a.bias")
    with pytest.raises(VerificationError):
        bad.verify(model, x)
    assert bad.verify(model, x, atol=1e3) <= 1e-4  # a huge absolute tolerance passes anything finite
    for kw in ({"rtol": 0.0}, {"rtol": -1.0}, {"atol": -1.0}, {"draws": 0}):
        with pytest.raises(OracleArgumentError):
            spec.verify(model, x, **kw)


class Cancel(nn.Module):
    """Sound, but each output is a small difference of large terms: reordering the hidden
    units reorders the sums, and float32 rounding then changes the outputs by O(1)."""

    def __init__(self, n: int = 32):
        super().__init__()
        self.a, self.b = nn.Linear(4, n), nn.Linear(n, 3)
        with torch.no_grad():
            w = torch.randn(n // 2, 4) * 1e4
            self.a.weight.copy_(torch.cat([w, -w * (1 + 1e-6)]))
            self.a.bias.zero_()
            c = torch.randn(3, n // 2)
            self.b.weight.copy_(torch.cat([c, c], 1))
            self.b.bias.zero_()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) - torch.relu(-self.a(x)))


def test_float32_rounding_is_reported_as_such_not_blamed_on_a_group():
    model, x = Cancel(), _x(5, 4)
    spec = permgraph.infer(model, x)
    with pytest.raises(VerificationError):  # float32 alone does blame the (sound) group
        spec.verify(model, x, float64=False)
    with pytest.warns(RoundingWarning, match="float64"):
        err = spec.verify(model, x)
    assert err <= 1e-4
    assert next(model.parameters()).dtype == torch.float32 and torch.get_default_dtype() == torch.float32


def test_a_wrong_group_still_fails_in_float64_and_bisection_names_it():
    model, x = Cancel(), _x(5, 4)
    spec = permgraph.infer(model, x)
    bad = _drop(spec, "a", "b.weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoundingWarning)
        with pytest.raises(VerificationError, match="in float64 too") as info:
            bad.verify(model, x)
    assert info.value.culprits == ("a",)


# --------------------------------------------------------------------------------------
# the model is left as it was


class Tracks(nn.Module):
    """Updates a non-persistent buffer in forward and reads it back; a submodule is kept in
    another mode than the root."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.calls += 1
        return self.b(F.relu(self.bn(self.a(x)))) + self.calls


def test_verify_restores_every_buffer_and_every_mode():
    model, x = Tracks(), _x(5, 4)
    spec = permgraph.infer(model, x)
    model.train()
    model.bn.eval()
    before = {k: v.clone() for k, v in list(model.named_buffers()) + list(model.named_parameters())}
    spec.verify(model, x)
    after = dict(list(model.named_buffers()) + list(model.named_parameters()))
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.training and model.a.training and not model.bn.training
    permgraph.infer(model, x)  # tracing restores every submodule's mode too
    assert model.training and not model.bn.training


class Caches(nn.Module):
    """Caches a tensor derived from its weights in eval mode and drops it in ``train()``,
    as timm's LeViT does with its attention biases."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.cache = {}
        return self

    def scale(self) -> torch.Tensor:
        if self.training:
            return self.a.bias * 2
        if "s" not in self.cache:
            self.cache["s"] = self.a.bias * 2
        return self.cache["s"]

    def forward(self, x):
        return self.b(F.relu(F.linear(x, self.a.weight) + self.scale()))


@pytest.mark.filterwarnings("ignore:The tensor attribute")  # torch.export notes the cache it sees filled
def test_a_module_caching_derived_weights_verifies_and_is_left_clean():
    model, x = Caches().eval(), _x(5, 4)
    spec = permgraph.infer(model, x)
    assert spec.verify(model, x) <= 1e-4
    assert model.cache == {}  # nothing derived from the permuted copies is left behind
    with pytest.raises(VerificationError):
        _drop(spec, "a", "a.bias").verify(model, x)
    assert model.cache == {}


class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.note = {"version": 3}

    def get_extra_state(self):
        return self.note

    def set_extra_state(self, state):
        self.note = state

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_extra_state_passes_through_verify_and_apply():
    model, x = WithExtraState(), _x(5, 4)
    spec = assert_sound(model, x)
    state = model.state_dict()
    assert "_extra_state" in state
    out = spec.apply(spec.random_permutation(), state)
    assert out["_extra_state"] == {"version": 3}
    model.load_state_dict(out)
    with pytest.raises(permgraph.SpecMismatchError, match="unexpected"):
        spec.apply(spec.identity(), {**state, "stray": torch.zeros(2)})


def test_apply_keeps_the_state_dict_metadata():
    model, x = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), _x(5, 4)
    spec = permgraph.infer(model, x)
    state = model.state_dict()
    out = spec.apply(spec.random_permutation(), state)
    assert out._metadata == state._metadata and out._metadata is not state._metadata
    assert list(out) == list(state)


def test_mnasnet_loads_its_own_permuted_weights():
    """MNASNet's ``_load_from_state_dict`` reads the version from ``_metadata``."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mnasnet0_5(weights=None).eval()
    x = _x(1, 3, 32, 32)
    spec = permgraph.infer(model, x)
    permuted = spec.apply(spec.random_permutation(torch.Generator().manual_seed(0)), model.state_dict())
    other = torchvision.models.mnasnet0_5(weights=None).eval()
    other.load_state_dict(permuted)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# nothing blocked silently


class GroupMismatch(nn.Module):
    """A conv in 4 groups feeding a GroupNorm in 3 groups: 12 channels split as 4 x 3 and
    3 x 4, which no permutation of channels can respect both ways except by staying put."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 12, 3, groups=4, padding=1)
        self.gn = nn.GroupNorm(3, 12)
        self.b = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


def test_a_layout_conflict_is_reported_with_op_and_module():
    spec = assert_sound(GroupMismatch(), _x(2, 4, 5, 5), min_groups=0)
    hits = [u for u in spec.unsupported if "layout conflict" in u.reason]
    assert hits and {u.module for u in hits} <= {"a", "gn"}, spec.unsupported
    assert "blocked ops: none" not in str(spec)


def test_a_conflict_on_axes_that_hold_no_weights_is_not_reported():
    spec = assert_sound(Around(lambda h: h.repeat_interleave(3, dim=0)[:5]), _x(5, 4))
    assert not spec.unsupported


def test_a_non_persistent_buffer_that_pins_channels_is_reported():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.register_buffer("scale", torch.linspace(0.5, 2.0, 8), persistent=False)

        def forward(self, x):
            return self.b(F.relu(self.a(x)) * self.scale)

    spec = assert_sound(Scaled(), _x(5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight") == 0
    assert any("scale" in u.reason and "state_dict" in u.reason for u in spec.unsupported), spec.unsupported


def test_errors_are_permgraph_errors():
    assert issubclass(OracleArgumentError, PermGraphError) and issubclass(OracleArgumentError, ValueError)
    assert "<random>" in REGISTRY and "<pointwise>" in REGISTRY
