"""``permgraph.align`` and ``permgraph align``: B aligned to A computes what B computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import permgraph
from permgraph.cli import main
from permgraph.examples.digits import make_mlp


def _pair():
    torch.manual_seed(0)
    return make_mlp((64, 32, 32, 10)), make_mlp((64, 32, 32, 10))


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_keeps_b_function_and_moves_it_towards_a(method):
    a, b = _pair()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    aligned, perm = permgraph.align(a, b, x[:2], method=method, batches=[x[:32], x[32:]])
    assert set(perm) == {"0", "2"}
    ref = b(x)
    b.load_state_dict(aligned)
    assert torch.allclose(b(x), ref, atol=1e-5)
    dist = lambda s: sum(float((a.state_dict()[k] - s[k]).norm()) for k in s)  # noqa: E731
    assert dist(aligned) < dist(_pair()[1].state_dict())


def test_align_rejects_unknown_method_and_missing_batches():
    a, b = _pair()
    with pytest.raises(permgraph.PermGraphError, match="method"):
        permgraph.align(a, b, torch.randn(2, 64), method="magic")
    with pytest.raises(permgraph.PermGraphError, match="batches"):
        permgraph.align(a, b, torch.randn(2, 64), method="activation")


def test_cli_align_writes_aligned_weights(tmp_path, capsys):
    torch.manual_seed(0)
    a, b = make_mlp(), make_mlp()
    save_file(a.state_dict(), tmp_path / "a.safetensors")
    save_file(b.state_dict(), tmp_path / "b.safetensors")
    out, perm_out = tmp_path / "b_aligned.safetensors", tmp_path / "perm.safetensors"
    rc = main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--model",
               "permgraph.examples.digits:make_mlp", "--data", "digits", "--out", str(out), "--perm-out", str(perm_out),
               "--quiet", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["group"] for r in report["groups"]] == ["0", "2"]
    assert all(r["distance_after"] < r["distance_before"] for r in report["groups"])
    x = torch.randn(8, 64)
    ref = b(x)
    b.load_state_dict(load_file(out))
    assert torch.allclose(b(x), ref, atol=1e-5)
    assert perm_out.exists()


def test_cli_align_activation_needs_data(tmp_path, capsys):
    torch.manual_seed(0)
    a = make_mlp()
    save_file(a.state_dict(), tmp_path / "a.safetensors")
    rc = main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--model",
               "permgraph.examples.digits:make_mlp", "--input-shape", "2,64", "--method", "activation",
               "--out", str(tmp_path / "o.safetensors"), "--quiet"])
    assert rc == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
