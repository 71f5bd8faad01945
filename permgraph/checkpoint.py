"""Checkpoints as users have them: read lazily in their stored dtype, written shard by shard.

`open_checkpoint` reads what people keep on disk:

* a Hugging Face folder: ``config.json`` with ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json`` (``pytorch_model.bin`` and its index too);
* a single ``.safetensors`` file (permgraph's own aligned-weights files included: their tied
  keys come back);
* a torch state_dict file (``torch.load(..., weights_only=True, mmap=True)``, no pickle of code).

Nothing is read up front but the headers: a `Checkpoint` is a mapping whose tensors are views of
the memory-mapped files (safetensors ``safe_open``), so they cost page cache, not the process's
own memory, and a tensor is only read when a matcher or the writer touches it. A truncated or
missing shard is refused when the checkpoint is opened, naming the file.

For a folder, `build_model` makes the architecture from ``config.json`` on the **meta
device** (no weights) with example inputs chosen from its forward's signature, so that
`permgraph.infer` gives the spec of a 7B model at no memory cost.

`write_checkpoint` (in `permgraph.writer`, re-exported here) writes tensors one at a time
into safetensors shards, atomically.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from permgraph._format import DTYPE_CODES, SAFE_INDEX, TORCH_INDEX, itemsize
from permgraph.errors import FileError, FileFormatError, PermGraphError, SpecMismatchError
from permgraph.layout import at_slice
from permgraph.writer import write_checkpoint

__all__ = ["Checkpoint", "open_checkpoint", "build_model", "example_inputs", "tied_aliases", "write_checkpoint",
           "parse_size", "return_freed_memory", "SAFE_INDEX", "TORCH_INDEX"]



def parse_size(text: str | int | None) -> int | None:
    """Bytes from ``"1.5GB"``, ``"512MiB"``, ``"2G"`` or an int (None passes through).

    Raises:
        PermGraphError: not a size.
    """
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text < 0:
            raise PermGraphError(f"a memory size must be >= 0, got {text}")
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12, "GB": 10**9,
             "MB": 10**6, "KB": 10**3, "T": 1 << 40, "G": 1 << 30, "M": 1 << 20, "K": 1 << 10, "B": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    num, scale = s[: len(s) - len(unit)], units.get(unit, 1)
    try:
        value = float(num)
    except ValueError:
        raise PermGraphError(f"cannot read {text!r} as a size: use e.g. 1.5GB, 512MiB or a number of bytes") from None
    if not math.isfinite(value) or value < 0:
        raise PermGraphError(f"a memory size must be a finite number >= 0, got {text!r}")
    return int(value * scale)


def return_freed_memory() -> bool:
    """Ask glibc to give large freed blocks back to the system at once (the CLI does).

    Streaming allocates and frees one tensor-sized block after another. glibc serves blocks
    of 128 KiB and up with their own ``mmap`` at first, but after the first such block is
    freed it raises that threshold (up to 32 MiB), and later blocks come from the heap, which
    fragments and keeps them: measured here, aligning two 0.1B checkpoints peaked at 967 MB of
    anonymous memory that way and at 748 MB with the threshold fixed at 1 MiB. Returns whether
    the setting took (False off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError, TypeError):
        return False


# -- reading ------------------------------------------------------------------------------

