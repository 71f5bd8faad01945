"""Ops that must block, never be guessed.

Each trap sits between two linears (``b(mix(relu(a(x))))``) and acts on the hidden units'
axis in a way that depends on their order. The hidden group must not be reported (the
rows of ``a.weight`` are in no group), ``verify`` still passes, and an op with no rule at
all is listed in ``spec.unsupported`` with its op name and module path.

A control proves each trap is real: the spec of the same network *without* the trap
permutes the hidden units, and applied to the trapped network it breaks the outputs. So
a library that guessed the op was element-wise would be caught.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import VerificationError
from tests.helpers import assert_sound, groups_touching, permuted_rows


class Mix(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


class Around(nn.Module):
    def __init__(self, fn, i: int = 4, h: int = 8, o: int = 3, h2: int | None = None):
        super().__init__()
        self.a = nn.Linear(i, h)
        self.mix = Mix(fn) if not isinstance(fn, nn.Module) else fn
        self.b = nn.Linear(h2 or h, o)

    def forward(self, x):
        return self.b(self.mix(F.relu(self.a(x))))


@torch.library.custom_op("permgraph_tests::channel_mix", mutates_args=())
def channel_mix(x: torch.Tensor) -> torch.Tensor:
    """A custom op no rule knows: a running sum over the last dim."""
    return x.cumsum(-1)


@channel_mix.register_fake
def _(x):
    return torch.empty_like(x)


_IDX = torch.tensor([3, 1, 0, 2, 7, 5, 6, 4])


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


# (name, op applied to the hidden units [N, 8], op name when no rule exists else None)
TRAPS = [
    ("flip", lambda h: torch.flip(h, [-1]), "aten.flip"),
    ("sort indices", lambda h: h * torch.sort(h, dim=-1).indices, "aten.sort"),
    ("topk indices", lambda h: h + torch.topk(h, 8, dim=-1).indices, "aten.topk"),
    ("argsort", lambda h: h * torch.argsort(h, dim=-1), "aten.argsort"),
    ("sorted values", lambda h: h + torch.sort(h, dim=-1).values, None),
    ("gather", lambda h: torch.gather(h, -1, _IDX.expand(h.shape[0], 8)), "aten.gather"),
    ("index tensor", lambda h: h[:, _IDX], None),
    ("index_select", lambda h: torch.index_select(h, 1, _IDX), None),
    ("roll", lambda h: torch.roll(h, 1, dims=-1), None),
    ("cumsum", lambda h: torch.cumsum(h, -1), None),
    ("cummax", lambda h: torch.cummax(h, -1).values, None),
    ("argmax feeds", lambda h: h * torch.argmax(h, -1, keepdim=True).float(), None),
    ("argmax one_hot", lambda h: h + F.one_hot(torch.argmax(h, -1), 8).float(), None),
    ("positional mask", lambda h: h * (torch.arange(8) < 4), None),
    ("diff", lambda h: torch.diff(h, dim=-1, prepend=h[:, :1]), None),
    ("fft", lambda h: torch.fft.fft(h, dim=-1).real, "aten.fft_fft"),
    ("triu of outer", lambda h: torch.triu(h.unsqueeze(-1) * h.unsqueeze(-2)).sum(-1), None),
    ("custom op", lambda h: channel_mix(h), "permgraph_tests.channel_mix"),
]


@pytest.mark.parametrize("name, fn, op", TRAPS, ids=[t[0] for t in TRAPS])
def test_trap_blocks_the_hidden_units(name, fn, op):
    model, x = Around(fn), _x(5, 4)
    spec = assert_sound(model, x, min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0, f"{name}: hidden units reported as permutable\n{spec}"
    assert not groups_touching(spec, "a.bias")
    assert not groups_touching(spec, "b.weight", 1)
    if op is not None:
        hits = [u for u in spec.unsupported if u.op.startswith(op + ".")]
        assert hits, f"{op} missing from the blocked-op report:\n{spec}"
        assert hits[0].module == "mix"
        assert hits[0].reason
        assert op in str(spec) and "mix" in str(spec)


# argmax -> one_hot -> add happens to be equivariant (a permutation moves the one-hot along
# with the units); blocking it is still right, as one_hot's classes are named by values (the
# rule blocks them: a value axis is not modelled), but it is no trap
REAL_TRAPS = [t for t in TRAPS if t[0] != "argmax one_hot"]


@pytest.mark.parametrize("name, fn, op", REAL_TRAPS, ids=[t[0] for t in REAL_TRAPS])
def test_trap_is_real_guessing_would_break_the_model(name, fn, op):
    """The spec of the trap-free network moves the hidden units; on the trapped network
    that permutation changes the outputs."""
    x = _x(5, 4)
    control = Around(nn.Identity())
    control_spec = permgraph.infer(control, x)
    assert permuted_rows(control_spec, "a.weight", 0) == 8
    trapped = Around(fn)
    with pytest.raises(VerificationError):
        control_spec.verify(trapped, x, generator=torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore:The tensor attributes")
def test_lstm_blocks_its_input_and_output_units():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.lstm = nn.LSTM(8, 6, batch_first=True)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.lstm(F.relu(self.a(x)))[0])

    spec = assert_sound(Recurrent(), _x(2, 5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0
    assert not groups_touching(spec, "b.weight", 1)
    assert not any(m.key.startswith("lstm.") for g in spec.groups for m in g.members)
    hits = [u for u in spec.unsupported if u.op.startswith("aten.lstm.")]
    assert hits and hits[0].module == "lstm", spec.unsupported


@pytest.mark.filterwarnings("ignore:The tensor attributes")
def test_gru_and_bilinear_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.bl = nn.Bilinear(8, 8, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            h = F.relu(self.a(x))
            r = self.rnn(h)[0]
            return self.b(F.relu(self.bl(h, r)))

    spec = assert_sound(Net(), _x(2, 5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0
    assert not groups_touching(spec, "b.weight", 1)
    reported = {(u.op.rsplit(".", 1)[0], u.module) for u in spec.unsupported}
    assert {("aten.gru", "rnn"), ("aten.bilinear", "bl")} <= reported


def test_unsupported_op_in_one_branch_leaves_the_rest_permutable():
    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 8), nn.Linear(4, 6)
            self.mix = Mix(lambda h: torch.flip(h, [-1]))
            self.b, self.d = nn.Linear(8, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.mix(F.relu(self.a(x)))) + self.d(F.relu(self.c(x)))

    spec = assert_sound(TwoBranch(), _x(5, 4), min_groups=1)
    assert permuted_rows(spec, "a.weight", 0) == 0
    assert permuted_rows(spec, "c.weight", 0) == 6
    assert [u.module for u in spec.unsupported] == ["mix"]


def test_non_persistent_buffer_pins_the_channels_it_touches():
    """A per-channel buffer outside the state_dict cannot be permuted with the weights."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.register_buffer("gain", torch.randn(8), persistent=False)

        def forward(self, x):
            return self.b(F.relu(self.a(x)) * self.gain)

    spec = assert_sound(Masked(), _x(5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0


def test_plain_tensor_attribute_pins_the_channels_it_touches():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.gain = torch.randn(8)  # not a parameter, not a buffer: a lifted constant

        def forward(self, x):
            return self.b(F.relu(self.a(x)) + self.gain)

    spec = assert_sound(Const(), _x(5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0


def test_tensor_inside_a_returned_object_is_an_output():
    """A forward that returns a plain object (no pytree registration) still has its tensors
    traced and compared as outputs: the hidden units it exposes are pinned."""

    class State:
        def __init__(self, hidden, logits):
            self.hidden, self.logits = hidden, logits

    class Exposes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = F.relu(self.a(x))
            return State(h, self.c(F.relu(self.b(h))))

    spec = assert_sound(Exposes(), _x(5, 4))
    assert permuted_rows(spec, "a.weight", 0) == 0 and permuted_rows(spec, "b.weight", 0) == 6


def test_padding_the_channel_dim_by_copying_blocks_it():
    spec = assert_sound(Around(lambda h: F.pad(h[:, None], (1, 1), mode="replicate")[:, 0], h2=10), _x(5, 4),
                        min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0
    assert not groups_touching(spec, "b.weight", 1)


def test_constant_padding_of_the_channel_dim_keeps_the_channels_and_fixes_the_pads():
    spec = assert_sound(Around(lambda h: F.pad(h, (1, 1)), h2=10), _x(5, 4))
    assert permuted_rows(spec, "a.weight", 0) == 8
    assert permuted_rows(spec, "b.weight", 1) == 8  # columns 0 and 9 read the padding


def test_conv_over_the_channel_axis_blocks_it():
    """Efficient channel attention (ECA-Net) slides a 1-D conv along the channels."""

    class ECA(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = F.relu(self.a(x))
            z = torch.sigmoid(self.eca(h.mean((2, 3)).unsqueeze(1))).squeeze(1)
            return self.b(h * z[:, :, None, None])

    spec = assert_sound(ECA(), _x(2, 3, 6, 6), min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0
    assert not groups_touching(spec, "b.weight", 1)


def test_pixel_shuffle_never_moves_channels_it_mixes_into_space():
    """8 conv channels = 2 output channels x 4 sub-pixels: the sub-pixels go to fixed places in
    space and stay put; only the 2 output channels (blocks of 4 conv channels) move."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.PixelShuffle(2), nn.Conv2d(2, 2, 1))
    spec = assert_sound(model, _x(2, 3, 4, 4))
    touching = groups_touching(spec, "0.weight", 0)
    assert [g.size for g in touching] == [2]
    assert {(m.key, m.layout.block) for m in touching[0].members if m.key.startswith("0.")} == {("0.weight", 4), ("0.bias", 4)}


def test_unbind_and_restack_in_another_order_blocks():
    spec = assert_sound(Around(lambda h: torch.stack(h.unbind(-1)[::-1], -1)), _x(5, 4), min_groups=0)
    assert permuted_rows(spec, "a.weight", 0) == 0


def test_strict_mode_refuses_an_unsupported_op():
    model = Around(lambda h: torch.flip(h, [-1]))
    with pytest.raises(permgraph.UnsupportedOpError) as info:
        permgraph.infer(model, _x(5, 4), strict=True)
    assert "aten.flip" in str(info.value) and "mix" in str(info.value)
