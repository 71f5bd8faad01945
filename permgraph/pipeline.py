"""Align, merge and permute checkpoints on disk, streaming: the work behind ``permgraph align``,
``merge`` and ``apply``.

Both checkpoints are opened lazily (`permgraph.checkpoint.open_checkpoint`); the architecture
comes from a folder's ``config.json`` (built on the meta device) or from a model the caller
builds; weight matching reads the tensors one at a time within a memory budget; the output is
written tensor by tensor (`permgraph.checkpoint.write_checkpoint`). Neither model is ever held
whole, so two checkpoints larger than the machine's memory can be aligned and merged.

Only what must run the model holds it in memory: activation matching, BatchNorm reset and
REPAIR load the models (``from_pretrained`` for a folder, ``load_state_dict`` otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from permgraph.checkpoint import Checkpoint, build_model, open_checkpoint, tied_aliases, write_checkpoint
from permgraph.errors import PermGraphError
from permgraph.match.weight import DEFAULT_MAX_MEMORY
from permgraph.spec import PermSpec

__all__ = ["Architecture", "architecture", "match_checkpoints", "align_checkpoints", "merge_checkpoints",
           "apply_to_checkpoint", "permuted", "interpolated"]


@dataclass
class Architecture:
    """A model's spec with the checkpoints it reads.

    Attributes:
        spec: the permutation groups (`permgraph.infer` of ``model``).
        model: the model the spec was traced from (on the meta device for a folder).
        inputs: the example inputs it was traced with.
        checkpoints: the opened checkpoints, checked against the spec, tied keys aliased.
    """

    spec: PermSpec
    model: torch.nn.Module
    inputs: Any
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def entries(self, ck: Checkpoint) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """What an output of this architecture holds: the stored keys of ``ck`` (tied keys
        once, as ``save_pretrained`` writes them), stored dtypes and shapes, in file order."""
        return [(k, ck.dtype(k), ck.shape(k)) for k in ck.stored_keys]


def architecture(
    paths: Iterable[str | os.PathLike],
    *,
    model: torch.nn.Module | None = None,
    inputs: Any = None,
    names: Iterable[str] = ("A", "B", "C", "D"),
    heads: str = "shared",
    experts: str = "shared",
) -> Architecture:
    """Open checkpoints and infer the spec of their architecture.

    Args:
        paths: checkpoint folders or files (all of one architecture).
        model: the architecture, built by the caller; default: from the first folder's
            ``config.json`` on the meta device.
        inputs: example inputs for ``model`` (default: chosen from the folder's model).
        names: how to call the checkpoints in messages.
        heads: as in `permgraph.infer` (per-head groups).
        experts: as in `permgraph.infer` (per-expert groups).

    Raises:
        FileError, FileFormatError: a checkpoint or shard is missing, truncated or corrupted.
        SpecMismatchError: a checkpoint does not match the architecture (key, file, shapes named).
        TraceError: the model cannot be traced.
    """
    from permgraph.analysis import infer

    cks = [open_checkpoint(p) for p in paths]
    if model is None:
        model, built_inputs = build_model(cks[0])
        inputs = built_inputs if inputs is None else inputs
    elif inputs is None:
        raise PermGraphError("a model given without example inputs: pass inputs= (what infer would take)")
    spec = infer(model, inputs, heads=heads, experts=experts)
    checked = []
    for ck, name in zip(cks, names):
        ck = ck.with_aliases(tied_aliases(model, ck))
        ck.check(spec, f"checkpoint {name}")
        checked.append(ck)
    return Architecture(spec, model, inputs, checked)


def permuted(spec: PermSpec, perm: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``key -> state[key]`` permuted by ``perm``, one tensor at a time (as `PermSpec.apply`
    does for a whole state_dict: the same gathers, bit-exact)."""
    def produce(key: str) -> torch.Tensor:
        return spec.apply_tensor(perm, key, state[key])

    return produce


def _metadata(arch: Architecture, ck: Checkpoint, **inputs: Any) -> dict[str, Any]:
    """What each output file records: versions, the spec, the inputs, and the tied keys it
    stores once (so that `open_checkpoint` gives them back)."""
    from permgraph import __version__

    return {"permgraph_version": __version__, "spec_fingerprint": arch.spec.fingerprint(),
            "inputs": {k: (str(v) if isinstance(v, Path) else v) for k, v in inputs.items()},
            "aliases": {k: v for k, v in ck.aliases.items() if k in arch.spec.shapes}}


def match_checkpoints(
    arch: Architecture,
    *,
    method: str = "weight",
    seed: int = 0,
    order: str = "random",
    tol: float = 0.0,
    first_pass: str = "sweep",
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    device: Any = None,
    dtype: Any = None,
    batches: Iterable[Any] | None = None,
    load_models: Callable[[], tuple[Any, Any]] | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], Any]:
    """The permutation aligning checkpoint B (``arch.checkpoints[1]``) to A.

    Args:
        arch: from `architecture` over ``[A, B]``.
        method: ``"weight"``: weight matching, streamed from the files within ``max_memory``
            (``seed``, ``order``, ``tol``, ``first_pass``, ``device``, ``dtype`` as for
            `permgraph.match.weight_matching`);
            ``"activation"``: activation matching of the models ``load_models()`` returns, on
            ``batches``.
        progress: show progress bars.

    Returns:
        ``(perm, history)``: the history of weight matching, None for activation matching.

    Raises:
        PermGraphError: an unknown method, or activation matching without data.
    """
    from permgraph.match import activation_matching, weight_matching

    spec, a, b = arch.spec, arch.checkpoints[0], arch.checkpoints[1]
    if method == "weight":
        return weight_matching(spec, a, b, seed=seed, order=order, tol=tol, first_pass=first_pass,
                               max_memory=max_memory, device=device, dtype=dtype, progress=progress,
                               return_history=True)
    if method == "activation":
        if batches is None or load_models is None:
            raise PermGraphError("activation matching needs data (--data) to run both models on")
        model_a, model_b = load_models()
        return activation_matching(spec, model_a, model_b, batches, progress=progress), None
    raise PermGraphError(f"method must be 'weight' or 'activation', got {method!r}")


