"""Permutation and weight files: bit-exact round trips, atomic writes, and a named error for
every kind of bad input."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import permgraph
from permgraph.errors import PermutationError, SpecMismatchError
from permgraph.io import (
    FileError,
    FileFormatError,
    load_aligned,
    load_permutation,
    read_header,
    save_aligned,
    save_permutation,
)


def _cnn(width: int = 6) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * 16, 12), nn.ReLU(), nn.Linear(12, 3),
    )


@pytest.fixture(scope="module")
def spec() -> permgraph.PermSpec:
    return permgraph.infer(_cnn(), torch.randn(2, 1, 4, 4))


def _perm(spec: permgraph.PermSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    return spec.random_permutation(torch.Generator().manual_seed(seed))


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- round trips ---------------------------------------------------------------------------------

def test_permutation_round_trip_is_bit_exact(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    perm = _perm(spec)
    perm["4"] = perm["4"].to(torch.int32)  # any integer dtype goes in; int64 comes out
    path = save_permutation(tmp_path / "perm.safetensors", spec, perm)
    assert path == tmp_path / "perm.safetensors" and _left(tmp_path) == ["perm.safetensors"]
    back = load_permutation(path, spec)
    assert list(back) == spec.names
    for name in spec.names:
        assert back[name].dtype == torch.int64
        assert torch.equal(back[name], perm[name].long())
    header = read_header(path)
    assert header["format"] == "permgraph.permutation" and header["format_version"] == 1
    assert header["permgraph_version"] == permgraph.__version__
    assert header["spec_fingerprint"] == spec.fingerprint()
    assert [(g["name"], g["size"]) for g in header["groups"]] == [(g.name, g.size) for g in spec.groups]
    # any safetensors reader sees plain int64 tensors named after the groups
    plain = safetensors.torch.load_file(path)
    assert set(plain) == set(spec.names) and all(t.dtype == torch.int64 for t in plain.values())


def test_a_file_with_older_group_names_loads_by_members(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    import dataclasses

    perm = _perm(spec)
    old_names = {n: f"{n}#old" for n in spec.names}  # the same groups as an older version named them
    old = permgraph.PermSpec(tuple(dataclasses.replace(g, name=old_names[g.name]) for g in spec.groups),
                             spec.unsupported, spec.shapes)
    path = save_permutation(tmp_path / "old.safetensors", old, {old_names[n]: p for n, p in perm.items()})
    with pytest.warns(DeprecationWarning, match="matched to this spec's groups by their members"):
        back = load_permutation(path, spec)
    assert list(back) == spec.names and all(torch.equal(back[n], perm[n]) for n in spec.names)
    # a group without its twin (another size) under another name: still another architecture
    other = permgraph.infer(_cnn(width=5), torch.randn(2, 1, 4, 4))
    path = save_permutation(tmp_path / "other.safetensors", other, _perm(other))
    renamed = permgraph.PermSpec(tuple(dataclasses.replace(g, name=g.name + "x") for g in spec.groups),
                                 spec.unsupported, spec.shapes)
    with pytest.raises(SpecMismatchError, match="groups missing from the file"):
        load_permutation(path, renamed)


def test_apply_then_inverse_is_bit_exact(spec: permgraph.PermSpec) -> None:
    model = _cnn()
    model.train()
    model(torch.randn(4, 1, 4, 4))  # move the running statistics off their defaults
    sd = model.state_dict()
    perm = _perm(spec, 3)
    permuted = spec.apply(perm, sd)
    assert not torch.equal(permuted["0.weight"], sd["0.weight"])
    back = spec.apply(spec.inverse(perm), permuted)
    assert list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype, k


def test_aligned_weights_round_trip_is_bit_exact(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    sd = spec.apply(_perm(spec), _cnn().state_dict())
    sd["extra.half"] = torch.randn(3, 5).to(torch.bfloat16)
    sd["extra.transposed"] = torch.randn(4, 6).t()  # not contiguous
    buf = torch.arange(10.0)
    sd["extra.view_a"], sd["extra.view_b"] = buf[:4], buf[4:]  # views of one buffer
    path = save_aligned(tmp_path / "b.safetensors", sd)
    plain = safetensors.torch.load_file(path)
    ours = load_aligned(path)
    assert list(ours) == list(sd)
    for k, v in sd.items():
        for got in (plain[k], ours[k]):
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
            assert got.device.type == "cpu"


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path: Path) -> None:
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    sd = model.state_dict()
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    path = save_aligned(tmp_path / "tied.safetensors", sd)
    assert set(safetensors.torch.load_file(path)) == {"emb.weight"}
    assert read_header(path)["aliases"] == {"head.weight": "emb.weight"}
    back = load_aligned(path)
    assert list(back) == ["emb.weight", "head.weight"]
    assert back["head.weight"] is back["emb.weight"]
    assert torch.equal(back["emb.weight"], sd["emb.weight"])


def test_loading_never_unpickles(spec: permgraph.PermSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    perm = _perm(spec)
    save_permutation(tmp_path / "p.safetensors", spec, perm)
    save_aligned(tmp_path / "w.safetensors", _cnn().state_dict(), spec=spec)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was used on the loading path")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert torch.equal(load_permutation(tmp_path / "p.safetensors", spec)["0"], perm["0"])
    assert set(load_aligned(tmp_path / "w.safetensors", spec)) == set(spec.shapes)


# -- bad input -------------------------------------------------------------------------------------

def test_truncated_file_is_a_format_error(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    path = save_permutation(tmp_path / "p.safetensors", spec, _perm(spec))
    data = path.read_bytes()
    for cut in (len(data) - 5, len(data) // 2, 20, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(FileFormatError, match="not a valid safetensors file|could not be read"):
            load_permutation(path, spec)
    path.write_bytes(b"")
    with pytest.raises(FileFormatError):
        load_permutation(path, spec)


def test_corrupted_file_is_a_format_error(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    path = save_permutation(tmp_path / "p.safetensors", spec, _perm(spec))
    data = bytearray(path.read_bytes())
    # one flipped bit in the indices: still a valid safetensors file, caught by the checksum
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="checksum"):
        load_permutation(path, spec)
    # a damaged header
    data = bytearray(save_permutation(tmp_path / "q.safetensors", spec, _perm(spec)).read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = data.index(b'"permgraph"', 8, 8 + header_len)
    data[start + 1:start + 4] = b"XXX"
    (tmp_path / "q.safetensors").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="header is missing or not JSON"):
        load_permutation(tmp_path / "q.safetensors", spec)
    # random bytes
    (tmp_path / "r.safetensors").write_bytes(os.urandom(200))
    with pytest.raises(FileFormatError):
        load_permutation(tmp_path / "r.safetensors", spec)


def test_a_file_from_another_architecture_is_refused_naming_the_group(tmp_path: Path) -> None:
    def mlp(hidden: int, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8, bias=bias), nn.ReLU(), nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    x = torch.randn(2, 4)
    spec = permgraph.infer(mlp(6), x)
    path = save_permutation(tmp_path / "p.safetensors", spec, _perm(spec))
    # another size of group '2'
    with pytest.raises(SpecMismatchError, match=r"group '2' has 6 units in the file, 5 in the spec"):
        load_permutation(path, permgraph.infer(mlp(5), x))
    # same names and sizes, other members: the first layer has no bias
    with pytest.raises(SpecMismatchError, match=r"group '0' permutes other tensors \(e\.g\. 0\.bias\[0\]"):
        load_permutation(path, permgraph.infer(mlp(6, bias=False), x))
    # other group names
    other = permgraph.infer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), x)
    with pytest.raises(SpecMismatchError, match=r"groups the spec does not have: \['2'\]"):
        load_permutation(path, other)
    # weights saved with a spec's fingerprint are refused by another spec
    wpath = save_aligned(tmp_path / "w.safetensors", mlp(6).state_dict(), spec=spec)
    with pytest.raises(SpecMismatchError, match="fingerprint"):
        load_aligned(wpath, permgraph.infer(mlp(6, bias=False), x))
    with pytest.raises(SpecMismatchError, match="missing keys"):
        load_aligned(save_aligned(tmp_path / "v.safetensors", {"0.weight": torch.zeros(8, 4)}), spec)


def test_a_duplicate_index_is_a_permutation_error(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    perm = _perm(spec)
    bad = dict(perm)
    bad["0"] = bad["0"].clone()
    bad["0"][1] = bad["0"][0]
    with pytest.raises(PermutationError, match="group '0': not a bijection"):
        save_permutation(tmp_path / "p.safetensors", spec, bad)
    assert _left(tmp_path) == []  # nothing written
    # a hand-made file with a valid header and checksum but a duplicate index
    good = save_permutation(tmp_path / "good.safetensors", spec, perm)
    metadata = safetensors.safe_open(str(good), "pt").metadata()
    header = json.loads(metadata["permgraph"])
    from permgraph.io import _checksum

    tensors = {k: v.long() for k, v in bad.items()}
    header["sha256"] = _checksum([g["name"] for g in header["groups"]], tensors)
    metadata["permgraph"] = json.dumps(header)
    safetensors.torch.save_file(tensors, tmp_path / "dup.safetensors", metadata=metadata)
    with pytest.raises(PermutationError, match="not a bijection"):
        load_permutation(tmp_path / "dup.safetensors", spec)


def test_wrong_format_or_version_is_a_format_error(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    weights = save_aligned(tmp_path / "w.safetensors", _cnn().state_dict())
    perm = save_permutation(tmp_path / "p.safetensors", spec, _perm(spec))
    with pytest.raises(FileFormatError, match="not a permgraph.permutation file"):
        load_permutation(weights, spec)
    with pytest.raises(FileFormatError, match="is a permutation file"):
        load_aligned(perm)
    safetensors.torch.save_file({"0": torch.arange(6)}, tmp_path / "plain.safetensors")
    with pytest.raises(FileFormatError, match="format=None"):
        load_permutation(tmp_path / "plain.safetensors", spec)
    metadata = safetensors.safe_open(str(perm), "pt").metadata()
    header = json.loads(metadata["permgraph"])
    header["format_version"] = 99
    metadata["permgraph"] = json.dumps(header)
    safetensors.torch.save_file(load_permutation(perm, spec), tmp_path / "new.safetensors", metadata=metadata)
    with pytest.raises(FileFormatError, match="format version 99.*upgrade permgraph"):
        load_permutation(tmp_path / "new.safetensors", spec)
    with pytest.raises(FileError, match="no such file"):
        load_permutation(tmp_path / "missing.safetensors", spec)
    with pytest.raises(FileError, match="is a directory"):
        load_aligned(tmp_path)
    with pytest.raises(FileFormatError, match="tensors only"):
        save_aligned(tmp_path / "x.safetensors", {"a": 3})


def test_unwritable_paths_leave_nothing_behind(spec: permgraph.PermSpec, tmp_path: Path) -> None:
    perm = _perm(spec)
    with pytest.raises(FileError, match="folder must exist"):
        save_permutation(tmp_path / "no" / "such" / "dir" / "p.safetensors", spec, perm)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileError, match="cannot write"):
        save_aligned(tmp_path / "a_file" / "w.safetensors", _cnn().state_dict())
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(FileError, match="is a directory"):
        save_permutation(tmp_path / "a_dir", spec, perm)
    assert _left(tmp_path) == ["a_dir", "a_file"] and _left(tmp_path / "a_dir") == []


def test_a_write_that_fails_midway_keeps_the_old_file(spec: permgraph.PermSpec, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_permutation(tmp_path / "p.safetensors", spec, _perm(spec, 0))
    before = path.read_bytes()

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(FileError, match="No space left on device; nothing was written"):
        save_permutation(path, spec, _perm(spec, 1))
    assert _left(tmp_path) == ["p.safetensors"]  # no temporary file left
    assert path.read_bytes() == before  # the old file is whole

    def interrupted(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_aligned(tmp_path / "w.safetensors", _cnn().state_dict())
    assert _left(tmp_path) == ["p.safetensors"]
