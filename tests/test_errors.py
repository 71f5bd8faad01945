"""Bad input gets a named error (a ``PermGraphError`` subclass) whose message says what is
wrong, where, and what to do next."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import (
    PermGraphError,
    PermSpec,
    PermutationError,
    SpecMismatchError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))


@pytest.fixture(scope="module")
def mlp():
    model = _mlp()
    spec = permgraph.infer(model, torch.randn(3, 4))
    assert len(spec.groups) == 2
    return model, spec


def test_every_error_is_a_permgraph_error():
    for cls in (TraceError, UnsupportedOpError, SpecMismatchError, PermutationError, permgraph.VerificationError):
        assert issubclass(cls, PermGraphError)
    assert issubclass(SpecMismatchError, ValueError) and issubclass(PermutationError, ValueError)


# --------------------------------------------------------------------------------------
# tracing


class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor's value: export cannot follow it
            return self.fc(x)
        return -self.fc(x)


class ItemThenBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = int(x.abs().sum().item())
        return self.fc(x) * 2 if n % 2 else self.fc(x)


@pytest.mark.parametrize("model", [DataDependentBranch(), ItemThenBranch()], ids=["if-tensor", "item"])
def test_untraceable_model_gives_trace_error_with_what_to_try(model):
    with pytest.raises(TraceError) as info:
        permgraph.infer(model, torch.randn(2, 4))
    msg = str(info.value)
    assert type(model).__name__ in msg
    assert "torch.export" in msg
    assert "runs on these inputs" in msg  # it says the model itself is fine
    assert "What to try" in msg and ".item()" in msg and "control flow" in msg
    assert info.value.__cause__ is not None  # the export error is chained, not swallowed


class PrintsThenBranches(DataDependentBranch):
    def forward(self, x):
        print("a message of the model's own", file=sys.stderr)
        return super().forward(x)


def test_a_failed_export_prints_no_partial_graph_but_keeps_other_output(capsys: pytest.CaptureFixture[str]):
    """torch prints the partial graph of a failed export to stderr; the TraceError says why,
    so that dump is dropped, and what else was written to stderr meanwhile still shows."""
    with pytest.raises(TraceError):
        permgraph.infer(PrintsThenBranches(), torch.randn(2, 4), islands=False)
    err = capsys.readouterr().err
    assert "def forward" not in err and "torch.ops.aten" not in err
    assert "a message of the model's own" in err


def test_inputs_of_the_wrong_shape_say_the_model_fails_on_them():
    with pytest.raises(TraceError) as info:
        permgraph.infer(_mlp(), torch.randn(3, 5))
    msg = str(info.value)
    assert "fails when called on the example inputs" in msg
    assert "Tensor(3, 5)" in msg  # what was passed
    assert "mat1 and mat2" in msg  # the model's own error
    assert "Pass inputs the model accepts" in msg


def test_inputs_of_the_wrong_dtype_say_the_model_fails_on_them():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(TraceError, match="fails when called on the example inputs"):
        permgraph.infer(model, torch.randn(2, 3))


def test_missing_argument_says_the_model_fails():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.fc(x) + y

    with pytest.raises(TraceError, match="fails when called"):
        permgraph.infer(TwoInputs(), torch.randn(2, 4))
    # and the three input forms work: a tuple of positional args, a dict of kwargs
    spec = permgraph.infer(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 4)))
    assert len(spec.groups) == 0  # x and y are model inputs, y fixes the output units
    spec = permgraph.infer(TwoInputs(), {"x": torch.randn(2, 4), "y": torch.randn(2, 4)})
    assert len(spec.groups) == 0


def test_not_a_module_is_a_trace_error():
    with pytest.raises(TraceError) as info:
        permgraph.infer(lambda x: x * 2, torch.randn(2, 3))
    assert "nn.Module" in str(info.value) and "function" in str(info.value)


def test_model_raising_inside_forward_keeps_its_message():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            raise ValueError("this model is broken on purpose")

    with pytest.raises(TraceError, match="broken on purpose"):
        permgraph.infer(Broken(), torch.randn(2, 4))


def test_strict_mode_lists_every_unsupported_op():
    class TwoUnknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.flip(F.relu(self.a(x)), [-1])
            return self.b(torch.fft.fft(h, dim=-1).real)

    with pytest.raises(UnsupportedOpError) as info:
        permgraph.infer(TwoUnknown(), torch.randn(3, 4), strict=True)
    msg = str(info.value)
    assert "aten.flip" in msg and "aten.fft_fft" in msg
    assert "2 op(s)" in msg
    assert "rule" in msg and "strict=False" in msg  # the next step
    # without strict the same ops are reported, not raised
    spec = permgraph.infer(TwoUnknown(), torch.randn(3, 4))
    assert {u.op.rsplit(".", 1)[0] for u in spec.unsupported} == {"aten.flip", "aten.fft_fft"}


def test_strict_mode_passes_when_every_op_has_a_rule():
    spec = permgraph.infer(_mlp(), torch.randn(3, 4), strict=True)
    assert len(spec.groups) == 2


# --------------------------------------------------------------------------------------
# state dicts


def test_apply_with_a_missing_key_names_it(mlp):
    model, spec = mlp
    state = {k: v for k, v in model.state_dict().items() if k != "2.weight"}
    with pytest.raises(SpecMismatchError) as info:
        spec.apply(spec.identity(), state)
    assert "missing" in str(info.value) and "2.weight" in str(info.value)
    assert "same architecture" in str(info.value)  # what to do


def test_apply_with_an_extra_key_names_it(mlp):
    model, spec = mlp
    state = dict(model.state_dict()) | {"extra.weight": torch.zeros(3)}
    with pytest.raises(SpecMismatchError) as info:
        spec.apply(spec.identity(), state)
    assert "unexpected" in str(info.value) and "extra.weight" in str(info.value)


def test_apply_with_a_mis_shaped_tensor_names_it(mlp):
    model, spec = mlp
    state = dict(model.state_dict()) | {"2.bias": torch.zeros(7)}
    with pytest.raises(SpecMismatchError) as info:
        spec.apply(spec.identity(), state)
    msg = str(info.value)
    assert "2.bias" in msg and "(7,)" in msg and "(6,)" in msg


def test_verify_on_another_architecture_is_a_spec_mismatch(mlp):
    _, spec = mlp
    other = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(SpecMismatchError, match="0.weight"):
        spec.verify(other, torch.randn(3, 4))


# --------------------------------------------------------------------------------------
# permutations


def _one_bad(spec: PermSpec, value) -> dict:
    perm = spec.identity()
    perm[spec.names[0]] = value
    return perm


@pytest.mark.parametrize("value, words", [
    (torch.arange(7), ["has 8 units", "has 7"]),
    (torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), ["not a bijection", "6"]),
    (torch.arange(8) + 1, ["[0, 8)"]),
    (torch.arange(8).flip(0).float(), ["integer", "float32"]),
    (torch.ones(8, dtype=torch.bool), ["integer", "bool"]),
    (torch.arange(8).view(2, 4), ["1-D", "(2, 4)"]),
    (list(range(8)), ["integer tensor", "list"]),
], ids=["size", "duplicate", "range", "float", "bool", "2-D", "list"])
def test_bad_permutation_names_the_group(mlp, value, words):
    model, spec = mlp
    name = spec.names[0]
    with pytest.raises(PermutationError) as info:
        spec.apply(_one_bad(spec, value), model.state_dict())
    msg = str(info.value)
    assert repr(name) in msg
    for w in words:
        assert w in msg, msg
    with pytest.raises(PermutationError):
        spec.inverse(_one_bad(spec, value))


def test_permutation_with_missing_or_unknown_groups(mlp):
    model, spec = mlp
    perm = spec.identity()
    missing = perm.pop(spec.names[1])
    with pytest.raises(PermutationError) as info:
        spec.apply(perm, model.state_dict())
    assert spec.names[1] in str(info.value) and "missing" in str(info.value)
    perm[spec.names[1]] = missing
    perm["no such group"] = torch.arange(3)
    with pytest.raises(PermutationError, match="no such group"):
        spec.apply(perm, model.state_dict())


def test_verify_with_a_bad_permutation(mlp):
    model, spec = mlp
    with pytest.raises(PermutationError):
        spec.verify(model, torch.randn(3, 4), perm=_one_bad(spec, torch.zeros(8, dtype=torch.long)))


def test_verify_on_a_model_that_changes_between_runs_says_so():
    """Outputs that change with nothing permuted (here a counter kept outside the weights)
    are no symmetry failure: verify says the model is not deterministic, and blames no group."""

    class Drifting(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(4, 8), nn.Linear(8, 2), 0

        def forward(self, x):
            self.calls += 1
            return self.b(F.relu(self.a(x))) + self.calls

    model = Drifting()
    spec = permgraph.infer(model, torch.randn(3, 4))
    with pytest.raises(VerificationError, match="differ between two runs with the same weights") as info:
        spec.verify(model, torch.randn(3, 4))
    assert info.value.culprits == ()


# --------------------------------------------------------------------------------------
# serialised specs


GOOD_HEAD = {"format": "permgraph.PermSpec", "version": 1}


@pytest.mark.parametrize("data", [
    None,
    "a string",
    [],
    {},
    {"format": "something else", "version": 1, "groups": [], "shapes": {}},
    GOOD_HEAD | {"version": 99, "groups": [], "shapes": {}},
    GOOD_HEAD,
    GOOD_HEAD | {"groups": [{"name": "a"}], "shapes": {}},
    GOOD_HEAD | {"groups": "abc", "shapes": {}},
    GOOD_HEAD | {"groups": None, "shapes": {}},
    GOOD_HEAD | {"groups": [{"name": "a", "size": "x", "members": []}], "shapes": {}},
    GOOD_HEAD | {"groups": [], "shapes": {"a": [1, "b"]}},
    GOOD_HEAD | {"groups": [], "shapes": {}, "unsupported": [{"x": 1}]},
    GOOD_HEAD | {"groups": [], "shapes": []},
    GOOD_HEAD | {"groups": [{"name": "a", "size": 2, "members": [
        {"key": "k", "axis": 0, "offset": 0, "block": 1, "repeats": [[1]]}]}], "shapes": {"k": [4]}},
    GOOD_HEAD | {"groups": [{"name": "a", "size": 2, "members": [
        {"key": "k", "axis": 0, "offset": 0, "block": 1, "repeats": 5}]}], "shapes": {"k": [4]}},
], ids=["None", "str", "list", "empty", "format", "version", "no-groups", "no-size", "groups-str", "groups-None",
        "size-str", "shape-str", "unsupported-keys", "shapes-list", "repeat-not-a-pair", "repeats-int"])
def test_from_dict_on_garbage_is_a_spec_mismatch(data):
    with pytest.raises(SpecMismatchError):
        PermSpec.from_dict(data)


def test_from_dict_error_says_what_it_expected():
    with pytest.raises(SpecMismatchError, match="permgraph.PermSpec"):
        PermSpec.from_dict({"groups": []})
    with pytest.raises(SpecMismatchError, match="version"):
        PermSpec.from_dict(GOOD_HEAD | {"version": 99})


def test_from_dict_accepts_its_own_output(mlp):
    _, spec = mlp
    assert PermSpec.from_dict(json.loads(spec.to_json())) == spec
