"""Data parallelism over torch.distributed: two gloo ranks under torchrun, each with half the
batches of a digits MLP pair, get what one process gets on all of them (activation matching,
REPAIR, BatchNorm reset), and ranks that disagree raise a named error on every rank instead
of hanging.

The ranks run `tests/distributed_worker.py`; this module writes their inputs, launches them
(with a timeout: a hang fails the test), and compares their results with the single-process
ones computed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import permgraph
from permgraph import distributed as pgdist
from permgraph.examples.digits import load_digits
from permgraph.match import activation_matching, activation_similarity
from permgraph.merge import interpolate, repair, reset_batchnorm
from tests.distributed_worker import build, mlp

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = Path(__file__).with_name("distributed_worker.py")
WIDTHS = (64, 128, 128, 10)
WORLD = 2
LAUNCH_TIMEOUT = 90  # seconds for one torchrun launch (measured: about 12 s on two busy cores)


def _case() -> dict[str, Any]:
    data = load_digits()
    x = data.x_train
    batches = [x[i:i + 64] for i in range(0, len(x), 64)]
    torch.manual_seed(0)
    a = mlp(WIDTHS)
    b = mlp(WIDTHS)
    bn = mlp(WIDTHS, bn=True)
    return {"widths": WIDTHS, "a": a.state_dict(), "b": b.state_dict(), "bn": bn.state_dict(), "batches": batches}


def _launch(scenario: str, case_file: Path, out: Path) -> tuple[list[dict[str, Any]], float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(WORKER), scenario, str(case_file), str(out)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun {scenario} did not finish within {LAUNCH_TIMEOUT} s (a hang):\n{exc.stdout}\n{exc.stderr}")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, f"torchrun {scenario} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return results, seconds


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    path = tmp_path_factory.mktemp("dist") / "case.pt"
    data = _case()
    torch.save(data, path)
    return data, path


@pytest.fixture(scope="module")
def agreeing(case, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("agree")
    results, _ = _launch("agree", case[1], out)
    return results


@pytest.fixture(scope="module")
def disagreeing(case, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("disagree")
    results, seconds = _launch("disagree", case[1], out)
    assert seconds < LAUNCH_TIMEOUT
    return results


@pytest.fixture(scope="module")
def single(case) -> dict[str, Any]:
    """One process on all the batches: what every rank must get."""
    data = case[0]
    a, b = build(data["a"], WIDTHS), build(data["b"], WIDTHS)
    spec = permgraph.infer(a, data["batches"][0][:2])
    out: dict[str, Any] = {"spec": spec}
    out["perm"] = activation_matching(spec, a, b, data["batches"])
    out["covariance"] = activation_similarity(spec, a, b, data["batches"], method="covariance")[0]
    out["cosine"] = activation_similarity(spec, a, b, data["batches"], method="cosine")[0]
    b_aligned = build(spec.apply(out["perm"], b.state_dict()), WIDTHS)
    merged = build(interpolate(a.state_dict(), b_aligned.state_dict(), 0.5), WIDTHS)
    out["repair_batches"] = repair(a, b_aligned, merged, data["batches"], spec, 0.5).batches
    out["repair"] = merged.state_dict()
    bn = build(data["bn"], WIDTHS, bn=True)
    reset_batchnorm(bn, data["batches"])
    out["bn"] = bn.state_dict()
    return out


def _agreement(p: dict[str, torch.Tensor], q: dict[str, torch.Tensor]) -> float:
    same = sum(int((p[g] == q[g]).sum()) for g in p)
    return same / sum(p[g].numel() for g in p)


def test_every_rank_gets_the_single_process_permutation(agreeing, single) -> None:
    for r in agreeing:
        assert r["world"] == WORLD
        for g in single["perm"]:
            assert torch.equal(r["perm"][g], agreeing[0]["perm"][g]), f"rank {r['rank']} differs from rank 0 on {g}"
        assert _agreement(r["perm"], single["perm"]) >= 0.99
        single["spec"].check_permutation(r["perm"])
        # (x, y) pairs with inputs= picking x, and a rank with no batch: the same permutation
        assert _agreement(r["perm_pairs"], single["perm"]) >= 0.99
        assert _agreement(r["perm_uneven"], single["perm"]) >= 0.99
        assert _agreement(r["perm_rank0_empty"], single["perm"]) >= 0.99


def test_half_the_batches_alone_give_another_permutation(agreeing, single) -> None:
    """The reduction is what makes the ranks agree: each rank's own half disagrees."""
    local = [r["perm_local"] for r in agreeing]
    assert min(_agreement(p, single["perm"]) for p in local) < 0.99
    assert _agreement(local[0], local[1]) < 0.99


