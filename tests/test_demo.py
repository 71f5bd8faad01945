"""The digits demo reproduces Git Re-Basin's headline result, and the demo, barrier and export
commands work end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from permgraph.cli import main
from permgraph.examples.demo import DemoResult, run_demo
from permgraph.examples.digits import evaluator, load_digits, make_mlp
from permgraph.io import load_permutation
from permgraph.match import weight_matching
from permgraph.metrics import fixed_points, interpolation_curve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo() -> DemoResult:
    return run_demo(progress=False)


def _halves(aligned: float, naive: float) -> bool:
    """The issue's criterion: alignment at least halves the loss barrier."""
    return aligned <= 0.5 * naive


def test_alignment_at_least_halves_the_loss_barrier(demo: DemoResult) -> None:
    naive = demo.loss_barrier["naive"]
    assert naive > 0.1, demo.loss_barrier  # two independent MLPs: a real barrier
    for method in ("weight_matching", "activation_matching"):
        assert _halves(demo.loss_barrier[method], naive), (method, demo.loss_barrier)
        assert demo.accuracy_barrier[method] < demo.accuracy_barrier["naive"], demo.accuracy_barrier
    # the endpoints are good models
    c = demo.curves["naive"]
    assert c.accuracy[0] > 0.95 and c.accuracy[-1] > 0.95


def test_identity_and_random_permutations_fail_the_criterion(demo: DemoResult) -> None:
    spec, a, b = demo.spec, demo.states["a"], demo.states["b"]
    evaluate = evaluator(make_mlp(), load_digits().x_test, load_digits().y_test)
    naive = demo.loss_barrier["naive"]
    unmoved = spec.apply(spec.identity(), b)
    assert unmoved.keys() == b.keys() and all(torch.equal(unmoved[k], b[k]) for k in b)  # the identity moves nothing
    direct = interpolation_curve(a, b, evaluate, 11).loss_barrier  # recomputed from B itself, not through the demo
    assert direct == pytest.approx(naive, abs=1e-6)  # so the demo's naive barrier is B's unpermuted one
    assert not _halves(direct, naive)
    random = spec.random_permutation(torch.Generator().manual_seed(0))
    shuffled = interpolation_curve(a, spec.apply(random, b), evaluate, 11).loss_barrier
    assert not _halves(shuffled, naive), (shuffled, naive)


def test_demo_result_json_and_report(demo: DemoResult) -> None:
    d = json.loads(demo.to_json())
    for key in ("loss_barrier", "accuracy_barrier"):
        assert set(d[key]) == {"naive", "weight_matching", "activation_matching"}
        assert all(isinstance(v, float) for v in d[key].values())
    assert d["loss_barrier"] == demo.loss_barrier
    assert d["fixed_point_fraction"] == fixed_points(demo.permutations["weight_matching"],
                                                     demo.permutations["activation_matching"]).overall
    assert 0.0 <= d["fixed_point_fraction"] <= 1.0
    assert 0 < d["seconds"] < 60
    assert d["groups"] == {"0": 512, "2": 512}
    text = str(demo)
    for label in ("naive", "weight matching", "activation matching", "fixed points", "done in"):
        assert label in text
    assert f"{demo.loss_barrier['naive']:.4f}" in text


