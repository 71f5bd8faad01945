"""Checkpoints on disk: the lazy loader, the streamed writer, streamed weight matching, and the
``align`` / ``merge`` / ``apply`` / ``inspect`` commands on Hugging Face folders and files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import permgraph
from permgraph.checkpoint import (
    SAFE_INDEX,
    build_model,
    open_checkpoint,
    parse_size,
    tied_aliases,
    write_checkpoint,
)
from permgraph.cli import main
from permgraph.errors import PermGraphError, SpecMismatchError
from permgraph.io import FileError, FileFormatError, load_permutation
from permgraph.match import weight
from permgraph.match.weight import weight_matching
from permgraph.pipeline import architecture, permuted

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(tied: bool, seed: int = 0) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _folders(root: Path, tied: bool) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """A, B = A under a hidden permutation of every group, C = another init; sharded bf16."""
    a = _llama(tied)
    a.save_pretrained(root / "A", max_shard_size="20KB")
    arch = architecture([root / "A"])
    perm = arch.spec.random_permutation(torch.Generator().manual_seed(3))
    b = _llama(tied)
    b.load_state_dict(arch.spec.apply(perm, a.state_dict()))
    b.save_pretrained(root / "B", max_shard_size="20KB")
    _llama(tied, seed=1).save_pretrained(root / "C", max_shard_size="20KB")
    return root / "A", root / "B", root / "C", perm


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama(request, tmp_path_factory) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    return _folders(tmp_path_factory.mktemp("llama"), request.param)


# -- the loader -------------------------------------------------------------------------------

def test_folder_is_read_lazily_with_shards_and_aliases(llama) -> None:
    a, *_ = llama
    ck = open_checkpoint(a)
    assert ck.kind == "folder" and len(ck.files) > 1 and (a / SAFE_INDEX).exists()
    ref = transformers.LlamaForCausalLM.from_pretrained(a).state_dict()
    stored = set(ck.stored_keys)
    assert stored <= set(ref)
    assert all(ck.dtype(k) == torch.bfloat16 and torch.equal(ck[k], ref[k]) for k in stored)
    model, inputs = build_model(ck)
    assert next(model.parameters()).device.type == "meta" and inputs["use_cache"] is False
    view = ck.with_aliases(tied_aliases(model, ck))
    assert set(view) == set(ref)  # a tied lm_head.weight reads the embedding
    assert all(torch.equal(view[k], ref[k]) for k in ref)


def test_single_files(tmp_path: Path) -> None:
    sd = {"w": torch.randn(4, 3), "b": torch.arange(4)}
    save_file(sd, tmp_path / "m.safetensors")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        ck = open_checkpoint(tmp_path / name)
        assert sorted(ck) == ["b", "w"] and all(torch.equal(ck[k], sd[k]) for k in sd)
        assert ck.shape("w") == (4, 3) and ck.dtype("b") == torch.int64
    with pytest.raises(PermGraphError, match="does not say its architecture"):
        build_model(open_checkpoint(tmp_path / "m.safetensors"))


def test_bad_checkpoints_are_named(tmp_path: Path, llama) -> None:
    a, *_ = llama
    broken = tmp_path / "broken"
    shutil.copytree(a, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-9])
    with pytest.raises(FileFormatError, match=shard.name):
        open_checkpoint(broken)
    shard.unlink()
    with pytest.raises(FileError, match=shard.name):
        open_checkpoint(broken)
    with pytest.raises(FileError, match="no such checkpoint"):
        open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(FileFormatError, match="x.pt"):
        open_checkpoint(tmp_path / "x.pt")


def test_checkpoint_that_does_not_fit_the_architecture(tmp_path: Path, llama) -> None:
    a, *_ = llama
    other = tmp_path / "other"
    shutil.copytree(a, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 48  # the config says another MLP width than the weights
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecMismatchError, match=r"mlp\..*_proj\.weight.* in model-.*\.safetensors has shape"):
        architecture([other])
    sd = dict(open_checkpoint(a))
    sd["extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "extra.safetensors")
    with pytest.raises(SpecMismatchError, match="keys the architecture does not have.*extra.weight"):
        architecture([a, tmp_path / "extra.safetensors"])


def test_parse_size() -> None:
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("512MiB") == 512 << 20 and parse_size("7") == 7
    with pytest.raises(PermGraphError, match="as a size"):
        parse_size("lots")


# -- the writer -------------------------------------------------------------------------------

def test_writer_shards_index_dtype_and_files(tmp_path: Path, llama) -> None:
    a, *_ = llama
    arch = architecture([a])
    ck = arch.checkpoints[0]
    out = write_checkpoint(tmp_path / "copy", arch.entries(ck), lambda k: ck[k], like=ck, metadata={"why": "test"})
    copy = open_checkpoint(out)
    assert len(copy.files) == len(ck.files) > 1  # shards as the input's
    index = json.loads((out / SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(ck.stored_keys)
    assert all(copy.dtype(k) == ck.dtype(k) and torch.equal(copy[k], ck[k]) for k in ck.stored_keys)
    assert (out / "config.json").read_text() == (a / "config.json").read_text()
    from safetensors import safe_open

    with safe_open(str(copy.files[0]), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["permgraph"]) == {"why": "test"}
    one = write_checkpoint(tmp_path / "one.safetensors", arch.entries(ck), lambda k: ck[k])
    assert sorted(open_checkpoint(one)) == sorted(ck.stored_keys)


def test_writer_is_atomic(tmp_path: Path, llama) -> None:
    a, *_ = llama
    ck = open_checkpoint(a)
    entries = [(k, ck.dtype(k), ck.shape(k)) for k in ck.stored_keys]
    calls = []

    def failing(key: str) -> torch.Tensor:
        calls.append(key)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return ck[key]

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(tmp_path / "out", entries, failing, like=ck)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary left
    with pytest.raises(FileFormatError, match="expected torch.bfloat16"):
        write_checkpoint(tmp_path / "out", entries, lambda k: ck[k].float(), like=ck)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(FileError, match="exists"):
        write_checkpoint(tmp_path / "out", entries, lambda k: ck[k], like=ck)
    write_checkpoint(tmp_path / "out", entries, lambda k: ck[k], like=ck, overwrite=True)
    assert sorted(open_checkpoint(tmp_path / "out")) == sorted(ck.stored_keys)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- streamed weight matching ------------------------------------------------------------------

@pytest.mark.parametrize("first_pass", ["sweep", "forward"])
def test_streamed_matching_equals_in_memory(llama, monkeypatch, first_pass: str) -> None:
    a, _, c, _ = llama
    arch = architecture([a, c])
    ca, cc = arch.checkpoints
    in_memory = weight_matching(arch.spec, {k: ca[k] for k in ca}, {k: cc[k] for k in cc}, max_memory=None,
                                first_pass=first_pass)
    monkeypatch.setattr(weight, "CHUNK", 100)  # every member product in pieces, every objective too
    streamed, hist = weight_matching(arch.spec, ca, cc, max_memory=0, first_pass=first_pass, return_history=True)
    assert hist.cache_peak == 0 and hist.sweeps >= 2
    assert all(torch.equal(in_memory[g], streamed[g]) for g in arch.spec.names)


@pytest.mark.parametrize("first_pass", ["sweep", "forward"])
def test_memory_budget_does_not_change_the_result(first_pass: str) -> None:
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),  # noqa: E731
                                       torch.nn.ReLU(), torch.nn.Linear(64, 8))
    m1, m2 = make(), make()
    spec = permgraph.infer(m1, torch.randn(2, 16))
    runs = [weight_matching(spec, m1.state_dict(), m2.state_dict(), max_memory=mm, first_pass=first_pass,
                            return_history=True) for mm in (None, 20_000, 0)]
    for perm, _ in runs[1:]:
        assert all(torch.equal(perm[g], runs[0][0][g]) for g in spec.names)
    assert runs[1][1].cache_evictions > 0 and runs[1][1].cache_peak <= 20_000
    with pytest.raises(permgraph.match.MatchError, match="max_memory"):
        weight_matching(spec, m1.state_dict(), m2.state_dict(), max_memory=-1)


def test_permuted_streams_what_apply_does(llama) -> None:
    a, b, _, perm = llama
    arch = architecture([b])
    ck = arch.checkpoints[0]
    whole = arch.spec.apply(perm, {k: ck[k] for k in ck})
    one = permuted(arch.spec, perm, ck)
    assert all(torch.equal(one(k), whole[k]) for k in whole)


# -- the commands -----------------------------------------------------------------------------

def test_cli_inspect_align_merge_apply_on_folders(tmp_path: Path, llama, capsys) -> None:
    a, b, c, hidden = llama
    assert main(["inspect", str(a), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["architecture"] == "LlamaForCausalLM" and shown["files"] == len(open_checkpoint(a).files)
    assert [g["name"] for g in shown["groups"]] == architecture([a]).spec.names

    # B is A permuted: aligned B is A, bit for bit
    out = tmp_path / "aligned"
    assert main(["align", str(a), str(b), "--out", str(out), "--perm-out", str(tmp_path / "p.safetensors"),
                 "--quiet", "--json", "--max-memory", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["aligned"] == str(out) and report["sweeps"] >= 1
    ca, co = open_checkpoint(a), open_checkpoint(out)
    assert sorted(ca.stored_keys) == sorted(co.stored_keys) and all(torch.equal(ca[k], co[k]) for k in ca)
    assert set(co.aliases) == ({"lm_head.weight"} if "lm_head.weight" not in ca else set())  # tied keys recorded
    arch = architecture([a])
    spec, ca = arch.spec, arch.checkpoints[0]  # tied keys aliased
    found = load_permutation(tmp_path / "p.safetensors", spec)
    assert all(torch.equal(spec.apply(found, spec.apply(hidden, {k: ca[k] for k in ca}))[k], ca[k]) for k in ca)

    # apply: the saved permutation onto B gives the same folder
    assert main(["apply", str(tmp_path / "p.safetensors"), str(b), "--out", str(tmp_path / "applied"), "--quiet"]) == 0
    capsys.readouterr()
    cp = open_checkpoint(tmp_path / "applied")
    assert all(torch.equal(cp[k], ca[k]) for k in cp)

    # merge with an independent C: from_pretrained loads it; weights are the average of A and C aligned
    merged = tmp_path / "merged"
    assert main(["merge", str(a), str(c), "--out", str(merged), "--alpha", "0.5", "--quiet",
                 "--perm-out", str(tmp_path / "pc.safetensors")]) == 0
    assert "merge at alpha=0.5" in capsys.readouterr().out
    model = transformers.LlamaForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    pc = load_permutation(tmp_path / "pc.safetensors", spec)
    cc = open_checkpoint(c).with_aliases(tied_aliases(model, open_checkpoint(c)))
    aligned_c = spec.apply(pc, {k: cc[k] for k in spec.shapes})
    sd = model.state_dict()
    for k in spec.shapes:
        want = ((ca[k].float() + aligned_c[k].float()) / 2).to(torch.bfloat16)
        assert torch.equal(sd[k], want), k
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()


def test_cli_descent_options(tmp_path: Path, llama, capsys) -> None:
    """--order, --tol and --first-pass reach weight matching: the fast configuration still
    finds the hidden permutation (aligned B is A), and a bad value is named before anything
    is written."""
    a, b, *_ = llama
    out = tmp_path / "aligned"
    assert main(["align", str(a), str(b), "--out", str(out), "--quiet", "--json", "--order", "graph",
                 "--tol", "1e-3", "--first-pass", "forward"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sweeps"] >= 1
    ca, co = open_checkpoint(a), open_checkpoint(out)
    assert all(torch.equal(ca[k], co[k]) for k in ca)
    assert main(["export", str(a), str(b), "--perm-out", str(tmp_path / "p.safetensors"), "--quiet",
                 "--first-pass", "forward"]) == 0
    capsys.readouterr()
    assert main(["align", str(a), str(b), "--out", str(tmp_path / "bad"), "--quiet", "--tol", "2"]) == 2
    assert "tol must be a number in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_truncated_shard_leaves_nothing(tmp_path: Path, llama, capsys) -> None:
    a, b, *_ = llama
    bad = tmp_path / "B"
    shutil.copytree(b, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["align", str(a), str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err
    assert not (tmp_path / "out").exists()
    assert main(["align", str(a), str(b), "--out", str(a), "--quiet"]) == 2  # never over an input
    assert "exists" in capsys.readouterr().err


def test_cli_module_callable_with_safetensors_files(tmp_path: Path, capsys) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    spec = permgraph.infer(model, torch.randn(1, 3, 32, 32))
    a = model.state_dict()
    perm = spec.random_permutation(torch.Generator().manual_seed(0))
    save_file({k: v.contiguous() for k, v in a.items()}, tmp_path / "a.safetensors")
    save_file({k: v.contiguous() for k, v in spec.apply(perm, a).items()}, tmp_path / "b.safetensors")
    common = ["--model", "torchvision.models:resnet18", "--build-arg", "num_classes=10", "--input-shape", "1,3,32,32",
              "--quiet"]
    assert main(["inspect", str(tmp_path / "a.safetensors"), *common]) == 0
    assert "12 groups" in capsys.readouterr().out
    out = tmp_path / "o.safetensors"
    assert main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--out", str(out),
                 *common]) == 0
    capsys.readouterr()
    o = open_checkpoint(out)
    assert sorted(o) == sorted(a) and all(torch.equal(o[k], a[k]) for k in a)
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--out",
                 str(tmp_path / "m"), "--reset-bn", *common]) == 2
    assert "--reset-bn needs --data" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["inspect", "torchvision.models:resnet18", "--build-arg", "num_clases=10"]) == 2
    assert "--build-arg" in capsys.readouterr().err


def test_cli_merge_reset_bn_on_data(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "bnnet.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(32, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    bnnet = importlib.import_module("bnnet")
    ma, mb = bnnet.make(), bnnet.make()
    for m in (ma, mb):
        m[2].running_mean.uniform_(-1, 1)
    save_file(ma.state_dict(), tmp_path / "a.safetensors")
    save_file(mb.state_dict(), tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--model", "bnnet:make",
                 "--data", "digits", "--batch-size", "1000", "--reset-bn", "--out", str(out), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["correction"] == "BatchNorm reset"
    merged = open_checkpoint(out)
    from permgraph.commands import _data

    x, _ = _data("digits")
    hidden = bnnet.make()[:2]
    hidden.load_state_dict({k: merged[k] for k in ("1.weight", "1.bias")}, strict=False)
    with torch.no_grad():
        h = hidden(x)
    # the running mean was recomputed on the data (one batch): the mean of the merged layer's outputs
    assert torch.allclose(merged["2.running_mean"], h.mean(0), atol=1e-4)
