"""Files: permutations and aligned weights as safetensors, written atomically, read without pickle.

A **permutation file** holds one int64 tensor per group (named after the group) and, in the
safetensors header, a JSON document (``__metadata__["permgraph"]``) with the format version,
the permgraph version, every group's name, size and members, the spec's fingerprint and a
SHA-256 checksum of the indices. `load_permutation` checks all of it against the spec it is
given and refuses a file made for another architecture, naming the group that differs.

An **aligned-weights file** (`save_aligned`) is a plain safetensors state_dict (any
safetensors reader loads it) with contiguous CPU tensors; a tensor stored under several keys
(tied weights) is written once and the other keys are listed in the header, so that
`load_aligned` gives every key back, tied keys as one tensor.

Every write goes to a temporary file in the destination folder, then ``os.replace`` moves it
into place: a failed write leaves nothing behind and never a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from permgraph.errors import FileError, FileFormatError, SpecMismatchError
from permgraph.spec import Layout, Member, PermSpec, missing_and_extra

__all__ = [
    "FileFormatError",
    "FileError",
    "save_permutation",
    "load_permutation",
    "read_header",
    "save_aligned",
    "load_aligned",
    "PERMUTATION_FORMAT",
    "STATE_DICT_FORMAT",
    "FORMAT_VERSION",
]

PERMUTATION_FORMAT = "permgraph.permutation"
STATE_DICT_FORMAT = "permgraph.state_dict"
#: The version of both file layouts; a file of a newer version is refused.
FORMAT_VERSION = 1

PathLike = str | os.PathLike


def _version() -> str:
    from permgraph import __version__

    return __version__


# -- writing ------------------------------------------------------------------------------

def _atomic_save(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise FileError(f"cannot write {str(path)!r}: it is a directory; give a file name")
    tmp = str(folder / f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:  # created like any new file (mode 0o666 less the umask), unlike mkstemp's 0o600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise FileError(
            f"cannot write {str(path)!r}: {exc.strerror or exc} (the folder must exist and be writable)"
        ) from exc
    os.close(fd)
    try:
        # the mode a new file gets here (or the one the file being replaced had): the writer
        # below may recreate the file with its own, stricter mode
        mode = (path if path.exists() else Path(tmp)).stat().st_mode & 0o7777
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise FileError(f"cannot write {str(path)!r}: {exc.strerror or exc}; nothing was written") from exc
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable where the OS allows
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def _checksum(names: list[str], tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(b"\0")
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _member_text(m: list[Any]) -> str:
    """A file's member entry (`_members`) as `Member` prints it (``key[axis]`` when plain)."""
    try:
        key, axis, offset, block, repeats, *at = m
        return str(Member(key, int(axis), Layout(int(offset), int(block), tuple(map(tuple, repeats))),
                          tuple(map(tuple, at[0])) if at else ()))
    except (TypeError, ValueError):
        return repr(m)


def _members(spec: PermSpec) -> list[dict[str, Any]]:
    return [
        {
            "name": g.name,
            "size": g.size,
            "members": [[m.key, m.axis, m.layout.offset, m.layout.block, [list(r) for r in m.layout.repeats]]
                        + ([[list(p) for p in m.at]] if m.at else []) for m in g.members],
        }
        for g in spec.groups
    ]