def test_demo_command_prints_json_and_saves_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plot = tmp_path / "curves.png"
    rc = main(["demo", "--json", "--quiet", "--epochs", "1", "--hidden", "32", "--alphas", "3",
               "--plot", str(plot), "--save-dir", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert rc == 0
    d = json.loads(out)
    assert set(d["loss_barrier"]) == {"naive", "weight_matching", "activation_matching"}
    assert set(d["accuracy_barrier"]) == {"naive", "weight_matching", "activation_matching"}
    assert isinstance(d["fixed_point_fraction"], float) and isinstance(d["seconds"], float)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert saved == ["a.safetensors", "b.safetensors", "perm_activation_matching.safetensors",
                     "perm_weight_matching.safetensors"]


def test_demo_plot_without_matplotlib_fails_first(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    called = []
    monkeypatch.setattr("permgraph.examples.demo.run_demo", lambda **kw: called.append(kw))
    rc = main(["demo", "--quiet", "--plot", str(tmp_path / "x.png")])
    assert rc == 2 and not called  # refused before training
    assert "pip install matplotlib" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "matplotlib")
    rc = main(["demo", "--quiet", "--plot", str(tmp_path / "no" / "x.png")])
    assert rc == 2 and not called
    assert "does not exist" in capsys.readouterr().err


def test_export_and_barrier_commands(demo: DemoResult, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    demo.save(tmp_path)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    torch.save(demo.states["b"], tmp_path / "b.pt")
    out = str(tmp_path / "perm.safetensors")
    common = ["--model", "permgraph.examples.digits:make_mlp", "--quiet", "--json"]
    assert main(["export", a, b, *common, "--data", "digits", "--out", out,
                 "--aligned", str(tmp_path / "b_aligned.safetensors")]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert {r["group"]: r["size"] for r in exported["groups"]} == {"0": 512, "2": 512} and exported["moved_fraction"] > 0.9
    perm = load_permutation(out, demo.spec)
    expected = weight_matching(demo.spec, demo.states["a"], demo.states["b"], seed=0)
    assert all(torch.equal(perm[g], expected[g]) for g in demo.spec.names)

    assert main(["barrier", a, str(tmp_path / "b.pt"), *common, "--data", "digits", "--perm", out, "--alphas", "11"]) == 0
    res = json.loads(capsys.readouterr().out)
    # the same curves as the demo's, up to float summation order (the demo runs on one thread)
    assert res["loss_barrier"]["naive"] == pytest.approx(demo.loss_barrier["naive"], abs=1e-6)
    assert res["loss_barrier"]["aligned"] == pytest.approx(demo.loss_barrier["weight_matching"], abs=1e-6)
    assert res["correction"] == "none"

    # REPAIR through the command line, on a safetensors data file, with a text report
    data = load_digits()
    from safetensors.torch import save_file

    save_file({"x": data.x_test.contiguous(), "y": data.y_test.contiguous()}, tmp_path / "data.safetensors")
    assert main(["barrier", a, b, "--model", "permgraph.examples.digits:make_mlp", "--quiet", "--data",
                 str(tmp_path / "data.safetensors"), "--align", "weight", "--repair", "--alphas", "3"]) == 0
    text = capsys.readouterr().out
    assert "correction: REPAIR" in text and "weight matching" in text and "naive" in text


def test_commands_report_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec_model = ["--model", "permgraph.examples.digits:make_mlp", "--quiet"]
    assert main(["barrier", str(tmp_path / "nope.pt"), "x", *spec_model, "--data", "digits"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3, 64)}, tmp_path / "d.safetensors")
    torch.save(make_mlp().state_dict(), tmp_path / "m.pt")
    m = str(tmp_path / "m.pt")
    assert main(["barrier", m, m, *spec_model, "--data", str(tmp_path / "d.safetensors")]) == 2
    assert "tensors named 'x' (inputs) and 'y'" in capsys.readouterr().err
    assert main(["barrier", m, m, *spec_model, "--data", "digits", "--repair", "--reset-bn"]) == 2
    assert "not allowed with" in capsys.readouterr().err
    torch.save(make_mlp((64, 32, 10)).state_dict(), tmp_path / "small.pt")
    assert main(["export", m, str(tmp_path / "small.pt"), *spec_model, "--data", "digits",
                 "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "checkpoint B" in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()


def test_the_core_imports_neither_scikit_learn_nor_the_demo() -> None:
    """``import permgraph`` (and its CLI module) loads no training loop and no scikit-learn:
    the demo and its data live in ``permgraph.examples``."""
    import subprocess

    code = ("import sys, permgraph, permgraph.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn' "
            "or m.startswith(('permgraph.examples', 'permgraph.demo'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout
    # the negative control: the demo does pull them in
    code = code.replace("permgraph.cli;", "permgraph.cli, permgraph.examples.demo, permgraph.examples.digits as d; d.load_digits();")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert "sklearn" in out.stdout and "permgraph.examples.demo" in out.stdout


def test_the_old_demo_module_warns_and_re_exports() -> None:
    import permgraph.demo as old
    import permgraph.examples.demo as new_demo
    import permgraph.examples.digits as new_digits

    with pytest.warns(DeprecationWarning, match="import make_mlp from permgraph.examples.digits"):
        assert old.make_mlp is new_digits.make_mlp
    with pytest.warns(DeprecationWarning, match="import run_demo from permgraph.examples.demo"):
        from permgraph.demo import run_demo as old_run
    assert old_run is new_demo.run_demo
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        old.nothing  # noqa: B018
