"""Data as users have it: batches for the data-driven steps, and each rank's shard of them.

:func:`activation_matching`, :func:`~permgraph.merge.repair` and
:func:`~permgraph.merge.reset_batchnorm` take any re-iterable of batches, each what the
model's forward takes (a Tensor, a tuple of positional arguments, a dict of keyword
arguments), and ``inputs=`` to pick those out of a richer batch. :func:`pick` builds such an
``inputs`` function; :func:`batches` turns a tensor, a dataset (a ``torch.utils.data.Dataset``,
a Hugging Face ``datasets.Dataset``, optional) or a ``DataLoader`` into batches, by default
only this rank's share of them under ``torch.distributed``.

Sharding is by **whole batches**: the batches one process would read are dealt out, batch
``i`` to rank ``i % world``. Every batch is then the same as in one process, which the
statistics of BatchNorm reset and REPAIR need (they depend on how samples are grouped into
batches), and no sample is read twice. ``torch.utils.data.DistributedSampler`` does neither:
it deals out samples and pads the shards by repeating samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler

from permgraph.errors import (
    DataError,
    )

__all__ = ["DataError", "pick", "shard_of", "BatchShardSampler", "Batches", "batches"]


def pick(*keys: str | int) -> Callable[[Any], Any]:
    """An ``inputs=`` function that picks the model's inputs out of each batch.

    Args:
        *keys: strings pick keyword arguments out of a dict batch (a dict of them is
            returned); integers pick positional arguments out of a tuple batch (one integer:
            that element alone, several: a tuple of them).

    Returns:
        The function of a batch.

    Raises:
        DataError: no keys, or strings and integers mixed; at call time, a key the batch
            lacks (the batch's keys are named).

    Examples:
        >>> import torch
        >>> from permgraph.data import pick
        >>> batch = {"input_ids": torch.ones(2, 3), "label": torch.zeros(2)}
        >>> sorted(pick("input_ids")(batch))
        ['input_ids']
        >>> pick(0)((torch.ones(2), torch.zeros(2))).tolist()
        [1.0, 1.0]
    """
    if not keys:
        raise DataError("pick() needs at least one key (a column name) or position")
    if all(isinstance(k, str) for k in keys):
        names = tuple(str(k) for k in keys)

        def by_name(batch: Any) -> dict[str, Any]:
            if not hasattr(batch, "keys"):
                raise DataError(f"pick{names} expects dict batches, got {type(batch).__name__}")
            absent = [k for k in names if k not in batch]
            if absent:
                raise DataError(f"the batch has no {absent[0]!r}; its keys are {sorted(map(str, batch.keys()))}")
            return {k: batch[k] for k in names}

        return by_name
    if all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
        where = tuple(int(k) for k in keys)

        def by_position(batch: Any) -> Any:
            if not isinstance(batch, (tuple, list)):
                raise DataError(f"pick{where} expects tuple batches, got {type(batch).__name__}")
            if max(where) >= len(batch) or min(where) < -len(batch):
                raise DataError(f"pick{where}: the batch has {len(batch)} elements")
            got = tuple(batch[i] for i in where)
            return got[0] if len(got) == 1 else got

        return by_position
    raise DataError(f"pick() takes column names or positions, not a mix: {keys!r}")


def shard_of(shard: Any = "auto") -> tuple[int, int]:
    """``(rank, world)``: which share of the batches this process reads.

    Args:
        shard: ``"auto"``: this rank's share under ``torch.distributed`` (the default
            group), else everything; ``None``: everything; ``(rank, world)``: explicit.

    Returns:
        ``(rank, world)``, ``(0, 1)`` for everything.

    Raises:
        DataError: anything else, or a rank outside ``[0, world)``.

    Examples:
        >>> from permgraph.data import shard_of
        >>> shard_of(), shard_of(None), shard_of((1, 4))
        ((0, 1), (0, 1), (1, 4))
    """
    if shard is None:
        return 0, 1
    if isinstance(shard, str) and shard == "auto":
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if (isinstance(shard, (tuple, list)) and len(shard) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
        rank, world = int(shard[0]), int(shard[1])
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"shard=(rank, world) needs 0 <= rank < world, got {tuple(shard)}")
        return rank, world
    raise DataError(f"shard must be 'auto', None or a (rank, world) pair, got {shard!r}")


class BatchShardSampler(Sampler[list[int]]):
    """A batch sampler that deals whole batches out to ranks: the indices ``0..n-1`` in
    order, cut into batches of ``batch_size`` (the last one may be short), batch ``i`` to
    rank ``i % world``. Use it as a ``DataLoader``'s ``batch_sampler``.

    Args:
        n: the dataset's length.
        batch_size: samples per batch.
        rank: this rank (default: from ``torch.distributed``, else 0).
        world: the number of ranks (default: from ``torch.distributed``, else 1).

    Examples:
        >>> from permgraph.data import BatchShardSampler
        >>> list(BatchShardSampler(10, 3, rank=1, world=2))
        [[3, 4, 5], [9]]
    """

    def __init__(self, n: int, batch_size: int, *, rank: int | None = None, world: int | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if n < 0:
            raise DataError(f"the dataset's length must be >= 0, got {n}")
        auto_rank, auto_world = shard_of("auto")
        self.rank, self.world = shard_of((auto_rank if rank is None else rank, auto_world if world is None else world))
        self.n, self.batch_size = int(n), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.rank, math.ceil(self.n / self.batch_size), self.world):
            yield list(range(i * self.batch_size, min((i + 1) * self.batch_size, self.n)))

    def __len__(self) -> int:
        total = math.ceil(self.n / self.batch_size)
        return max(0, (total - self.rank + self.world - 1) // self.world)


class Batches:
    """A re-iterable of model inputs: each batch of ``source`` this rank reads, passed
    through ``inputs``.

    Attributes:
        source: what is iterated (a DataLoader, a list, ...).
        rank: this rank.
        world: the number of ranks.
        skip: whether ``source`` yields every batch and this rank keeps batch ``i`` when
            ``i % world == rank`` (otherwise ``source`` yields this rank's batches only).
    """

    def __init__(self, source: Iterable[Any], *, inputs: Callable[[Any], Any] | None = None,
                 rank: int = 0, world: int = 1, skip: bool = False) -> None:
        self.source, self.inputs, self.rank, self.world, self.skip = source, inputs, rank, world, skip

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.source):
            if self.skip and i % self.world != self.rank:
                continue
            yield self.inputs(batch) if self.inputs is not None else batch

    def __len__(self) -> int:
        n = len(self.source)  # type: ignore[arg-type]  # TypeError when it has none, as for any iterable
        return max(0, (n - self.rank + self.world - 1) // self.world) if self.skip else n


def _is_hf(source: Any) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(source, datasets.Dataset)


class _HFBatches:
    """Batches of a Hugging Face ``datasets.Dataset`` formatted as torch, read by index
    lists (``ds[[i, j, ...]]`` gives a dict of stacked tensors)."""

    def __init__(self, dataset: Any, sampler: BatchShardSampler) -> None:
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[Any]:
        for idx in self.sampler:
            yield self.dataset[idx]

    def __len__(self) -> int:
        return len(self.sampler)


def batches(
    source: Any,
    *,
    batch_size: int | None = None,
    inputs: Callable[[Any], Any] | Sequence[str] | str | None = None,
    shard: Any = "auto",
    **loader_kwargs: Any,
) -> Batches:
    """This rank's batches of ``source``, as the data-driven steps take them.

    Args:
        source: one of
            - a Tensor (rows are samples) or a tuple of Tensors (``(x, y)``: batches are tuples);
            - a map-style ``torch.utils.data.Dataset`` (``len`` and indexing), batched by a
              ``DataLoader`` (``loader_kwargs``: ``collate_fn``, ``num_workers``, ...);
            - a Hugging Face ``datasets.Dataset`` (formatted as torch here if it is not);
            - a ``DataLoader`` over a map-style dataset without shuffling: rebuilt with a
              :class:`BatchShardSampler` (its ``collate_fn``, workers and pinning kept);
            - any other iterable of batches (a list, a generator function's result, a
              shuffling or iterable-dataset ``DataLoader``): every rank iterates it and keeps
              its batches, so it must yield the same batches in the same order on every
              rank (seed a shuffle alike).
        batch_size: samples per batch; needed for tensors and datasets.
        inputs: picks the model's inputs out of each batch: a function, a column name or a
            list of them (:func:`pick`).
        shard: ``"auto"`` (default): under ``torch.distributed``, this rank's share (batch
            ``i`` to rank ``i % world``), else everything; ``None``: everything; or
            ``(rank, world)``.
        **loader_kwargs: passed to the ``DataLoader`` built for a dataset.

    Returns:
        A re-iterable :class:`Batches` (with a length where the source has one).

    Raises:
        DataError: ``batch_size`` missing or not positive for a tensor or dataset, a bad
            ``shard`` or ``inputs``, or a source that is not iterable.

    Examples:
        >>> import torch
        >>> from permgraph.data import batches
        >>> x = torch.arange(10.0).reshape(10, 1)
        >>> [b.flatten().tolist() for b in batches(x, batch_size=4, shard=(1, 2))]
        [[4.0, 5.0, 6.0, 7.0]]
        >>> len(batches(x, batch_size=4))
        3
    """
    rank, world = shard_of(shard)
    if isinstance(inputs, str):
        inputs = pick(inputs)
    elif isinstance(inputs, (list, tuple)):
        inputs = pick(*inputs)
    elif inputs is not None and not callable(inputs):
        raise DataError(f"inputs must be a function, a column name or a list of them, got {type(inputs).__name__}")

    def need_size() -> int:
        if batch_size is None or isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer to batch a {type(source).__name__}, got {batch_size!r}")
        return batch_size

    if isinstance(source, torch.Tensor) or (
            isinstance(source, tuple) and source and all(isinstance(t, torch.Tensor) for t in source)):
        size = need_size()
        tensors = (source,) if isinstance(source, torch.Tensor) else source
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise DataError(f"the tensors have different numbers of rows: {[len(t) for t in tensors]}")
        sampler = BatchShardSampler(n, size, rank=rank, world=world)
        if isinstance(source, torch.Tensor):
            rows: Iterable[Any] = _Rows(lambda idx: source[idx[0]:idx[-1] + 1], sampler)
        else:
            rows = _Rows(lambda idx: tuple(t[idx[0]:idx[-1] + 1] for t in tensors), sampler)
        return Batches(rows, inputs=inputs, rank=rank, world=world)
    if _is_hf(source):
        size = need_size()
        ds = source if source.format.get("type") == "torch" else source.with_format("torch")
        return Batches(_HFBatches(ds, BatchShardSampler(len(ds), size, rank=rank, world=world)),
                       inputs=inputs, rank=rank, world=world)
    if isinstance(source, DataLoader):
        if (world > 1 and not isinstance(source.dataset, IterableDataset) and isinstance(source.sampler, SequentialSampler)
                and source.batch_size is not None):
            loader = DataLoader(
                source.dataset,
                batch_sampler=_DropLast(BatchShardSampler(len(source.dataset), source.batch_size, rank=rank, world=world),
                                        len(source.dataset), source.batch_size, source.drop_last),
                collate_fn=source.collate_fn, num_workers=source.num_workers, pin_memory=source.pin_memory,
                worker_init_fn=source.worker_init_fn, timeout=source.timeout,
            )
            return Batches(loader, inputs=inputs, rank=rank, world=world)
        return Batches(source, inputs=inputs, rank=rank, world=world, skip=world > 1)
    if isinstance(source, Dataset) and not isinstance(source, IterableDataset) and hasattr(source, "__len__"):
        size = need_size()
        loader = DataLoader(source, batch_sampler=BatchShardSampler(len(source), size, rank=rank, world=world),  # type: ignore[arg-type]
                            **loader_kwargs)
        return Batches(loader, inputs=inputs, rank=rank, world=world)
    if isinstance(source, (str, bytes, dict)) or not isinstance(source, Iterable):
        raise DataError(
            f"cannot read batches from a {type(source).__name__}: pass a Tensor, a Dataset, a DataLoader or an "
            "iterable of batches (wrap a single batch in a list)"
        )
    return Batches(source, inputs=inputs, rank=rank, world=world, skip=world > 1)


class _Rows:
    """Slices of tensors by the index lists of a batch sampler (consecutive indices)."""

    def __init__(self, take: Callable[[list[int]], Any], sampler: BatchShardSampler) -> None:
        self.take, self.sampler = take, sampler

    def __iter__(self) -> Iterator[Any]:
        for idx in self.sampler:
            yield self.take(idx)

    def __len__(self) -> int:
        return len(self.sampler)


class _DropLast(Sampler[list[int]]):
    """A batch sampler without the short last batch when the loader it replaces dropped it."""

    def __init__(self, inner: BatchShardSampler, n: int, batch_size: int, drop_last: bool) -> None:
        self.inner, self.full, self.drop = inner, n // batch_size, drop_last

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.inner:
            if self.drop and len(idx) < self.inner.batch_size:
                continue
            yield idx

    def __len__(self) -> int:
        if not self.drop:
            return len(self.inner)
        return max(0, (self.full - self.inner.rank + self.inner.world - 1) // self.inner.world)
