"""Islands: models torch.export cannot trace whole are analysed as their largest submodules
that export, and only groups that are symmetries of the whole model are kept (the oracle runs
the whole model, in float64, with three random permutations)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import permgraph
from permgraph import IslandsWarning, MatchError, MergeError, TraceError, VerificationError
from tests.helpers import permuted_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _infer(model, inputs, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = permgraph.infer(model, inputs, **kw)
    assert any(issubclass(w.category, IslandsWarning) for w in caught), [str(w.message) for w in caught]
    spec.lint()
    return spec


def _sound(spec, model, inputs, seed: int = 1) -> float:
    """The oracle in float64 on a double copy of the model, three random permutations."""
    import copy

    m64 = copy.deepcopy(model).double()
    x64 = torch.utils._pytree.tree_map(lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v,
                                       inputs)
    return spec.verify(m64, x64, draws=3, rtol=1e-9, generator=torch.Generator().manual_seed(seed))


def _mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Selects(nn.Module):
    """Data-dependent selection between two MLPs: rows whose features sum to more than zero."""

    def __init__(self, read_outside: bool = False) -> None:
        super().__init__()
        self.a, self.b = _mlp(4, 16, 8), _mlp(8, 12, 3)
        self.read_outside = read_outside

    def forward(self, x):
        h = self.a(x)
        if self.read_outside:  # the parent reads a weight of island ``a`` itself
            h = h + (x @ self.a[0].weight.t())[:, :1]
        keep = h[h.sum(-1) > 0]
        if keep.shape[0] == 0:
            keep = h
        return self.b(keep)


def test_data_dependent_top_forward_gets_the_islands_groups() -> None:
    model, x = Selects().eval(), torch.randn(6, 4)
    with pytest.raises(TraceError):
        permgraph.infer(model, x, islands=False)
    spec = _infer(model, x)
    assert sorted((g.name, g.size) for g in spec.groups) == [("a.0", 16), ("b.0", 12)]
    assert spec.analysis is None
    assert set(spec.shapes) == set(model.state_dict())
    assert permuted_rows(spec, "a.0.weight", 0) == 16 and permuted_rows(spec, "b.0.weight", 0) == 12
    assert permuted_rows(spec, "a.2.weight", 0) == 0  # an island's output is blocked
    assert any(u.module == "" and "could not trace" in u.reason for u in spec.unsupported)
    assert _sound(spec, model, x) < 1e-9
    # negative control: a group permuted in one member only must fail the oracle
    g = spec["a.0"]
    broken = dataclasses.replace(spec, groups=(dataclasses.replace(g, members=g.members[:1]),))
    with pytest.raises(VerificationError):
        broken.verify(model.double(), x.double(), generator=torch.Generator().manual_seed(0))


def test_parameter_read_outside_its_island_drops_its_groups() -> None:
    x = torch.randn(6, 4)
    clean = _infer(Selects().eval(), x)
    model = Selects(read_outside=True).eval()
    spec = _infer(model, x)
    assert [g.name for g in spec.groups] == ["b.0"]  # a.0 permutes a.0.weight, which the parent reads
    assert any("a.0.weight" in u.reason and "outside" in u.reason for u in spec.unsupported)
    assert _sound(spec, model, x) < 1e-9
    # the dropped group really is no symmetry of this model
    with pytest.raises(VerificationError) as info:
        dataclasses.replace(clean, groups=(clean["a.0"],)).verify(model.double(), x.double(),
                                                                 generator=torch.Generator().manual_seed(0))
    assert info.value.culprits == ("a.0",)


class Tied(nn.Module):
    """Island ``c`` holds the same weight as island ``a``'s first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = _mlp(4, 16, 8), nn.Linear(4, 16)
        self.c.weight = self.a[0].weight
        self.b = _mlp(24, 10, 3)

    def forward(self, x):
        h = torch.cat([self.a(x), self.c(x)[:, :16]], -1)
        if h.sum() > 0:
            h = -h
        return self.b(h)


def test_weight_tied_across_islands_drops_its_groups() -> None:
    model, x = Tied().eval(), torch.randn(5, 4)
    spec = _infer(model, x)
    assert [g.name for g in spec.groups] == ["b.0"]
    assert _sound(spec, model, x) < 1e-9


