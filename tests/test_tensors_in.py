"""`tensors_in`: every tensor inside a model's output, through pytrees and plain objects alike,
so that models returning objects torch.export cannot flatten still trace and verify."""

from __future__ import annotations

import collections
import dataclasses

import torch
from torch import nn

import permgraph
from permgraph.tracing import tensors_in

a, b, c = torch.randn(2), torch.randn(3), torch.randn(4)


@dataclasses.dataclass
class Out:  # not registered with torch's pytree
    logits: torch.Tensor
    extra: list


class Slotted:
    __slots__ = ("p", "q")

    def __init__(self) -> None:
        self.p, self.q = a, [b, None]


class Dict(dict):
    pass


def ids(ts: list[torch.Tensor]) -> list[int]:
    return [id(t) for t in ts]


def test_containers_objects_and_order() -> None:
    nt = collections.namedtuple("NT", "x y")
    assert ids(tensors_in({"k": [a, (b, {"z": c})], "n": None, "s": "text", "i": 3})) == ids([a, b, c])
    assert ids(tensors_in(nt(a, [b, c]))) == ids([a, b, c])
    assert ids(tensors_in(Out(a, [b, {"c": c}]))) == ids([a, b, c])
    assert ids(tensors_in(Slotted())) == ids([a, b])
    assert ids(tensors_in(Dict(x=a, y=[b]))) == ids([a, b])
    assert ids(tensors_in((a, a))) == ids([a, a])  # a tensor reached twice is listed twice
    assert ids(tensors_in((nn.Linear(2, 2), a))) == ids([a])  # modules are not outputs


def test_a_cycle_through_objects_ends() -> None:
    out = Out(a, [b])
    out.extra.append(out)
    assert ids(tensors_in(out)) == ids([a, b])


class DataclassOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> Out:
        h = torch.relu(self.fc1(x))
        return Out(self.fc2(h), [h.sum(-1)])


def test_a_model_returning_a_plain_dataclass_traces_and_verifies() -> None:
    torch.manual_seed(0)
    model = DataclassOutput()
    spec = permgraph.infer(model, torch.randn(2, 4))
    assert [g.size for g in spec.groups] == [8]
    assert spec.verify(model, torch.randn(5, 4)) < 1e-5
