"""Data sources: tensors, datasets, DataLoaders, Hugging Face datasets and plain iterables
become batches of model inputs; shards deal whole batches out to ranks, so the ranks
together read exactly the batches of one process."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import permgraph
from permgraph.data import BatchShardSampler, DataError, batches, pick, shard_of
from permgraph.match import activation_matching

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.arange(23 * 3, dtype=torch.float32).reshape(23, 3)
Y = torch.arange(23)


def _deal(make, world: int) -> list[list]:
    """Each rank's batches, as lists."""
    return [list(make((r, world))) for r in range(world)]


def _interleave(shards: list[list]) -> list:
    out = []
    for i in range(max(len(s) for s in shards)):
        out += [s[i] for s in shards if i < len(s)]
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_tensor_shards_deal_whole_batches(world: int) -> None:
    whole = list(batches(X, batch_size=4, shard=None))
    assert [len(b) for b in whole] == [4, 4, 4, 4, 4, 3]
    assert torch.equal(torch.cat(whole), X)
    shards = _deal(lambda s: batches(X, batch_size=4, shard=s), world)
    assert _same(_interleave(shards), whole)
    for r, s in enumerate(shards):
        assert len(batches(X, batch_size=4, shard=(r, world))) == len(s)


def test_pairs_and_inputs() -> None:
    got = list(batches((X, Y), batch_size=5, shard=(1, 2), inputs=pick(0)))
    assert _same(got, [X[5:10], X[15:20]])
    pairs = list(batches((X, Y), batch_size=10, shard=None))
    assert _same(pairs[2], (X[20:], Y[20:]))


def test_a_dataset_is_batched_by_a_dataloader_with_the_shard_sampler() -> None:
    ds = TensorDataset(X, Y)
    shards = _deal(lambda s: batches(ds, batch_size=4, shard=s, inputs=lambda b: b[0]), 2)
    assert _same(_interleave(shards), list(batches(X, batch_size=4, shard=None)))


def test_a_sequential_dataloader_is_rebuilt_keeping_its_collate_and_drop_last() -> None:
    def collate(items):
        return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    for drop_last in (False, True):
        loader = DataLoader(TensorDataset(X, Y), batch_size=4, collate_fn=collate, drop_last=drop_last)
        shards = _deal(lambda s, loader=loader: batches(loader, shard=s, inputs="x"), 2)
        assert _same(_interleave(shards), [{"x": b["x"]} for b in loader]), drop_last
        assert [len(batches(loader, shard=(r, 2))) for r in range(2)] == [len(s) for s in shards]


def test_a_shuffling_loader_and_a_list_are_dealt_by_position() -> None:
    g = torch.Generator()
    loaders = []
    for _ in range(2):  # each rank seeds its shuffle alike
        g.manual_seed(3)
        loaders.append(list(DataLoader(TensorDataset(X), batch_size=4, shuffle=True, generator=g)))
    assert _same(loaders[0], loaders[1])
    listed = [b[0] for b in loaders[0]]
    shards = _deal(lambda s: batches(listed, shard=s), 3)
    assert _same(_interleave(shards), listed)
    assert [len(batches(listed, shard=(r, 3))) for r in range(3)] == [2, 2, 2]


def test_hugging_face_datasets_formatted_as_torch() -> None:
    datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets extra is not installed")
    ds = datasets.Dataset.from_dict({"input": X.tolist(), "label": Y.tolist(), "text": [f"t{i}" for i in range(23)]})
    whole = list(batches(ds, batch_size=4, shard=None, inputs=["input", "label"]))
    assert len(whole) == 6 and whole[0].keys() == {"input", "label"}
    assert torch.equal(torch.cat([b["input"] for b in whole]), X)
    assert torch.equal(torch.cat([b["label"] for b in whole]), Y)
    shards = _deal(lambda s: batches(ds, batch_size=4, shard=s, inputs=["input"]), 2)
    assert _same(_interleave(shards), [{"input": b["input"]} for b in whole])
    # a model fed through inputs=: the same permutation as from the tensors
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    spec = permgraph.infer(a, X[:2])
    b = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    from_hf = activation_matching(spec, a, b, batches(ds, batch_size=4, shard=None), inputs=lambda r: r["input"])
    from_x = activation_matching(spec, a, b, batches(X, batch_size=4, shard=None))
    assert all(torch.equal(from_hf[g], from_x[g]) for g in from_x)


def test_activation_matching_reads_pairs_through_inputs() -> None:
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    a = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    b = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    spec = permgraph.infer(a, x[:2])
    loader = DataLoader(TensorDataset(x, torch.zeros(96, dtype=torch.long)), batch_size=32)
    got = activation_matching(spec, a, b, loader, inputs=lambda p: p[0])
    want = activation_matching(spec, a, b, [x[i:i + 32] for i in range(0, 96, 32)])
    assert all(torch.equal(got[g], want[g]) for g in want)
    with pytest.raises(permgraph.match.MatchError, match="inputs must be a function"):
        activation_matching(spec, a, b, loader, inputs="x")


def test_bad_sources_and_choices_are_named() -> None:
    with pytest.raises(DataError, match="batch_size"):
        batches(X)
    with pytest.raises(DataError, match="batch_size"):
        batches(X, batch_size=0)
    with pytest.raises(DataError, match="rows"):
        batches((X, Y[:3]), batch_size=2)
    with pytest.raises(DataError, match="cannot read batches"):
        batches(3)
    with pytest.raises(DataError, match="cannot read batches"):
        batches({"x": X})
    with pytest.raises(DataError, match="shard"):
        batches(X, batch_size=2, shard=(2, 2))
    with pytest.raises(DataError, match="shard"):
        shard_of("everything")
    with pytest.raises(DataError, match="inputs"):
        batches(X, batch_size=2, inputs=3)
    with pytest.raises(DataError, match="at least one"):
        pick()
    with pytest.raises(DataError, match="mix"):
        pick("x", 0)
    with pytest.raises(DataError, match="has no 'y'"):
        pick("y")({"x": X})
    with pytest.raises(DataError, match="tuple batches"):
        pick(0)(X)
    with pytest.raises(DataError, match="batch_size"):
        BatchShardSampler(4, 0)
    assert issubclass(DataError, permgraph.PermGraphError)


def test_a_progress_bar_over_batches_without_a_length(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    spec = permgraph.infer(a, X[:2])
    source = batches((x for x in [X[:8], X[8:16]]), shard=None)
    with pytest.raises(TypeError):
        len(source)
    spec.check_permutation(activation_matching(spec, a, a, source, progress=True))
    assert "2batch" in capsys.readouterr().err.replace(" ", "")