def align_checkpoints(
    arch: Architecture,
    out: str | os.PathLike,
    *,
    method: str = "weight",
    perm_out: str | os.PathLike | None = None,
    seed: int = 0,
    order: str = "random",
    tol: float = 0.0,
    first_pass: str = "sweep",
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    device: Any = None,
    dtype: Any = None,
    batches: Iterable[Any] | None = None,
    load_models: Callable[[], tuple[Any, Any]] | None = None,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Align checkpoint B to A and write B aligned, streaming (see the module docstring).

    The matching arguments (``method``, ``seed``, ``order``, ``tol``, ``first_pass``,
    ``max_memory``, ``device``, ``dtype``, ``batches``, ``load_models``) are those of
    `match_checkpoints`; the writing ones
    (``overwrite``, ``max_shard_size``, ``progress``) those of
    `permgraph.checkpoint.write_checkpoint`.

    Args:
        arch: from `architecture` over ``[A, B]``.
        out: the output folder (or ``.safetensors`` file).
        perm_out: also write the permutation file here.

    Returns:
        ``(perm, history)`` (the history of weight matching; None for activation matching).
    """
    from permgraph.io import save_permutation

    perm, hist = match_checkpoints(arch, method=method, seed=seed, order=order, tol=tol, first_pass=first_pass,
                                   max_memory=max_memory, device=device, dtype=dtype, batches=batches,
                                   load_models=load_models, progress=progress)
    b = arch.checkpoints[1]
    write_checkpoint(out, arch.entries(b), permuted(arch.spec, perm, b), like=b, overwrite=overwrite,
                     max_shard_size=max_shard_size, progress=progress,
                     metadata=_metadata(arch, b, operation="align", a=arch.checkpoints[0].path, b=b.path, method=method))
    if perm_out is not None:
        save_permutation(perm_out, arch.spec, perm)
    return perm, hist


def merge_checkpoints(
    arch: Architecture,
    perm: Mapping[str, torch.Tensor],
    out: str | os.PathLike,
    *,
    alpha: float = 0.5,
    correct: Callable[[Callable[[str], torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    progress: bool = False,
) -> Path:
    """Write ``(1 - alpha) * A + alpha * P(B)``, streaming (``perm`` from `match_checkpoints`).

    Floating-point tensors are interpolated in float32 (or wider) and stored in their dtype;
    integer buffers are A's (as `permgraph.merge.interpolate`). ``correct`` (BatchNorm reset,
    REPAIR) gets the merged tensors and returns the state_dict to write, so it is the one step
    that holds a model in memory. The writing arguments are those of
    `permgraph.checkpoint.write_checkpoint`.

    Returns:
        The path written.
    """
    arch.spec.check_permutation(perm)
    a, b = arch.checkpoints[0], arch.checkpoints[1]
    produce = mixed = interpolated(arch, perm, alpha)
    if correct is not None:
        corrected = correct(mixed)
        ref = {k: d for k, d, _ in arch.entries(a)}

        def produce(key: str) -> torch.Tensor:
            return corrected[key].detach().to(ref[key])

    return write_checkpoint(out, arch.entries(a), produce, like=a, overwrite=overwrite, max_shard_size=max_shard_size,
                            progress=progress, metadata=_metadata(arch, a, operation="merge", a=a.path, b=b.path,
                                                                  alpha=alpha))


def interpolated(arch: Architecture, perm: Mapping[str, torch.Tensor], alpha: float) -> Callable[[str], torch.Tensor]:
    """``key -> (1 - alpha) * A[key] + alpha * P(B)[key]``, one tensor at a time (A and B the
    first two checkpoints of ``arch``; as `permgraph.merge.interpolate`)."""
    from permgraph.merge import interpolate

    a = arch.checkpoints[0]
    aligned_b = permuted(arch.spec, perm, arch.checkpoints[1])

    def mixed(key: str) -> torch.Tensor:
        return interpolate({key: a[key]}, {key: aligned_b(key)}, alpha)[key]

    return mixed


def apply_to_checkpoint(
    arch: Architecture,
    perm: Mapping[str, torch.Tensor],
    out: str | os.PathLike,
    *,
    checkpoint: Checkpoint | None = None,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    progress: bool = False,
) -> Path:
    """Write ``checkpoint`` (default: the first of ``arch``) permuted by ``perm``, streaming."""
    arch.spec.check_permutation(perm)
    ck = arch.checkpoints[0] if checkpoint is None else checkpoint
    return write_checkpoint(out, arch.entries(ck), permuted(arch.spec, perm, ck), like=ck, overwrite=overwrite,
                            max_shard_size=max_shard_size, progress=progress,
                            metadata=_metadata(arch, ck, operation="apply", checkpoint=ck.path))