def save_permutation(path: PathLike, spec: PermSpec, perm: Mapping[str, torch.Tensor]) -> Path:
    """Write a permutation of ``spec``'s groups as a safetensors file.

    Args:
        path: the file to write (``.safetensors`` by convention); replaced if it exists.
        spec: the spec the permutation is for; its groups, members and fingerprint go in the
            header.
        perm: group name -> indices (any integer dtype and device; stored as int64 on CPU).

    Returns:
        The path written.

    Raises:
        PermutationError: ``perm`` is not a bijection of every group of ``spec`` (nothing is
            written).
        FileError: the path cannot be written (nothing is left behind).

    Examples:
        >>> import os, tempfile, torch, permgraph
        >>> from permgraph.io import save_permutation, load_permutation
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(3, 4))
        >>> perm = spec.random_permutation(torch.Generator().manual_seed(0))
        >>> path = os.path.join(tempfile.mkdtemp(), "perm.safetensors")
        >>> _ = save_permutation(path, spec, perm)
        >>> torch.equal(load_permutation(path, spec)["0"], perm["0"])
        True
    """
    spec.check_permutation(perm)
    tensors = {g.name: perm[g.name].detach().to(device="cpu", dtype=torch.int64).contiguous() for g in spec.groups}
    header = {
        "format_version": FORMAT_VERSION,
        "permgraph_version": _version(),
        "spec_fingerprint": spec.fingerprint(),
        "groups": _members(spec),
        "sha256": _checksum(spec.names, tensors),
    }
    return _atomic_save(path, tensors, {"format": PERMUTATION_FORMAT, "permgraph": json.dumps(header)})


# -- reading --------------------------------------------------------------------------------

def _open(path: PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read a safetensors file (header and tensors) without pickle."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileError(f"no such file: {str(path)!r}")
    if path.is_dir():
        raise FileError(f"{str(path)!r} is a directory, not a safetensors file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except SafetensorError as exc:
        raise FileFormatError(
            f"{str(path)!r} is not a valid safetensors file (truncated or corrupted?): {exc}"
        ) from exc
    except OSError as exc:
        raise FileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the Rust reader raises a few other types on garbage
        raise FileFormatError(f"{str(path)!r} could not be read as safetensors (corrupted?): {type(exc).__name__}: {exc}") from exc
    return metadata, tensors


def _header(path: PathLike, metadata: Mapping[str, str], fmt: str) -> dict[str, Any]:
    if metadata.get("format") != fmt:
        got = metadata.get("format")
        raise FileFormatError(
            f"{str(path)!r} is not a {fmt} file (its header says format={got!r})"
            + ("; read weights with load_aligned and permutations with load_permutation" if got else "")
        )
    try:
        header = json.loads(metadata["permgraph"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{str(path)!r}: the permgraph header is missing or not JSON (corrupted?)") from exc
    if not isinstance(header, dict):
        raise FileFormatError(f"{str(path)!r}: the permgraph header is not a JSON object (corrupted?)")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise FileFormatError(
            f"{str(path)!r} has format version {version!r}; this permgraph ({_version()}) reads versions 1..{FORMAT_VERSION}"
            + (" — upgrade permgraph" if isinstance(version, int) and version > FORMAT_VERSION else "")
        )
    return header


def read_header(path: PathLike) -> dict[str, Any]:
    """The permgraph JSON header of a permutation or aligned-weights file, without a spec.

    Returns:
        The header dict, with ``"format"`` added (``"permgraph.permutation"`` or
        ``"permgraph.state_dict"``).

    Raises:
        FileError: the file cannot be read.
        FileFormatError: it is not a permgraph safetensors file.
    """
    metadata, _ = _open(path)
    fmt = metadata.get("format")
    header = _header(path, metadata, fmt if fmt in (PERMUTATION_FORMAT, STATE_DICT_FORMAT) else PERMUTATION_FORMAT)
    return {"format": fmt, **header}


def load_permutation(path: PathLike, spec: PermSpec) -> dict[str, torch.Tensor]:
    """Read a permutation written by `save_permutation` and check it against ``spec``.

    Args:
        path: the file.
        spec: the spec of the architecture the permutation will be applied to.

    Returns:
        Group name -> int64 CPU indices, in the spec's group order.

    Raises:
        FileError: the file cannot be read.
        FileFormatError: the file is truncated or corrupted (safetensors framing, header
            JSON, or the indices' checksum), of another format, or of a newer version.
        SpecMismatchError: the file was made for another architecture; the message names the
            group (missing, unexpected, another size, other members) that differs.
        PermutationError: an index tensor is not a bijection (a duplicate index).
    """
    metadata, tensors = _open(path)
    header = _header(path, metadata, PERMUTATION_FORMAT)
    groups = header.get("groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "name" in g and "size" in g for g in groups):
        raise FileFormatError(f"{str(path)!r}: the header's group list is malformed (corrupted?)")
    names = [g["name"] for g in groups]
    if sorted(names) != sorted(tensors):
        raise FileFormatError(
            f"{str(path)!r}: the header lists groups {names[:5]} but the file holds tensors {sorted(tensors)[:5]} (corrupted?)"
        )
    for name, t in tensors.items():
        if t.dtype != torch.int64 or t.ndim != 1:
            raise FileFormatError(f"{str(path)!r}: group {name!r} is stored as {t.dtype} of shape {tuple(t.shape)}, not 1-D int64")
    if header.get("sha256") != _checksum(names, tensors):
        raise FileFormatError(f"{str(path)!r}: the indices do not match the checksum in the header (the file is corrupted)")

    where = f"{str(path)!r} (made with permgraph {header.get('permgraph_version', '?')})"
    renamed = _renamed(groups, spec)
    if renamed:  # the same groups under the older names (before names came from module paths with roles)
        warnings.warn(f"{where} names its groups as older versions did; they were matched to this spec's "
                      "groups by their members. Save it again to store the current names.", DeprecationWarning,
                      stacklevel=2)
        perm = {g.name: tensors[renamed[g.name]] for g in spec.groups}
        spec.check_permutation(perm)
        return perm
    missing = [n for n in spec.names if n not in tensors]
    extra = [n for n in names if n not in set(spec.names)]
    if missing or extra:
        raise SpecMismatchError(
            f"{where} does not fit this spec: "
            + missing_and_extra(missing, extra, "groups missing from the file:", "groups the spec does not have:")
            + ". It was made for another architecture; infer the spec of the model it was made for."
        )
    by_name = {g["name"]: g for g in groups}
    for g in spec.groups:
        size = by_name[g.name]["size"]
        if size != g.size or tensors[g.name].numel() != g.size:
            raise SpecMismatchError(f"{where}: group {g.name!r} has {size} units in the file, {g.size} in the spec")
    if header.get("spec_fingerprint") != spec.fingerprint():
        mine = {d["name"]: d.get("members") for d in _members(spec)}
        culprit = next((n for n in spec.names if by_name[n].get("members") != mine[n]), None)
        detail = f"group {culprit!r} permutes other tensors" if culprit else "the groups' members differ"
        if culprit is not None:
            theirs = {json.dumps(m) for m in by_name[culprit].get("members") or []}
            ours = {json.dumps(m) for m in mine[culprit]}
            diff = [_member_text(json.loads(m)) for m in sorted(ours ^ theirs)[:3]]
            if diff:
                detail += f" (e.g. {', '.join(diff)} is in one and not the other)"
        raise SpecMismatchError(
            f"{where} was made for another spec (fingerprint {header.get('spec_fingerprint')}, this spec's is "
            f"{spec.fingerprint()}): {detail}"
        )
    perm = {g.name: tensors[g.name] for g in spec.groups}
    spec.check_permutation(perm)
    return perm


def _renamed(groups: list[dict[str, Any]], spec: PermSpec) -> dict[str, str] | None:
    """Spec group name -> the file's name for it, when the names differ but every group has its
    exact twin (size and members) in the file; None otherwise."""
    if sorted(g["name"] for g in groups) == sorted(spec.names):
        return None
    theirs: dict[str, str] = {}
    for g in groups:
        if "members" not in g:
            return None
        theirs.setdefault(json.dumps([g["size"], g["members"]]), g["name"])
    mine = {d["name"]: json.dumps([d["size"], d["members"]]) for d in _members(spec)}
    if len(theirs) != len(groups) or len(groups) != len(mine) or not set(mine.values()) <= theirs.keys():
        return None
    out = {name: theirs[sig] for name, sig in mine.items()}
    return out if len(set(out.values())) == len(out) else None


# -- aligned weights --------------------------------------------------------------------------

def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save_aligned(path: PathLike, state_dict: Mapping[str, Any], *, spec: PermSpec | None = None) -> Path:
    """Write a state_dict (aligned weights, a merged model) as a safetensors file.

    Tensors are detached, moved to the CPU and made contiguous. Keys that name the same
    tensor (tied weights) are stored once, the others recorded in the header; tensors that
    merely share memory (views of one buffer) are stored as separate copies. Values are
    bit-exact: `load_aligned` or any safetensors reader gives them back unchanged.

    Args:
        path: the file to write; replaced if it exists.
        state_dict: key -> tensor.
        spec: when given, the state_dict is checked against it and its fingerprint recorded.

    Returns:
        The path written.

    Raises:
        FileFormatError: a value is not a tensor.
        SpecMismatchError: with ``spec``, the keys or shapes do not match it.
        FileError: the path cannot be written (nothing is left behind).
    """
    if spec is not None:
        spec.check_state_dict(state_dict)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    owned: set[int] = set()  # storages already written whole
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise FileFormatError(f"state_dict[{key!r}] is a {type(t).__name__}; safetensors stores tensors only")
        skey = _storage_key(t)
        if skey in first and t.numel():
            aliases[key] = first[skey]
            continue
        first.setdefault(skey, key)
        c = t.detach().to("cpu")
        nbytes = c.numel() * c.element_size()
        ptr = c.untyped_storage().data_ptr()
        if (not c.is_contiguous() or c.storage_offset() != 0 or c.untyped_storage().nbytes() != nbytes
                or (ptr in owned and nbytes)):
            c = c.clone(memory_format=torch.contiguous_format)  # its own, exact storage: nothing shared
        owned.add(c.untyped_storage().data_ptr())
        tensors[key] = c
    header = {
        "format_version": FORMAT_VERSION,
        "permgraph_version": _version(),
        "order": list(state_dict),
        "aliases": aliases,
    }
    if spec is not None:
        header["spec_fingerprint"] = spec.fingerprint()
    return _atomic_save(path, tensors, {"format": STATE_DICT_FORMAT, "permgraph": json.dumps(header)})


def load_aligned(path: PathLike, spec: PermSpec | None = None) -> dict[str, torch.Tensor]:
    """Read a state_dict written by `save_aligned` (or any safetensors state_dict).

    Args:
        path: the file.
        spec: when given, the state_dict is checked against it (keys and shapes).

    Returns:
        Key -> CPU tensor, in the order it was saved; tied keys are one tensor again.

    Raises:
        FileError: the file cannot be read.
        FileFormatError: the file is truncated or corrupted, or a permgraph header is
            malformed or of a newer version.
        SpecMismatchError: with ``spec``, the keys or shapes do not match it.
    """
    metadata, tensors = _open(path)
    if metadata.get("format") == STATE_DICT_FORMAT:
        header = _header(path, metadata, STATE_DICT_FORMAT)
        aliases = header.get("aliases") or {}
        order = header.get("order") or list(tensors)
        if not isinstance(aliases, dict) or not isinstance(order, list):
            raise FileFormatError(f"{str(path)!r}: the permgraph header is malformed (corrupted?)")
        for key, target in aliases.items():
            if target not in tensors:
                raise FileFormatError(f"{str(path)!r}: tied key {key!r} points to {target!r}, which the file does not hold")
            tensors[key] = tensors[target]
        if sorted(order) != sorted(tensors):
            raise FileFormatError(f"{str(path)!r}: the header's key list does not match the tensors in the file (corrupted?)")
        tensors = {k: tensors[k] for k in order}
        fp = header.get("spec_fingerprint")
        if spec is not None and fp is not None and fp != spec.fingerprint():
            raise SpecMismatchError(
                f"{str(path)!r} was saved for a spec with fingerprint {fp}, not this one ({spec.fingerprint()}): "
                "another architecture, or another version of it"
            )
    elif metadata.get("format") == PERMUTATION_FORMAT:
        raise FileFormatError(f"{str(path)!r} is a permutation file; read it with load_permutation(path, spec)")
    if spec is not None:
        spec.check_state_dict(tensors, f"the weights in {str(path)!r}")
    return tensors