@dataclass
class Checkpoint(Mapping):
    """A checkpoint's tensors, read lazily (see the module docstring).

    A mapping ``key -> tensor`` (CPU, stored dtype, memory-mapped where the file allows);
    ``aliases`` adds keys that name another key's tensor (tied weights, which
    ``save_pretrained`` stores once).

    Attributes:
        path: the folder or file opened.
        kind: ``"folder"``, ``"safetensors"`` or ``"torch"``.
        files: the weight files, in order.
        config: the folder's ``config.json`` as a dict (None for a file).
        aliases: extra key -> stored key it reads.
    """

    path: Path
    kind: str
    files: list[Path]
    config: dict[str, Any] | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    _where: dict[str, int] = field(default_factory=dict, repr=False)  # stored key -> index in files
    _handles: list[Any] = field(default_factory=list, repr=False)  # safe_open handles or loaded dicts
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _dtypes: dict[str, torch.dtype] = field(default_factory=dict, repr=False)

    # -- mapping -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        stored = self.aliases.get(key, key)
        if stored not in self._where:
            raise KeyError(key)
        h = self._handles[self._where[stored]]
        return h[stored] if isinstance(h, dict) else h.get_tensor(stored)

    def read_slice(self, key: str, at: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """``self[key]`` at the slice ``at`` (`permgraph.spec.Member` ``at``), reading only
        that slice from a safetensors file (one expert of a stacked tensor, not all)."""
        stored = self.aliases.get(key, key)
        if stored not in self._where:
            raise KeyError(key)
        h = self._handles[self._where[stored]]
        if isinstance(h, dict):
            return at_slice(h[stored], at)
        picks = dict(at)
        index = tuple(slice(picks[d], picks[d] + 1) if d in picks else slice(None)
                      for d in range(max(picks) + 1))
        return h.get_slice(stored)[index].squeeze(tuple(picks))

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from (k for k in self.aliases if k not in self._where)

    def __len__(self) -> int:
        return len(self._where) + sum(k not in self._where for k in self.aliases)

    def __contains__(self, key: object) -> bool:
        return key in self._where or key in self.aliases

    @property
    def stored_keys(self) -> list[str]:
        """The keys the files hold (without aliases), in file order."""
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[self.aliases.get(key, key)]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[self.aliases.get(key, key)]

    def file_of(self, key: str) -> Path:
        """The file holding ``key``."""
        return self.files[self._where[self.aliases.get(key, key)]]

    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(math.prod(s) * itemsize(self._dtypes[k]) for k, s in self._shapes.items())

    def with_aliases(self, aliases: Mapping[str, str]) -> Checkpoint:
        """The same checkpoint with extra keys naming stored ones (only those it lacks)."""
        extra = {k: v for k, v in aliases.items() if k not in self._where and v in self._where}
        return Checkpoint(self.path, self.kind, self.files, self.config, {**self.aliases, **extra}, self._where,
                          self._handles, self._shapes, self._dtypes)

    def check(self, spec: Any, what: str = "checkpoint") -> None:
        """Raise `SpecMismatchError` unless the keys and shapes are the spec's, naming the
        key, the file that holds it and both shapes."""
        from permgraph.spec import missing_and_extra

        missing = [k for k in spec.shapes if k not in self]
        extra = [k for k in self if k not in spec.shapes]
        if missing or extra:
            raise SpecMismatchError(
                f"{what} ({self.path}) does not match the architecture: "
                + missing_and_extra(missing, extra, "missing keys", "keys the architecture does not have")
                + ". Is it a checkpoint of this architecture (the same config / MODULE:CALLABLE)?"
            )
        for k, shape in spec.shapes.items():
            if self.shape(k) != tuple(shape):
                raise SpecMismatchError(
                    f"{what}: {k!r} in {self.file_of(k).name} has shape {self.shape(k)}, the architecture "
                    f"expects {tuple(shape)} (does config.json / the model builder match the weights?)"
                )


def _open_safetensors(path: Path) -> tuple[Any, dict[str, tuple[int, ...]], dict[str, torch.dtype], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileError(f"weight file {str(path)!r} is missing" + (" (a directory)" if path.is_dir() else ""))
    try:
        h = safe_open(str(path), framework="pt", device="cpu")
        keys = list(h.keys())
        shapes, dtypes = {}, {}
        for k in keys:
            s = h.get_slice(k)
            shapes[k] = tuple(int(d) for d in s.get_shape())
            dtypes[k] = _from_code(s.get_dtype(), path, k)
        metadata = dict(h.metadata() or {})
    except SafetensorError as exc:
        raise FileFormatError(f"{str(path)!r} is not a valid safetensors file (truncated or corrupted?): {exc}") from exc
    except OSError as exc:
        raise FileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    return h, shapes, dtypes, metadata


def _from_code(code: str, path: Path, key: str) -> torch.dtype:
    for dt, c in DTYPE_CODES.items():
        if c == code:
            return dt
    raise FileFormatError(f"{str(path)!r}: tensor {key!r} has dtype {code}, which permgraph cannot read")


def _open_torch(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileError(f"weight file {str(path)!r} is missing")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise FileFormatError(
            f"cannot load {str(path)!r} as a torch checkpoint with weights_only=True (truncated, or not a "
            f"state_dict?): {exc}. Save a plain state_dict (torch.save(model.state_dict(), path)) or safetensors"
        ) from exc
    for wrapper in ("state_dict", "model"):  # {"state_dict": {...}, "epoch": ...}
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FileFormatError(f"{str(path)!r} does not hold a state_dict (a dict of tensors)")
    return obj


def _weight_files(folder: Path) -> list[Path]:
    for index in (SAFE_INDEX, TORCH_INDEX):
        p = folder / index
        if p.is_file():
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise FileFormatError(f"{str(p)!r} is not a valid shard index (no 'weight_map'?): {exc!r}") from exc
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileError(f"{folder}: the shard(s) {missing} listed in {index} are missing; copy them "
                                "into the folder (a download that did not finish?)")
            return [folder / n for n in names]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return [folder / found[0]]
    raise FileError(
        f"{folder} holds no weights: expected model.safetensors, {SAFE_INDEX} with its shards, or pytorch_model.bin"
        + (f" (found {found}; give one file instead)" if found else "")
    )


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a folder or a weights file lazily (see the module docstring).

    Args:
        path: a Hugging Face folder, a ``.safetensors`` file, or a torch state_dict file.

    Returns:
        The `Checkpoint` (only headers read).

    Raises:
        FileError: the path, a shard or the weights are missing.
        FileFormatError: a file is truncated, corrupted or not a state_dict (named).

    Examples:
        >>> import os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from permgraph.checkpoint import open_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_file({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, path)
        >>> ck = open_checkpoint(path)
        >>> ck.kind, ck.shape("w"), ck.dtype("w"), ck["w"].sum().item()
        ('safetensors', (2, 3), torch.bfloat16, 6.0)
    """
    p = Path(path)
    if not p.exists():
        raise FileError(f"no such checkpoint: {str(p)!r} (a folder with config.json, a .safetensors or a torch file)")
    config = None
    if p.is_dir():
        kind = "folder"
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{str(cfg)!r} is not valid JSON: {exc}") from exc
        files = _weight_files(p)
    else:
        kind = "safetensors" if p.suffix == ".safetensors" else "torch"
        files = [p]
    ck = Checkpoint(p, kind, files, config)
    for i, f in enumerate(files):
        if f.suffix == ".safetensors":
            h, shapes, dtypes, metadata = _open_safetensors(f)
            if "permgraph" in metadata:  # permgraph's own files list the tied keys they store once
                with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError, ValueError):
                    ck.aliases.update(json.loads(metadata["permgraph"]).get("aliases") or {})
        else:
            h = _open_torch(f)
            shapes = {k: tuple(v.shape) for k, v in h.items()}
            dtypes = {k: v.dtype for k, v in h.items()}
        for k in shapes:
            if k in ck._where:
                raise FileFormatError(f"{p}: key {k!r} is in both {files[ck._where[k]].name} and {f.name}")
            ck._where[k] = i
        ck._handles.append(h)
        ck._shapes.update(shapes)
        ck._dtypes.update(dtypes)
    return ck


# -- the architecture of a folder -------------------------------------------------------------

def build_model(ck: Checkpoint, *, device: str | torch.device = "meta") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The architecture of a Hugging Face folder, from ``config.json``, and example inputs.

    The model is built on the meta device (no weights: free at any size) in eval mode; tied
    weights are tied as ``from_pretrained`` ties them. The example inputs are meta tensors
    chosen from the forward's signature (``input_ids`` from the vocabulary, ``pixel_values``
    from the image size, ``input_values`` for audio, ``decoder_input_ids`` for
    encoder-decoders), with ``use_cache=False`` where the model takes it.

    Raises:
        PermGraphError: no config.json, transformers missing, an unknown architecture, or a
            forward with required inputs permgraph cannot make (named).
    """
    if ck.kind != "folder" or ck.config is None:
        raise PermGraphError(
            f"{ck.path}: a weights file alone does not say its architecture; give the folder with config.json, "
            "or --model MODULE:CALLABLE building the model"
        )
    try:
        import transformers
    except ImportError as exc:
        raise PermGraphError("reading a Hugging Face folder needs transformers: pip install 'permgraph[hf]'") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(ck.path), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise PermGraphError(f"{ck.path}/config.json: transformers cannot read it: {exc}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        with torch.device(device):
            model = cls.from_config(config) if cls is transformers.AutoModel else cls._from_config(config)
    except Exception as exc:  # noqa: BLE001 - model constructors raise anything
        raise PermGraphError(f"{ck.path}: cannot build {archs[0] if archs else 'the model'} from config.json: "
                             f"{type(exc).__name__}: {exc}") from exc
    model.eval()
    return model, example_inputs(model, device=device)


def example_inputs(model: torch.nn.Module, *, device: str | torch.device = "meta", length: int = 8) -> dict[str, Any]:
    """Keyword example inputs for a Hugging Face model, from its forward's signature.

    Raises:
        PermGraphError: a required input permgraph does not know how to make.
    """
    config = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters

    def cfg(*names: str, default: Any = None) -> Any:
        for holder in (config, getattr(config, "vision_config", None), getattr(config, "text_config", None)):
            for n in names:
                v = getattr(holder, n, None) if holder is not None else None
                if v is not None:
                    return v
        return default

    size = cfg("image_size", default=224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    makers: dict[str, Callable[[], Any]] = {
        "input_ids": lambda: torch.zeros(1, length, dtype=torch.long, device=device),
        "decoder_input_ids": lambda: torch.zeros(1, length, dtype=torch.long, device=device),
        "pixel_values": lambda: torch.zeros(1, cfg("num_channels", default=3), h, w, device=device),
        "input_values": lambda: torch.zeros(1, 16000, device=device),
        "input_features": lambda: torch.zeros(1, cfg("num_mel_bins", "feature_size", default=80), 3000, device=device),
    }
    out: dict[str, Any] = {}
    for name in ("input_ids", "pixel_values", "input_values", "input_features"):
        if name in params:
            out[name] = makers[name]()
            break
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = makers["decoder_input_ids"]()
    if "use_cache" in params:
        out["use_cache"] = False
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in out]
    if required or not any(isinstance(v, torch.Tensor) for v in out.values()):
        raise PermGraphError(
            f"{type(model).__name__}.forward takes {list(params)[:6]}; permgraph cannot make its inputs "
            f"{required or '(none of input_ids, pixel_values, input_values, input_features)'}. Build the model "
            "in Python and pass --model MODULE:CALLABLE with --input-shape/--input-name"
        )
    return out


def tied_aliases(model: torch.nn.Module, stored: Sequence[str] | Mapping[str, Any]) -> dict[str, str]:
    """state_dict key -> the stored key of the same tensor, for keys the checkpoint lacks
    (tied weights: ``save_pretrained`` writes one of them)."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(name)
    out: dict[str, str] = {}
    for names in by_tensor.values():
        present = [n for n in names if n in stored]
        if present:
            out.update({n: present[0] for n in names if n not in stored})
    return out
