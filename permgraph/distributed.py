"""Statistics summed over ``torch.distributed``: data parallelism for the data-driven steps.

Activation matching, REPAIR and BatchNorm reset reduce data to fixed-size statistics (per
unit sums, cross-products of units); sums add across processes. When ``torch.distributed``
is initialised, each process streams its own shard of the batches, the statistics (never
the activations) are summed over the process group, and every rank solves the same
problem: the result is the one a single process gets on all the batches, up to the order
of float summation.

What crosses the wire, per call: a fixed-size handshake (1 KiB per rank) before the data
is read and another after it, then the statistics, in buckets of at most
``BUCKET_BYTES``. The handshake makes disagreements loud instead of silent or hanging:

- every rank states what it is about to reduce (the call, its options, the spec, the
  models' state_dicts, the statistics' shapes); a rank that differs raises
  :class:`RankMismatchError` on **every** rank, naming the ranks and what differs. Models
  are compared by structure (names, shapes, dtypes: exactly) and by values (a fingerprint,
  to a relative ``1e-4``: another model is an error); models equal only up to float
  rounding give a :class:`RankDriftWarning` and are reduced;
- a rank whose own work fails (bad data, a shape error) tells the others, which raise
  :class:`RankFailedError` with its message while it raises its own error;
- a rank that never arrives (it took another code path, it died) makes the others raise
  :class:`RankTimeoutError` after ``timeout`` instead of waiting forever.

After an error the process group may hold an unfinished collective: tear it down
(``torch.distributed.destroy_process_group()``) rather than reuse it.

The functions here are the building blocks; users call the matchers and merge functions,
which take ``process_group=`` (``None``: the default group when ``torch.distributed`` is
initialised; ``False``: keep the statistics local) and ``timeout=``.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch

from permgraph._digests import Approx, digest, model_items, state_digest, state_fingerprint
from permgraph.errors import (
    DistributedError,
    RankDriftWarning,
    RankFailedError,
    RankMismatchError,
    RankTimeoutError,
)

__all__ = [
    "DistributedError",
    "RankMismatchError",
    "RankFailedError",
    "RankTimeoutError",
    "DEFAULT_TIMEOUT",
    "BUCKET_BYTES",
    "resolve_group",
    "rank_and_size",
    "init_from_env",
    "is_main_process",
    "RankDriftWarning",
    "Approx",
    "digest",
    "state_digest",
    "state_fingerprint",
    "model_items",
    "agree",
    "all_reduce_sum",
]

#: How long a rank waits for the others at a handshake or a reduction (torch's own default
#: for gloo process groups).
DEFAULT_TIMEOUT = timedelta(minutes=30)
#: The largest buffer one all-reduce sends; larger statistics go in several.
BUCKET_BYTES = 64 << 20

_SLOTS = 24  # handshake slots per call
_HEAD = 24  # status, slots used, which slots hold Approx items
_MESSAGE = 1024 - _HEAD - 8 * _SLOTS  # bytes of a failing rank's message
_OK, _FAILED = 1, 2


# -- groups -----------------------------------------------------------------------------

def resolve_group(process_group: Any = None) -> Any:
    """The process group to sum statistics over, or ``None`` to keep them local.

    Args:
        process_group: ``None``: the default group when ``torch.distributed`` is
            initialised (else none); ``False``: none; or a ``ProcessGroup`` this rank belongs to.

    Returns:
        The group, or ``None`` when there is nothing to reduce (no distributed run, a group of
        one rank, or ``False``).

    Raises:
        DistributedError: a process group was passed but ``torch.distributed`` is not
            initialised, the argument is not a process group, or this rank is not a member.

    Examples:
        >>> from permgraph.distributed import resolve_group
        >>> resolve_group() is None  # a single process: nothing to reduce
        True
    """
    if process_group is False:
        return None
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise DistributedError(
                "a process_group was passed but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun sets up the environment), or drop process_group"
            )
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, dist.ProcessGroup):
        raise DistributedError(
            f"process_group must be a torch.distributed ProcessGroup, None (the default group) or False "
            f"(no reduction), got {type(process_group).__name__}"
        )
    if dist.get_rank(group) < 0:
        raise DistributedError(
            f"this rank (global rank {dist.get_rank()}) is not a member of the process group passed; pass a group "
            "it belongs to, or process_group=False on ranks that do not take part"
        )
    return group if dist.get_world_size(group) > 1 else None


def rank_and_size(group: Any) -> tuple[int, int]:
    """This rank and the number of ranks in ``group`` (``(0, 1)`` for ``None``)."""
    if group is None:
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def init_from_env(backend: str | None = None, *, timeout: float | timedelta | None = None) -> bool:
    """Initialise ``torch.distributed`` from the environment ``torchrun`` sets, if it is set.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available (each rank
            then uses the GPU ``LOCAL_RANK``), else gloo.
        timeout: the process group's timeout (default ``DEFAULT_TIMEOUT``).

    Returns:
        Whether this process now runs as one rank of several (``False``: no ``torchrun``
        environment, or a single rank; nothing was initialised).

    Raises:
        DistributedError: ``torch.distributed`` is not available in this build of torch.

    Examples:
        >>> from permgraph.distributed import init_from_env
        >>> init_from_env()  # not under torchrun
        False
    """
    import os

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE is set but this build of torch has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=_seconds(timeout))
    return True


def is_main_process(process_group: Any = None) -> bool:
    """Whether this process is rank 0 of ``process_group`` (or not distributed at all):
    the one that writes files and prints reports.

    Examples:
        >>> from permgraph.distributed import is_main_process
        >>> is_main_process()
        True
    """
    return rank_and_size(resolve_group(process_group))[0] == 0


def _seconds(timeout: float | timedelta | None) -> timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, timedelta):
        return timeout
    try:
        value = float(timeout)
    except (TypeError, ValueError) as exc:
        raise DistributedError(f"timeout must be a number of seconds or a timedelta, got {type(timeout).__name__}") from exc
    if not value > 0:
        raise DistributedError(f"timeout must be positive, got {timeout!r}")
    return timedelta(seconds=value)


def _backends(group: Any) -> str:
    try:
        return str(torch.distributed.get_backend(group)).lower()
    except Exception:  # noqa: BLE001 - an unnamed backend: assume it takes CPU tensors
        return "gloo"


def _wire_device(group: Any) -> torch.device:
    """The device ``group``'s collectives run on: this rank's current CUDA device when the
    backend is NCCL (alone or beside gloo), else the CPU. It depends on the backend only,
    never on where a rank's tensors happen to be, so every rank sends alike."""
    backend = _backends(group)
    if ("nccl" in backend or "cuda:" in backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _wait(work: Any, group: Any, timeout: timedelta, what: str) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as exc:  # gloo/nccl report timeouts and lost peers as RuntimeError
        rank, size = rank_and_size(group)
        text = str(exc)
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise RankTimeoutError(
                f"rank {rank} of {size} waited {timeout.total_seconds():g} s at {what} and some rank never arrived: "
                "every rank must make the same calls with the same process group (a rank that skipped the call, "
                "or crashed before it?); pass timeout= to wait longer for slow shards"
            ) from exc
        raise DistributedError(f"rank {rank} of {size}: the collective at {what} failed ({text.splitlines()[0] if text else exc!r}); "
                               "did another rank exit?") from exc


# -- the handshake ----------------------------------------------------------------------

def _pack(status: int, values: Sequence[int], approx: int, message: str) -> torch.Tensor:
    raw = message.encode("utf-8")[:_MESSAGE - 2]
    buf = bytearray(1024)
    struct.pack_into("<qqq", buf, 0, status, len(values), approx)
    for i, v in enumerate(values[:_SLOTS]):
        struct.pack_into("<q", buf, _HEAD + 8 * i, v)
    base = _HEAD + 8 * _SLOTS
    struct.pack_into("<H", buf, base, len(raw))
    buf[base + 2:base + 2 + len(raw)] = raw
    return torch.frombuffer(buf, dtype=torch.int64).clone()


def _unpack(t: torch.Tensor) -> tuple[int, list[int], int, str]:
    buf = t.cpu().numpy().tobytes()
    status, count, approx = struct.unpack_from("<qqq", buf, 0)
    values = [struct.unpack_from("<q", buf, _HEAD + 8 * i)[0] for i in range(min(count, _SLOTS))]
    base = _HEAD + 8 * _SLOTS
    (length,) = struct.unpack_from("<H", buf, base)
    return status, values, approx, buf[base + 2:base + 2 + length].decode("utf-8", errors="replace")


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(v: int) -> float:
    return struct.unpack("<d", struct.pack("<q", v))[0]


def agree(group: Any, what: str, items: Mapping[str, Any] | None = None, *,
          timeout: float | timedelta | None = None, failure: BaseException | None = None,
          warn_only: Iterable[str] = ()) -> None:
    """The handshake: check every rank of ``group`` is at the same step with the same inputs.

    Every rank calls it at the same point. Each sends a fixed-size record: whether its own
    work so far succeeded (``failure`` is ``None``) or the message of its error, and a digest
    of each of ``items``. When any rank failed, the others raise :class:`RankFailedError`
    (the failing rank returns, to raise its own error); when any item differs from rank 0's,
    every rank raises :class:`RankMismatchError` naming the first item that differs (or,
    for the items in ``warn_only``, warns with :class:`RankDriftWarning`).

    Args:
        group: the process group (from :func:`resolve_group`); ``None`` returns at once.
        what: the step, named in the messages (``"activation_matching (before the data)"``).
        items: name -> anything whose ``repr`` is equal on ranks that agree (an int from
            :func:`state_digest` for tensors), or an :class:`Approx` compared with its
            tolerance (two slots); at most 23 slots.
        timeout: seconds (or a timedelta) to wait for the other ranks; default
            ``DEFAULT_TIMEOUT``.
        failure: this rank's own error, when its work failed.
        warn_only: items whose difference only warns.

    Raises:
        RankMismatchError: the ranks' items differ.
        RankFailedError: another rank failed.
        RankTimeoutError: some rank did not arrive within ``timeout``.
        DistributedError: the collective itself failed (a rank exited).
    """
    if group is None:
        return
    wait = _seconds(timeout)
    names: list[str] = [what]
    values: list[int] = [digest(what)]
    approx = 0
    for name, v in (items or {}).items():
        names.append(name)
        if isinstance(v, Approx):
            approx |= 1 << len(values)
            values += [_float_bits(v.value), _float_bits(v.scale)]
        else:
            values.append(v if isinstance(v, int) and not isinstance(v, bool) else digest(v))
    if len(values) > _SLOTS:
        raise DistributedError(f"agree() takes at most {_SLOTS - 1} slots of items, got {len(values) - 1}")
    message = "" if failure is None else f"{type(failure).__name__}: {failure}"
    mine = _pack(_FAILED if failure is not None else _OK, values, approx, message).to(_wire_device(group))
    rank, size = rank_and_size(group)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    try:
        work = torch.distributed.all_gather(gathered, mine, group=group, async_op=True)
        _wait(work, group, wait, what)
    except (DistributedError, RuntimeError):
        if failure is not None:
            return  # this rank's own error says more than the collective's
        raise
    records = [_unpack(t) for t in gathered]
    failed = [(r, msg) for r, (status, _, _, msg) in enumerate(records) if status != _OK]
    if failed:
        if failure is not None:
            return  # the caller raises its own error
        first_rank, first_msg = failed[0]
        raise RankFailedError(
            f"{what}: rank{'s' if len(failed) > 1 else ''} {', '.join(str(r) for r, _ in failed)} of {size} failed, "
            f"so rank {rank} stops too. Rank {first_rank} said: {first_msg}",
            tuple(r for r, _ in failed),
        )
    ref, ref_approx = records[0][1], records[0][2]
    soft = set(warn_only)
    slot = 0
    for name in names:
        tolerant = bool(ref_approx >> slot & 1)
        width = 2 if tolerant else 1
        differ = []
        for r, (_, vals, mask, _) in enumerate(records):
            if len(vals) != len(ref) or mask != ref_approx:
                differ.append(r)
            elif tolerant:
                v0, s0 = _bits_float(ref[slot]), _bits_float(ref[slot + 1])
                v, sc = _bits_float(vals[slot]), _bits_float(vals[slot + 1])
                tol = float((items or {})[name].rtol) * max(s0, sc, 1e-300)
                if not abs(v - v0) <= tol:
                    differ.append(r)
            elif vals[slot] != ref[slot]:
                differ.append(r)
        slot += width
        if not differ:
            continue
        ranks = ", ".join(map(str, differ))
        plural = len(differ) > 1
        if name in soft:
            warnings.warn(
                f"{what}: rank{'s' if plural else ''} {ranks} of {size} hold{'' if plural else 's'} {name} "
                "equal to rank 0's up to float rounding, not bit for bit; the statistics are summed anyway",
                RankDriftWarning, stacklevel=3,
            )
            continue
        noun = "step" if name == what else repr(name)
        raise RankMismatchError(
            f"{what}: rank{'s' if plural else ''} {ranks} of {size} disagree{'' if plural else 's'} with rank 0 on {noun}"
            + ("" if name == what else f" ({_EXPLAIN.get(name.split(' ')[0], 'an argument of the call')})")
            + ": every rank must pass the same spec, the same models and the same options, and only its own "
            "batches differ",
            tuple(differ), name,
        )


_EXPLAIN = {
    "spec": "the groups and their sizes",
    "model_a": "model A's state_dict",
    "model_b": "model B's state_dict",
    "model_interp": "the interpolated model's state_dict",
    "model": "the model's state_dict",
    "statistics": "the statistics' names and shapes",
    "inputs": "the example inputs the spec was traced with",
}


# -- reduction --------------------------------------------------------------------------

def all_reduce_sum(tensors: Sequence[torch.Tensor], group: Any, *, timeout: float | timedelta | None = None,
                   what: str = "the reduction") -> None:
    """Sum ``tensors`` over ``group`` in place, each staying on its device.

    Tensors of one dtype are packed, in order, into buckets of at most ``BUCKET_BYTES``
    (one all-reduce each) on the backend's device (CUDA for NCCL, else the CPU); a tensor
    already there, alone in its bucket, is reduced in place, any other through a copy (a
    CPU tensor under NCCL, a CUDA tensor under gloo). The sums are written back into the
    tensors, on their own devices.

    Args:
        tensors: the statistics; every rank passes the same shapes and dtypes, in the same
            order (check it first with :func:`agree`).
        group: the process group; ``None`` leaves the tensors as they are.
        timeout: seconds to wait for each all-reduce.
        what: the step, named in a timeout's message.

    Raises:
        RankTimeoutError: some rank did not take part within ``timeout``.
        DistributedError: the collective failed.
    """
    if group is None or not tensors:
        return
    wait = _seconds(timeout)
    # grouped by dtype alone (ranks may hold their tensors on different devices), in an
    # order every rank computes alike
    wire = _wire_device(group)
    by_kind: dict[str, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault(str(t.dtype), []).append(t)
    for _, ts in sorted(by_kind.items()):
        bucket: list[torch.Tensor] = []
        filled = 0
        for t in ts + [None]:  # type: ignore[list-item]
            nbytes = 0 if t is None else t.numel() * t.element_size()
            if bucket and (t is None or filled + nbytes > BUCKET_BYTES):
                only = bucket[0]
                if len(bucket) == 1 and only.device == wire and only.is_contiguous():
                    flat = only  # a large tensor is reduced where it is, without a copy
                else:
                    flat = torch.cat([b.reshape(-1).to(wire) for b in bucket])
                work = torch.distributed.all_reduce(flat, group=group, async_op=True)
                _wait(work, group, wait, what)
                if flat is not only or len(bucket) > 1:
                    offset = 0
                    for b in bucket:
                        b.copy_(flat[offset:offset + b.numel()].view_as(b))
                        offset += b.numel()
                bucket, filled = [], 0
            if t is not None:
                bucket.append(t)
                filled += nbytes