class ShapeDependent(nn.Module):
    """Its hidden units are a group for a batch of 2, not for larger batches (where a slice of
    them reaches the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        y = self.l2(h)
        return y + h[:, :6] if x.shape[0] > 2 else y


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = ShapeDependent(), _mlp(6, 9, 6)

    def forward(self, x):
        a, b = self.f(x), self.f(x[:2])  # f on two shapes
        c, d = self.g(x), self.g(x[:3].unsqueeze(0))  # g on two shapes, one symmetry
        y = a.sum() + b.sum() + c.sum() + d.sum()
        return y if y > 0 else -y


def test_shared_module_called_on_two_shapes_keeps_groups_that_hold_on_both() -> None:
    model, x = Shared().eval(), torch.randn(4, 6)
    alone = permgraph.infer(ShapeDependent(), x[:2])
    assert [g.name for g in alone.groups] == ["l1"]  # on a batch of 2 alone, l1 is a group
    spec = _infer(model, x)
    assert [g.name for g in spec.groups] == ["g.0"]
    assert any("distinct signatures" in u.reason for u in spec.unsupported)
    assert _sound(spec, model, x) < 1e-9
    renamed = permgraph.PermSpec(tuple(dataclasses.replace(g, name="f." + g.name, members=tuple(
        dataclasses.replace(m, key="f." + m.key) for m in g.members)) for g in alone.groups), (), spec.shapes)
    with pytest.raises(VerificationError):
        renamed.verify(model.double(), x.double(), generator=torch.Generator().manual_seed(0))


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        y = self.body(x)
        return y if y.sum() > 0 else -y


def test_train_mode_is_restored_and_buffers_untouched() -> None:
    model, x = Normed().train(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = _infer(model, x)
    assert model.training and model.body[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [(g.name, g.size) for g in spec.groups] == [("body.0", 8)]
    model.eval()
    assert _sound(spec, model, x) < 1e-9


def test_islanded_spec_matches_applies_and_refuses_what_needs_a_trace() -> None:
    x = torch.randn(6, 4)
    a, b = Selects().eval(), Selects().eval()
    spec = _infer(a, x)
    perm = spec.random_permutation(torch.Generator().manual_seed(0))
    permuted = spec.apply(perm, b.state_dict())
    found = permgraph.weight_matching(spec, permuted, b.state_dict())
    assert all(torch.equal(found[n], perm[n]) for n in spec.names)  # B permuted to match A
    assert permgraph.PermSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(MatchError, match="traced graph"):
        permgraph.activation_matching(spec, a, b, [x])
    with pytest.raises(MergeError, match="graph"):
        permgraph.repair(a, b, a, [x], spec, 0.5)


def test_model_that_does_not_run_keeps_its_trace_error() -> None:
    with pytest.raises(TraceError, match="fails when called"):
        permgraph.infer(Selects(), torch.randn(6, 5))


# -- real detection models (each: one infer, one float64 oracle; tens of seconds) ------------

@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn"])
def test_detector_gets_sound_groups(name: str) -> None:
    pytest.importorskip("torchvision")
    from permgraph.testing import ISLAND_ZOO, randomize_norm_stats

    entry = ISLAND_ZOO[name]
    model = randomize_norm_stats(entry.build(), torch.Generator().manual_seed(0)).eval()
    x = entry.inputs()
    spec = _infer(model, x)
    assert len(spec.groups) >= entry.floor, spec
    assert any(g.members[0].key.startswith("backbone.") for g in spec.groups)
    assert any(g.members[0].key.startswith(("rpn.", "roi_heads.", "head.")) for g in spec.groups)
    assert set(spec.shapes) == set(model.state_dict())
    with torch.no_grad():
        out = model(*x)
    assert sum(t.numel() for t in out[0].values()) > 0  # the oracle compares real detections
    assert _sound(spec, model, x) < 1e-9


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_islands_without_groups_keep_the_trace_error_with_a_note() -> None:
    with pytest.raises(TraceError, match="runs on these inputs") as info:
        permgraph.infer(OneLinear(), torch.randn(2, 4))
    assert any("islands: fc" in n for n in getattr(info.value, "__notes__", ()))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 10), nn.Linear(10, 3)

    def forward(self, x, mask=None):
        h = torch.relu(self.l1(x))
        return self.l2(h if mask is None else h * mask)


class CallsWithKeywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = Masked()

    def forward(self, x):
        y = self.k(x, mask=(x[:, :1] > 0).to(x.dtype))
        return y if y.sum() > 0 else -y


def test_island_called_with_keyword_arguments() -> None:
    model, x = CallsWithKeywords().eval(), torch.randn(5, 4)
    spec = _infer(model, x)
    assert [(g.name, g.size) for g in spec.groups] == [("k.l1", 10)]
    assert {m.key for m in spec["k.l1"].members} == {"k.l1.weight", "k.l1.bias", "k.l2.weight"}
    assert _sound(spec, model, x) < 1e-9
