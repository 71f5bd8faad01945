"""Activation matching: recovery of a hidden permutation (MLP, resnet18, GPT-2 with its
heads), streaming statistics that do not depend on how the data is batched, a real
alignment of two trained networks, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import permgraph
from permgraph import SpecMismatchError
from permgraph.match import ActivationStats, MatchError, activation_matching, activation_similarity
from tests.helpers import tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()


def _permuted_copy(spec: permgraph.PermSpec, model: nn.Module, seed: int = 0) -> tuple[nn.Module, dict]:
    hidden = spec.random_permutation(torch.Generator().manual_seed(seed))
    other = copy.deepcopy(model)
    other.load_state_dict(spec.apply(hidden, model.state_dict()))
    return other, spec.inverse(hidden)


def _batches(shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(100 + i)) for i in range(count)]


def test_mlp_recovers_the_hidden_permutation_of_every_live_unit() -> None:
    model = _mlp()
    spec = permgraph.infer(model, torch.randn(1, 64))
    other, inverse = _permuted_copy(spec, model)
    batches = _batches((64, 64), 8)
    perm = activation_matching(spec, model, other, batches)
    spec.check_permutation(perm)
    # a unit whose ReLU output never varies (dead on this data) looks like every other dead
    # unit: no data tells them apart. Every other unit must be matched exactly.
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in model if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(torch.cat(batches))
    for h in hooks:
        h.remove()
    for group, act in zip(spec.groups, outputs):
        live = act.std(0) > 0
        assert live.float().mean() > 0.9, f"too few live units in {group.name} for a meaningful test"
        assert torch.equal(perm[group.name][live], inverse[group.name][live]), group.name
    # the live units' weights line up exactly
    aligned = spec.apply(perm, other.state_dict())
    live_rows = outputs[0].std(0) > 0
    assert torch.equal(aligned["0.weight"][live_rows], model.state_dict()["0.weight"][live_rows])


def _resnet18_with_calibrated_norms(batches: list[torch.Tensor]) -> nn.Module:
    """A resnet18 whose BatchNorm statistics are those of the data, as in a trained model
    (a fresh one's identity statistics leave deep units dead on random inputs)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


@pytest.fixture(scope="module")
def calibrated_resnet18() -> tuple[nn.Module, permgraph.PermSpec, list[torch.Tensor]]:
    batches = _batches((8, 3, 32, 32), 4)
    model = _resnet18_with_calibrated_norms(batches)
    return model, permgraph.infer(model, batches[0]), batches


def test_resnet18_recovers_the_hidden_permutation(calibrated_resnet18) -> None:
    model, spec, batches = calibrated_resnet18
    other, inverse = _permuted_copy(spec, model, seed=3)
    # a ragged last batch: another shape than the traced one, traced again behind the scenes
    perm = activation_matching(spec, model, other, batches + [batches[0][:3]])
    for g in spec.groups:
        assert torch.equal(perm[g.name], inverse[g.name]), g.name
    aligned = spec.apply(perm, other.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(aligned[k], v), k


@pytest.mark.parametrize("heads", ["shared", "independent"])
def test_gpt2_recovers_heads_and_within_head_units_from_keyword_batches(heads: str) -> None:
    """Per-head groups (``heads="independent"``) permute inside whatever head the heads
    group brings: they are solved from the joint reading of A's head i and B's head p(i)."""
    model, _, spec = tiny_gpt2(heads=heads)
    assert len(spec.groups) == (9 if heads == "shared" else 21)
    other, inverse = _permuted_copy(spec, model, seed=1)
    batches = [
        {"use_cache": False, "input_ids": torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(i))}
        for i in range(4)
    ]
    perm = activation_matching(spec, model, other, batches)
    heads = [g.name for g in spec.groups if g.size == 4]
    assert heads
    for g in spec.groups:
        assert torch.equal(perm[g.name], inverse[g.name]), g.name


@pytest.mark.parametrize("method", ["covariance", "cosine"])
def test_other_similarities_also_recover(calibrated_resnet18, method: str) -> None:
    model, spec, batches = calibrated_resnet18
    other, inverse = _permuted_copy(spec, model, seed=4)
    perm = activation_matching(spec, model, other, batches, method=method)
    assert all(torch.equal(perm[g.name], inverse[g.name]) for g in spec.groups)


def test_statistics_stream_the_same_whatever_the_batching() -> None:
    model_a, model_b = _mlp(0), _mlp(1)
    spec = permgraph.infer(model_a, torch.randn(1, 64))
    data = torch.randn(96, 64, generator=torch.Generator().manual_seed(7))
    whole, sizes = activation_similarity(spec, model_a, model_b, [data])
    parts, _ = activation_similarity(spec, model_a, model_b, (data[i : i + 32] for i in range(0, 96, 32)))
    assert whole.keys() == parts.keys() == {(g.name,) for g in spec.groups}
    for key in whole:
        assert whole[key].shape == (sizes[key[0]], sizes[key[0]])
        assert torch.allclose(whole[key], parts[key], atol=1e-5)
    # and they are Pearson correlations of the ReLU outputs
    hidden: list[torch.Tensor] = []
    hooks = [model_a[1].register_forward_hook(lambda _m, _i, out: hidden.append(out))]
    hooks.append(model_b[1].register_forward_hook(lambda _m, _i, out: hidden.append(out)))
    with torch.no_grad():
        model_a(data)
        model_b(data)
    for h in hooks:
        h.remove()
    a, b = hidden[0].double(), hidden[1].double()
    corr = torch.corrcoef(torch.cat([a, b], 1).T)[:128, 128:]
    live = (a.std(0) > 0)[:, None] & (b.std(0) > 0)[None, :]
    assert torch.allclose(whole[("0",)][live], corr[live], atol=1e-6)
    assert torch.all(whole[("0",)][~live] == 0)


def test_activation_stats_methods() -> None:
    gen = torch.Generator().manual_seed(0)
    xa = torch.randn(500, 3, generator=gen) * torch.tensor([1.0, 2.0, 3.0]) + 5
    xb = torch.stack([xa[:, 2] * 2, -xa[:, 0], xa[:, 1] + 1], 1)
    stats = ActivationStats(3, torch.device("cpu"))
    stats.update(xa[:200], xb[:200])
    stats.update(xa[200:], xb[200:])
    corr = stats.similarity("correlation")
    assert torch.allclose(corr[0, 1], torch.tensor(-1.0, dtype=torch.float64))
    assert torch.allclose(corr[1, 2], torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(corr[2, 0], torch.tensor(1.0, dtype=torch.float64))
    cov = stats.similarity("covariance")
    ref = torch.cov(torch.cat([xa, xb], 1).T.double(), correction=0)[:3, 3:]
    assert torch.allclose(cov, ref, rtol=1e-5)
    cos = stats.similarity("cosine")
    ref_cos = nn.functional.normalize(xa.double(), dim=0).T @ nn.functional.normalize(xb.double(), dim=0)
    assert torch.allclose(cos, ref_cos, atol=1e-9)


def test_two_trained_mlps_merge_far_better_after_activation_matching() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    data, target = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(data, dtype=torch.float32) / 16.0, torch.tensor(target)

    def train(seed: int) -> nn.Module:
        model = _mlp(seed).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=False)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(150):
            idx = torch.randint(0, len(x), (128,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    model_a, model_b = train(1), train(2)
    spec = permgraph.infer(model_a, x[:4])
    a, b = model_a.state_dict(), model_b.state_dict()

    def midpoint_loss(perm: dict) -> float:
        aligned = spec.apply(perm, b)
        probe = _mlp()
        probe.load_state_dict({k: 0.5 * (a[k] + aligned[k]) for k in a})
        with torch.no_grad():
            return nn.functional.cross_entropy(probe(x), y).item()

    naive = midpoint_loss(spec.identity())
    matched = midpoint_loss(activation_matching(spec, model_a, model_b, x.split(256)))
    assert naive > 0.8
    assert matched < 0.3 * naive, (matched, naive)


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_pair() -> tuple[permgraph.PermSpec, nn.Module, nn.Module]:
    model_a, model_b = _mlp(0), _mlp(1)
    return permgraph.infer(model_a, torch.randn(1, 64)), model_a, model_b


def test_no_batches(mlp_pair) -> None:
    spec, a, b = mlp_pair
    with pytest.raises(MatchError, match="empty"):
        activation_matching(spec, a, b, [])
    with pytest.raises(MatchError, match="empty"):
        activation_matching(spec, a, b, iter(()))


def test_a_single_tensor_is_not_an_iterable_of_batches(mlp_pair) -> None:
    spec, a, b = mlp_pair
    with pytest.raises(MatchError, match=r"wrap it: \[batch\]"):
        activation_matching(spec, a, b, torch.randn(8, 64))


def test_unknown_method(mlp_pair) -> None:
    spec, a, b = mlp_pair
    with pytest.raises(MatchError, match="correlation, covariance, cosine"):
        activation_matching(spec, a, b, [torch.randn(4, 64)], method="euclid")


def test_a_model_of_another_architecture_names_the_key_and_shapes(mlp_pair) -> None:
    spec, a, _ = mlp_pair
    wider = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    with pytest.raises(SpecMismatchError) as info:
        activation_matching(spec, a, wider, [torch.randn(4, 64)])
    msg = str(info.value)
    assert "model_b" in msg and "'0.weight'" in msg and "(256, 64)" in msg and "(128, 64)" in msg


def test_nan_weights_name_the_tensor(mlp_pair) -> None:
    spec, a, b = mlp_pair
    broken = copy.deepcopy(b)
    with torch.no_grad():
        broken[2].bias[5] = float("nan")
    with pytest.raises(SpecMismatchError, match=r"model_b.state_dict\(\)\['2.bias'\] has non-finite"):
        activation_matching(spec, a, broken, [torch.randn(4, 64)])


def test_a_spec_read_back_from_a_dict_drives_activation_matching(mlp_pair) -> None:
    # (this test replaces one that expected an error: a spec from from_dict now gets the
    # model's own analysis, made on the first batch, and its groups matched by members)
    spec, a, b = mlp_pair
    batches = _batches((16, 64), 4)
    want = activation_matching(spec, a, b, batches)
    loaded = permgraph.PermSpec.from_dict(spec.to_dict())
    assert loaded.analysis is None
    got = activation_matching(loaded, a, b, iter(batches))  # a one-pass iterable: the first batch is put back
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert loaded.analysis is None  # nothing was written into the spec
    # group names are the spec's, whatever the analysis calls them
    data = spec.to_dict()
    for i, g in enumerate(data["groups"]):
        g["name"] = f"hidden{i}"
    renamed = permgraph.PermSpec.from_dict(data)
    got = activation_matching(renamed, a, b, batches)
    assert all(torch.equal(got[f"hidden{i}"], want[g.name]) for i, g in enumerate(spec.groups))
    # a spec of another architecture whose keys and shapes happen to fit is refused by name
    data["groups"][0]["members"] = data["groups"][0]["members"][:1]
    with pytest.raises(SpecMismatchError, match="hidden0"):
        activation_matching(permgraph.PermSpec.from_dict(data), a, b, batches)


class _Branchy(nn.Module):
    """A forward that branches on the data: torch.export cannot trace it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h if float(h.sum()) > 0 else -h)


def test_an_untraceable_model_says_weight_matching_still_works() -> None:
    torch.manual_seed(0)
    a, b = _Branchy(), _Branchy()
    members = (permgraph.Member("fc1.weight", 0), permgraph.Member("fc1.bias", 0), permgraph.Member("fc2.weight", 1))
    spec = permgraph.PermSpec((permgraph.Group("fc1", 8, members),),
                              shapes={k: tuple(v.shape) for k, v in a.state_dict().items()})
    with pytest.raises(permgraph.UntraceableModelError, match="weight_matching"):
        activation_matching(spec, a, b, [torch.randn(4, 4)])
    spec.check_permutation(permgraph.weight_matching(spec, a.state_dict(), b.state_dict()))


def test_batches_of_any_size_share_one_export_with_a_dynamic_batch_dimension(mlp_pair) -> None:
    from permgraph.runner import runner_for

    spec, a, b = mlp_pair  # traced on a batch of one
    batches = [torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) for n in (16, 7, 5, 16, 3)]
    whole = activation_similarity(spec, a, b, [torch.cat(batches)])[0]
    parts = activation_similarity(spec, a, b, batches)[0]
    assert all(torch.allclose(whole[k], parts[k], atol=1e-5) for k in whole)
    runner = runner_for(a)
    assert runner._dynamic and not runner._static  # one dynamic export served every size


def test_batches_unlike_the_example_inputs(mlp_pair) -> None:
    spec, a, b = mlp_pair
    with pytest.raises(MatchError, match="structured differently"):
        activation_matching(spec, a, b, [{"x": torch.randn(4, 64)}])


def test_models_are_left_as_they_were(mlp_pair) -> None:
    spec, a, b = mlp_pair
    a.train()
    before = copy.deepcopy(b.state_dict())
    activation_matching(spec, a, b, [torch.randn(4, 64)])
    assert a.training and not b.training
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    a.eval()


def test_progress_bar(mlp_pair, capsys: pytest.CaptureFixture[str]) -> None:
    spec, a, b = mlp_pair
    perm = activation_matching(spec, a, b, [torch.randn(16, 64) for _ in range(3)], progress=True)
    spec.check_permutation(perm)
    assert "activation matching" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models(mlp_pair) -> None:  # pragma: no cover - runs where a GPU is present
    spec, a, _ = mlp_pair
    model = copy.deepcopy(a).cuda()
    other, inverse = _permuted_copy(spec, model)
    perm = activation_matching(spec, model, other, [torch.randn(256, 64) for _ in range(4)])
    aligned = spec.apply(perm, other.state_dict())
    assert all(v.device.type == "cuda" for v in aligned.values())


def test_outside_torch_distributed_the_new_arguments_change_nothing(mlp_pair) -> None:
    from permgraph.distributed import DistributedError

    spec, a, b = mlp_pair
    batches = _batches((32, 64), 3)
    base = activation_matching(spec, a, b, batches)
    local = activation_matching(spec, a, b, batches, process_group=False, timeout=5)
    picked = activation_matching(spec, a, b, [(x, None) for x in batches], inputs=lambda p: p[0])
    assert all(torch.equal(base[g], local[g]) and torch.equal(base[g], picked[g]) for g in base)
    with pytest.raises(DistributedError, match="not initialised"):
        activation_matching(spec, a, b, batches, process_group=object())
