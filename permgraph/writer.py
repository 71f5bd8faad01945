"""The streamed checkpoint writer: `write_checkpoint` writes tensors one at a time (each
produced on demand, written, dropped) into safetensors shards with
``model.safetensors.index.json`` and the source folder's other files (``config.json``,
tokenizer files, ...), so that ``from_pretrained`` loads the result. It writes into a
temporary folder next to the output and renames it at the end: a failure leaves nothing
behind. Re-exported by `permgraph.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from permgraph._format import DTYPE_CODES, SAFE_INDEX, TORCH_INDEX, WEIGHT_SUFFIXES, itemsize
from permgraph.errors import FileError, FileFormatError

if TYPE_CHECKING:
    from permgraph.checkpoint import Checkpoint

__all__ = ["write_checkpoint"]


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> tuple[bytes, int]:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape in entries:
        if dtype not in DTYPE_CODES:
            raise FileFormatError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        n = math.prod(shape) * itemsize(dtype)
        header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data start 8-byte aligned, as safetensors writes them
    return len(raw).to_bytes(8, "little") + raw, offset


def _write_file(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str], progress: Any) -> None:
    head, _ = _header_bytes(entries, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for key, dtype, shape in entries:
            t = produce(key)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise FileFormatError(f"{key!r}: expected {dtype} {shape}, got {got} (a bug: please report it)")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            del t, data
            if progress is not None:
                progress.update(1)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    out: str | os.PathLike,
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    *,
    like: Checkpoint | None = None,
    metadata: Mapping[str, Any] | None = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write tensors one by one as a checkpoint, atomically.

    Args:
        out: the output: a folder (shards, index and ``like``'s other files) or, when it ends
            in ``.safetensors``, one file.
        entries: ``(key, dtype, shape)`` of every tensor to write, in order.
        produce: ``key -> tensor`` (called once per key, in order; the tensor is written and
            dropped, so only one is held at a time).
        like: the checkpoint whose folder's other files (config, tokenizer, ...) are copied.
        metadata: recorded as JSON under ``"permgraph"`` in each file's safetensors metadata
            (with ``"format": "pt"``, which ``from_pretrained`` expects).
        max_shard_size: bytes per shard (default: the largest weight file of ``like``, so
            a sharded input gives shards alike; one file otherwise).
        overwrite: replace an existing output (else it is an error).
        progress: a tqdm bar over the tensors.

    Returns:
        The path written.

    Raises:
        FileError: the output exists (without ``overwrite``) or cannot be written; nothing is left.
        FileFormatError: a produced tensor does not match its entry.
    """
    out = Path(out)
    entries = [(k, d, tuple(int(s) for s in shape)) for k, d, shape in entries]
    if out.exists() and not overwrite:
        raise FileError(f"{str(out)!r} exists: remove it, choose another --out, or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileError(f"cannot write {str(out)!r}: the folder {str(parent)!r} does not exist")
    single = out.suffix == ".safetensors"
    meta = {"format": "pt", "permgraph": json.dumps(dict(metadata or {}), default=str)}
    tmp = parent / f".{out.name}.permgraph-{secrets.token_hex(4)}.tmp"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), desc=f"writing {out.name}", unit="tensor")
    try:
        if single:
            _write_file(tmp, entries, produce, meta, bar)
        else:
            tmp.mkdir()
            if max_shard_size is None and like is not None and len(like.files) > 1:
                max_shard_size = max(f.stat().st_size for f in like.files)
            shards = _plan_shards(entries, max_shard_size)
            names = (["model.safetensors"] if len(shards) == 1 else
                     [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
            weight_map = {}
            for name, shard in zip(names, shards):
                _write_file(tmp / name, shard, produce, meta, bar)
                weight_map.update({k: name for k, _, _ in shard})
            if len(shards) > 1:
                total = sum(math.prod(s) * itemsize(d) for _, d, s in entries)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            if like is not None and like.kind == "folder":
                weights = {f.name for f in like.files}
                for f in sorted(like.path.iterdir()):
                    if f.is_file() and f.name not in weights and f.name not in (SAFE_INDEX, TORCH_INDEX) \
                            and not f.name.endswith(WEIGHT_SUFFIXES):
                        shutil.copy2(f, tmp / f.name)
        if out.exists():  # overwrite: move the old one aside, the new one in, then drop the old
            old = parent / f".{out.name}.permgraph-old-{secrets.token_hex(4)}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if isinstance(exc, OSError):
            raise FileError(f"cannot write {str(out)!r}: {exc.strerror or exc}; nothing was written") from exc
        raise
    finally:
        if bar is not None:
            bar.close()
    return out


def _plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int | None) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e[2]) * itemsize(e[1])
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards
