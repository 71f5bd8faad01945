"""Members on one slice of a tensor (``Member.at``): the experts of a stacked mixture-of-experts
layer, each permuting its own hidden units, through the spec, the files, the matchers and
streaming."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from permgraph import Group, Layout, Member, PermSpec
from permgraph.checkpoint import open_checkpoint, write_checkpoint
from permgraph.errors import MatchError, MergeError, SpecMismatchError, VerificationError
from permgraph.io import load_permutation, save_permutation
from permgraph.match.activation import activation_matching
from permgraph.match.sinkhorn import soft_apply
from permgraph.match.weight import similarity_matrices, weight_matching
from permgraph.pipeline import permuted
from permgraph.repairing import repair

pytestmark = pytest.mark.usefixtures("one_thread")

D, HIDDEN, EXPERTS = 6, 5, 3


class Stacked(nn.Module):
    """Every token through every expert of one stacked tensor pair, summed: no routing."""

    def __init__(self, d: int = D, hidden: int = HIDDEN, experts: int = EXPERTS) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.up = nn.Parameter(torch.randn(experts, 2 * hidden, d))  # [E, 2I, H]: gate rows, then up rows
        self.down = nn.Parameter(torch.randn(experts, d, hidden))  # [E, H, I]
        self.out = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        y = 0
        for e in range(self.up.shape[0]):
            g, u = (h @ self.up[e].T).chunk(2, -1)
            y = y + (nn.functional.silu(g) * u) @ self.down[e].T
        return self.out(h + y)


def _model(seed: int = 0) -> Stacked:
    torch.manual_seed(seed)
    return Stacked().eval()


def _expert(e: int, down_at: int | None = None) -> Group:
    at, down = ((0, e),), ((0, e if down_at is None else down_at),)
    return Group(f"expert{e}", HIDDEN, (Member("up", 1, Layout(), at=at), Member("up", 1, Layout(offset=HIDDEN), at=at),
                                        Member("down", 2, Layout(), at=down)))


def _spec(*extra: Group, experts: list[Group] | None = None) -> PermSpec:
    stream = Group("stream", D, (Member("inp.weight", 0), Member("inp.bias", 0), Member("up", 2), Member("down", 1),
                                 Member("out.weight", 1)))
    groups = (stream, *(experts if experts is not None else [_expert(e) for e in range(EXPERTS)]), *extra)
    shapes = {k: tuple(v.shape) for k, v in _model().state_dict().items()}
    return PermSpec(groups, shapes=shapes)


def _x() -> torch.Tensor:
    return torch.randn(4, D, generator=torch.Generator().manual_seed(1))


def _equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- the spec -----------------------------------------------------------------------------------

def test_the_oracle_passes_random_permutations() -> None:
    spec = _spec()
    spec.lint()
    model = _model()
    assert spec.verify(model, _x(), draws=3) < 1e-4  # passes (it raises otherwise), at float32 rounding
    assert spec.verify(model, _x(), perm=spec.random_permutation(torch.Generator().manual_seed(5))) < 1e-4


@pytest.mark.parametrize("experts", [
    [_expert(0), _expert(1), Group("expert2", HIDDEN, _expert(2).members[:2])],  # expert 2's down_proj left out
    [_expert(0, down_at=1), _expert(1, down_at=0), _expert(2)],  # experts 0 and 1 permute each other's down_proj
], ids=["slice-left-out", "wrong-expert"])
def test_the_oracle_catches_a_wrong_slice(experts: list[Group]) -> None:
    spec = _spec(experts=experts)
    spec.lint()
    with pytest.raises(VerificationError):
        spec.verify(_model(), _x())


def test_apply_permutes_each_slice_by_its_own_group_and_inverts_and_composes() -> None:
    spec = _spec()
    sd = _model().state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    gen = torch.Generator().manual_seed(2)
    p, q = spec.random_permutation(gen), spec.random_permutation(gen)
    out = spec.apply(p, sd)
    assert _equal(sd, before)  # the input is untouched
    s = p["stream"]
    for e in range(EXPERTS):
        pe = p[f"expert{e}"]
        assert torch.equal(out["down"][e], sd["down"][e][s][:, pe])
        assert torch.equal(out["up"][e], sd["up"][e][torch.cat([pe, pe + HIDDEN])][:, s])
    assert _equal(spec.apply(spec.inverse(p), out), sd)
    assert _equal(spec.apply(spec.compose(p, q), sd), spec.apply(q, out))
    assert torch.equal(spec.axis_index("down", 2, p, at=((0, 1),)), p["expert1"])
    assert spec.axis_index("down", 2, p) is None  # no whole-tensor member there


def test_str_dict_json_and_fingerprint_keep_at() -> None:
    assert str(Member("down", 2, at=((0, 3),))) == "down[2] (at [0]=3)"
    assert str(Member("up", 1, Layout(offset=5), at=((0, 1),))) == "up[1] (offset 5; at [0]=1)"
    spec = _spec()
    assert "up[1] (offset 5; at [0]=2)" in spec.table(max_members=3)
    back = PermSpec.from_dict(json.loads(spec.to_json()))
    assert back == spec and back["expert1"].members[2].at == ((0, 1),)
    assert back.fingerprint() == spec.fingerprint()
    moved = _spec(experts=[_expert(0, down_at=1), _expert(1, down_at=0), _expert(2)])
    assert moved.fingerprint() != spec.fingerprint()


def test_without_at_the_dict_and_fingerprint_are_as_before() -> None:
    spec = PermSpec((Group("g", 4, (Member("w", 0), Member("v", 1, Layout(block=2)))),), shapes={"w": (4,), "v": (3, 8)})
    assert all("at" not in m for g in spec.to_dict()["groups"] for m in g["members"])
    old = [[g.name, g.size, [[m.key, m.axis, m.layout.offset, m.layout.block, [list(r) for r in m.layout.repeats]]
                             for m in g.members]] for g in spec.groups]  # the fingerprint before Member.at
    assert spec.fingerprint() == hashlib.sha256(json.dumps(old).encode()).hexdigest()[:16]
    legacy = spec.to_dict()  # a file written before Member.at reads back
    assert PermSpec.from_dict(legacy) == spec


def test_permutation_files_keep_at(tmp_path: Path) -> None:
    spec = _spec()
    p = spec.random_permutation(torch.Generator().manual_seed(3))
    save_permutation(tmp_path / "p.safetensors", spec, p)
    assert _equal(load_permutation(tmp_path / "p.safetensors", spec), p)
    moved = _spec(experts=[_expert(0, down_at=1), _expert(1, down_at=0), _expert(2)])
    # the message names a member that differs, slice included
    with pytest.raises(SpecMismatchError, match=r"another spec.*down\[2\] \(at \[0\]=[01]\) is in one and not the other"):
        load_permutation(tmp_path / "p.safetensors", moved)


@pytest.mark.parametrize(("extra", "message"), [
    (Group("bad", D, (Member("down", 1, at=((1, 0),)),)), r"down\[1\] \(at \[1\]=0\): at picks a slice along axis 1"),
    (Group("bad", D, (Member("down", 1, at=((5, 0),)),)), r"at names axis 5, but down has 3 axes"),
    (Group("bad", HIDDEN, (Member("up", 1, Layout(offset=2 * HIDDEN - HIDDEN), at=((0, 3),)),)),
     r"at index 3 is out of range for axis 0 of size 3"),
    (Group("bad", HIDDEN, (Member("up", 1, at=((2, 0), (0, 0))),)), r"at must name each axis once, sorted by axis"),
    (Group("bad", HIDDEN, (Member("up", 1, at=((0, 0), (2, 1))),)),
     r"group 'bad': up\[1\] \(at \[0\]=0, \[2\]=1\) slices up along other axes than up\[1\] \(at \[0\]=0\)"),
    (Group("bad", EXPERTS, (Member("down", 0),)),
     r"group 'bad': down\[0\] permutes axis 0 of down, which down\[2\] \(at \[0\]=0\) \(group 'expert0'\) picks"),
    (Group("bad", HIDDEN, (Member("down", 2),)),
     r"group 'expert0': down\[2\] \(at \[0\]=0\) covers positions of down\[2\] that down\[2\] \(group 'bad'"),
    (Group("bad", 4, (Member("up", 1, Layout(offset=3), at=((0, 0),)),)),
     r"groups \['expert0', 'bad'\] neither commute nor nest \(outer groups first\) on up\[1\] \(at \[0\]=0\)"),
], ids=["on-own-axis", "axis-out-of-range", "index-out-of-range", "unsorted", "other-axes", "permutes-slicing-axis",
        "overlaps-whole", "same-slice-clash"])
def test_lint_rejects(extra: Group, message: str) -> None:
    with pytest.raises(SpecMismatchError, match=message):
        _spec(extra).lint()


def test_slices_of_one_axis_that_do_not_overlap_pass_lint() -> None:
    spec = _spec(Group("tail", 2, (Member("up", 1, Layout(offset=2 * HIDDEN - 2)),)),  # whole-tensor: no slice there
                 experts=[Group(f"expert{e}", 4, (Member("up", 1, at=((0, e),)),)) for e in range(EXPERTS)])
    spec.lint()
    sd = _model().state_dict()
    p = spec.random_permutation(torch.Generator().manual_seed(4))
    out = spec.apply(p, sd)["up"]
    for e in range(EXPERTS):
        order = torch.cat([p[f"expert{e}"], torch.arange(4, 8), p["tail"] + 8])
        assert torch.equal(out[e], sd["up"][e][order][:, p["stream"]])


# -- the matchers ---------------------------------------------------------------------------------

def _pair() -> tuple[PermSpec, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    spec = _spec()
    a = _model().state_dict()
    hidden = spec.random_permutation(torch.Generator().manual_seed(6))
    return spec, a, spec.apply(hidden, a), hidden


def _objective(spec: PermSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = {m.key for g in spec.groups for m in g.members}
    return sum(float(torch.vdot(a[k].double().reshape(-1), b[k].double().reshape(-1))) for k in keys)


def test_weight_matching_recovers_a_hidden_permutation() -> None:
    spec, a, b, hidden = _pair()
    perm, hist = weight_matching(spec, a, b, return_history=True)
    assert _equal(spec.apply(perm, b), a)
    assert all(torch.equal(perm[n], spec.inverse(hidden)[n]) for n in spec.names)
    assert hist.objective[-1] == pytest.approx(_objective(spec, a, a), rel=1e-6)
    assert hist.objective[0] == pytest.approx(_objective(spec, a, b), rel=1e-6)
    s = similarity_matrices(spec, a, spec.apply(perm, b))  # aligned: every unit is most like itself
    assert all(torch.equal(m.argmax(1), torch.arange(m.shape[0])) for m in s.values())


def test_weight_matching_and_writing_stream_from_checkpoints(tmp_path: Path) -> None:
    spec, a, b, _ = _pair()
    for name, sd in (("a", a), ("b", b)):
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / f"{name}.safetensors")
    ca, cb = open_checkpoint(tmp_path / "a.safetensors"), open_checkpoint(tmp_path / "b.safetensors")
    # a slice is read alone from the file, and is the slice of the whole tensor
    assert torch.equal(ca.read_slice("down", ((0, 2),)), a["down"][2])
    assert torch.equal(ca.read_slice("up", ((0, 1), (2, 3))), a["up"][1, :, 3])
    perm = weight_matching(spec, ca, cb)
    assert _equal(perm, weight_matching(spec, a, b))
    entries = [(k, cb.dtype(k), cb.shape(k)) for k in cb.stored_keys]
    out = write_checkpoint(tmp_path / "aligned.safetensors", entries, permuted(spec, perm, cb))
    assert _equal(dict(open_checkpoint(out)), a)


def test_soft_apply_of_permutation_matrices_is_apply() -> None:
    spec = _spec()
    sd = _model().state_dict()
    p = spec.random_permutation(torch.Generator().manual_seed(7))
    mats = {g: torch.eye(len(v))[v].requires_grad_() for g, v in p.items()}
    out = soft_apply(spec, mats, sd)
    assert _equal({k: v.detach() for k, v in out.items()}, spec.apply(p, sd))
    out["down"][1].sum().backward()  # expert 1's slice depends on its matrix and the stream's only
    assert mats["expert1"].grad.abs().sum() > 0 and mats["stream"].grad.abs().sum() > 0
    assert mats["expert0"].grad is None or not mats["expert0"].grad.any()


def test_activation_matching_and_repair_refuse_slices_by_name() -> None:
    spec, a_model, b_model = _spec(), _model(0), _model(1)
    with pytest.raises(MatchError, match=r"group 'expert0' permutes units inside one slice .*weight_matching"):
        activation_matching(spec, a_model, b_model, [_x()])
    with pytest.raises(MergeError, match=r"repair .*group 'expert0'.*experts=\"shared\""):
        repair(a_model, b_model, _model(2), [_x()], spec, 0.5)