def test_ranks_centred_on_their_own_shifts_agree_to_float32_rounding(agreeing, case) -> None:
    """Rank 0 without a batch cannot give its shifts: every other rank centres on its own
    first batch, and the sums are re-centred on the global means before they are added."""
    data = case[0]
    a, b = build(data["a"], WIDTHS), build(data["b"], WIDTHS)
    spec = permgraph.infer(a, data["batches"][0][:2])
    others = [x for i, x in enumerate(data["batches"]) if i % WORLD != 0]
    want = activation_similarity(spec, a, b, others, method="covariance")[0]
    for r in agreeing:
        for key, w in want.items():
            torch.testing.assert_close(r["covariance_rank0_empty"][key], w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("method", ["covariance", "cosine"])
def test_summed_similarities_equal_the_single_process_ones(agreeing, single, method: str) -> None:
    for r in agreeing:
        assert r[method].keys() == single[method].keys()
        for key, want in single[method].items():
            # every rank centres its batches on rank 0's first batch means, as one process
            # does: each batch's float32 products are the same, only the float64 sums are
            # added in another order
            torch.testing.assert_close(r[method][key], want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
            assert torch.equal(r[method][key], agreeing[0][method][key])


def test_repair_sets_the_single_process_parameters_on_every_rank(agreeing, single) -> None:
    for r in agreeing:
        assert r["repair_batches"] == single["repair_batches"]
        for key, want in single["repair"].items():
            torch.testing.assert_close(r["repair"][key], want, rtol=1e-5, atol=1e-6, msg=key)
            assert torch.equal(r["repair"][key], agreeing[0]["repair"][key]), key


def test_batchnorm_reset_gives_the_single_process_statistics(agreeing, single, case) -> None:
    for r in agreeing:
        assert r["bn_layers"] == 2
        for key, want in single["bn"].items():
            if key.endswith("num_batches_tracked"):
                assert int(r["bn"][key]) == int(want) == len(case[0]["batches"]), key
            else:
                torch.testing.assert_close(r["bn"][key], want, rtol=1e-6, atol=1e-7, msg=key)
            torch.testing.assert_close(r["sync_bn"][key], r["bn"][key], rtol=0, atol=0, msg=key)
        assert r["sync_bn_forward_restored"]


@pytest.mark.parametrize("step, error, item", [
    ("shapes", "RankMismatchError", "spec"),
    ("weights", "RankMismatchError", "model_b values"),
    ("repair_alpha", "RankMismatchError", "alpha"),
    ("bn_shapes", "RankMismatchError", "model"),
])
def test_ranks_that_disagree_all_raise_a_named_error(disagreeing, step: str, error: str, item: str) -> None:
    for r in disagreeing:
        got = r[step]
        assert got.get("error") == error, (r["rank"], got)
        assert got["item"] == item
        assert got["ranks"] == (WORLD - 1,)
        assert "rank 0" in got["message"] and "same" in got["message"]
        assert got["seconds"] < 10


def test_models_equal_up_to_rounding_warn_and_are_reduced(disagreeing) -> None:
    perms = []
    for r in disagreeing:
        assert "value" in r["drift"], r["drift"]
        assert any(w.startswith("RankDriftWarning") and "model_b bits" in w for w in r["drift_warnings"]), r["drift_warnings"]
        perms.append(r["drift"]["value"])
    assert all(torch.equal(perms[0][g], perms[1][g]) for g in perms[0])


@pytest.mark.parametrize("step", ["failed", "failed_early"])
def test_a_failing_rank_fails_and_the_others_are_told(disagreeing, step: str) -> None:
    own, told = disagreeing[WORLD - 1][step], disagreeing[0][step]
    assert own["error"] == "MatchError" and own["named"]
    assert told["error"] == "RankFailedError" and told["ranks"] == (WORLD - 1,)
    assert own["message"][:40] in told["message"]  # the failing rank's own message is quoted
    assert told["seconds"] < 10


def test_a_rank_that_never_arrives_times_out_instead_of_hanging(disagreeing) -> None:
    got = disagreeing[0]["absent"]
    assert got["error"] == "RankTimeoutError", got
    assert 2.5 < got["seconds"] < 6.0
    assert "timeout=" in got["message"]


# -- single process: nothing changes -------------------------------------------------------

def test_without_torch_distributed_nothing_is_reduced() -> None:
    assert pgdist.resolve_group() is None
    assert pgdist.resolve_group(False) is None
    with pytest.raises(pgdist.DistributedError, match="not initialised"):
        pgdist.resolve_group(object())
    pgdist.agree(None, "nothing")  # no group: returns at once
    t = torch.ones(3)
    pgdist.all_reduce_sum([t], None)
    assert torch.equal(t, torch.ones(3))


def test_state_digest_sees_values_shapes_and_names() -> None:
    base = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    same = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    assert pgdist.state_digest(base) == pgdist.state_digest(same)
    changed = [
        {"w": torch.arange(6.0).reshape(3, 2), "n": torch.tensor(3)},
        {"w": torch.arange(6.0).reshape(2, 3).flip(1), "n": torch.tensor(3)},
        {"w": torch.arange(6.0).reshape(2, 3).double(), "n": torch.tensor(3)},
        {"v": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)},
        {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(4)},
        {"w": torch.arange(6.0).reshape(2, 3).nextafter(torch.tensor(9.0)), "n": torch.tensor(3)},
    ]
    for other in changed:
        assert pgdist.state_digest(other) != pgdist.state_digest(base), other


def test_the_value_fingerprint_tolerates_rounding_only() -> None:
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
    base = pgdist.state_fingerprint(state)
    rounded = pgdist.state_fingerprint({k: v.double().add(1e-9).float() if k == "b" else v for k, v in state.items()})
    nudged = {"w": state["w"].nextafter(torch.tensor(9.0)), "b": state["b"]}
    other = pgdist.state_fingerprint({"w": torch.randn(64, 64, generator=g), "b": state["b"]})
    swapped = pgdist.state_fingerprint({"w": state["w"][[1, 0, *range(2, 64)]], "b": state["b"]})

    def close(x: pgdist.Approx) -> bool:
        return abs(x.value - base.value) <= base.rtol * max(x.scale, base.scale)

    assert close(rounded) and close(pgdist.state_fingerprint(nudged))
    assert pgdist.state_digest(nudged) != pgdist.state_digest(state)  # the bits see it: a warning
    assert not close(other) and not close(swapped)


def test_bad_timeouts_are_named() -> None:
    with pytest.raises(pgdist.DistributedError, match="positive"):
        pgdist._seconds(0)
    with pytest.raises(pgdist.DistributedError, match="seconds"):
        pgdist._seconds("soon")


def test_recentred_statistics_add_up_to_the_whole() -> None:
    """Two halves' statistics, each about its own shift, re-centred and added, are the
    statistics of the whole (what the ranks do)."""
    from permgraph.match import ActivationStats

    g = torch.Generator().manual_seed(0)
    # float64 data: the algebra is checked, not float32 rounding
    xa = torch.randn(300, 5, generator=g, dtype=torch.float64) + 7.0
    xb = torch.randn(300, 5, generator=g, dtype=torch.float64) * 3 - 2
    whole = ActivationStats(5, torch.device("cpu"))
    whole.update(xa, xb)
    halves = [ActivationStats(5, torch.device("cpu")) for _ in range(2)]
    halves[0].update(xa[:100], xb[:100])
    halves[1].update(xa[100:], xb[100:])
    mean_a, mean_b = xa.mean(0), xb.mean(0)
    for h in halves:
        h.recentre(mean_a, mean_b)
    total = ActivationStats(5, torch.device("cpu"))
    total.recentre(mean_a, mean_b)
    total.count = sum(h.count for h in halves)
    for name in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
        setattr(total, name, sum(getattr(h, name) for h in halves))
    for method in ("correlation", "covariance", "cosine"):
        torch.testing.assert_close(total.similarity(method), whole.similarity(method), rtol=1e-9, atol=1e-10)


def test_a_group_of_one_rank_reduces_nothing(tmp_path: Path) -> None:
    """Initialised with a single rank, everything is as in one process (and nothing waits)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert pgdist.init_from_env() is False  # no torchrun environment here
    torch.manual_seed(0)
    a, b = mlp((8, 16, 4)).eval(), mlp((8, 16, 4)).eval()
    spec = permgraph.infer(a, torch.randn(2, 8))
    data = [torch.randn(32, 8) for _ in range(3)]
    want = activation_matching(spec, a, b, data)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert pgdist.resolve_group() is None and pgdist.is_main_process()
        got = activation_matching(spec, a, b, data, timeout=5)
        assert all(torch.equal(got[g], want[g]) for g in want)
        with pytest.raises(pgdist.DistributedError, match="ProcessGroup"):
            activation_matching(spec, a, b, data, process_group="world")
    finally:
        dist.destroy_process_group()


def test_the_command_line_under_torchrun(tmp_path: Path) -> None:
    """`torchrun -m permgraph align --method activation`: the ranks share the data, rank 0 alone
    writes, and the permutation is the single process's."""
    from safetensors.torch import save_file

    from permgraph.cli import main
    from permgraph.io import load_permutation

    case = _case()
    for name in ("a", "b"):
        save_file(case[name], tmp_path / f"{name}.safetensors")
    common = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--model", "permgraph.examples.digits:make_mlp",
              "--build-arg", f"widths={tuple(WIDTHS)}", "--data", "digits", "--method", "activation", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "permgraph",
           "align", *common, "--out", str(tmp_path / "two.safetensors"), "--perm-out", str(tmp_path / "two-perm.safetensors")]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun permgraph align did not finish within {LAUNCH_TIMEOUT} s (a hang):\n{exc.stderr}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("activation matching:") == 1  # rank 0 alone reports
    assert main(["align", *common, "--out", str(tmp_path / "one.safetensors"),
                 "--perm-out", str(tmp_path / "one-perm.safetensors")]) == 0
    spec = permgraph.infer(mlp(WIDTHS), torch.randn(2, WIDTHS[0]))
    two, one = (load_permutation(tmp_path / f"{n}-perm.safetensors", spec) for n in ("two", "one"))
    assert _agreement(two, one) >= 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "one-perm.safetensors",
                                                          "one.safetensors", "two-perm.safetensors", "two.safetensors"]
