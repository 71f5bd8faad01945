"""Digests of values and state_dicts, equal on every rank that holds the same ones: what the
handshake of `permgraph.distributed` compares (exactly, or to a tolerance: `Approx`).
Re-exported by `permgraph.distributed`, where they are documented."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["digest", "state_digest", "Approx", "state_fingerprint", "model_items"]


def digest(value: Any) -> int:
    """A 63-bit digest of ``repr(value)`` (names, sizes, options), equal on every rank."""
    h = hashlib.blake2b(repr(value).encode("utf-8"), digest_size=8).digest()
    return struct.unpack("<q", h)[0] & 0x7FFFFFFFFFFFFFFF


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_digest(t: torch.Tensor) -> int:
    """An exact digest of a tensor's values: a position-weighted sum of their bit patterns
    in int64 (integer sums do not depend on the order of summation or on the device)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    size = flat.element_size()
    if flat.is_floating_point() or size not in _INT or flat.dtype != _INT[size]:
        flat = flat.view(_INT[size]) if size in _INT else flat.to(torch.float64).view(torch.int64)
    total = 0
    chunk = 1 << 22
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk].to(torch.int64)
        weight = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.int64) % 1_000_003 + 1
        total += int((part * weight).sum())
    return total & 0x7FFFFFFFFFFFFFFF


def state_digest(state: Mapping[str, Any], keys: Iterable[str] | None = None) -> int:
    """A digest of a state_dict (names, shapes, dtypes and exact values), equal on two
    ranks exactly when they hold the same tensors, whatever their devices.

    Args:
        state: the state_dict.
        keys: the keys to include (default: all), in a fixed order.

    Returns:
        A 63-bit integer.

    Examples:
        >>> import torch
        >>> from permgraph.distributed import state_digest
        >>> a = {"w": torch.tensor([1.0, 2.0])}
        >>> state_digest(a) == state_digest({"w": torch.tensor([1.0, 2.0])})
        True
        >>> state_digest(a) == state_digest({"w": torch.tensor([2.0, 1.0])})
        False
    """
    parts = []
    for key in (sorted(state) if keys is None else list(keys)):
        v = state[key]
        if isinstance(v, torch.Tensor):
            parts.append((key, tuple(v.shape), str(v.dtype), _bits_digest(v)))
        else:
            parts.append((key, repr(v)))
    return digest(parts)


@dataclass(frozen=True)
class Approx:
    """A handshake item compared with a tolerance: ranks agree when their ``value`` differ
    by at most ``rtol`` times the larger ``scale``."""

    value: float
    scale: float
    rtol: float = 1e-4


def state_fingerprint(state: Mapping[str, Any], keys: Iterable[str] | None = None) -> Approx:
    """A tolerant fingerprint of a state_dict's values: ``Σ w_i c_i`` over every float
    element, with fixed pseudo-random weights ``c_i`` in ``[-1, 1]`` (from the element's
    position and its key), and its scale ``Σ |w_i c_i|``, in float64 on the tensors' devices.
    Two models that differ only by float rounding (the last bits of a retrained or
    differently reduced copy) agree; different models, other weights, do not.

    Args:
        state: the state_dict.
        keys: the keys to include (default: all), in a fixed order.

    Returns:
        An :class:`Approx` with ``rtol=1e-4``.
    """
    value = scale = 0.0
    for k, key in enumerate(sorted(state) if keys is None else list(keys)):
        t = state[key]
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        flat = (torch.view_as_real(t) if t.is_complex() else t).detach().reshape(-1)
        chunk = 1 << 22
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk].to(torch.float64)
            pos = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.float64)
            c = pos * 0.6180339887498949 + (k + 1) * 0.4142135623730951
            c = 2.0 * (c - torch.floor(c)) - 1.0
            prod = part * c
            value += float(prod.sum())
            scale += float(prod.abs().sum())
    return Approx(value, scale)


def model_items(name: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """The handshake items of a model's state_dict: its structure (names, shapes, dtypes;
    exact), its values (:func:`state_fingerprint`, to a tolerance: a mismatch is an error)
    and its bits (:func:`state_digest`; to be passed in ``warn_only``).

    Returns:
        ``{name: ..., name + " values": ..., name + " bits": ...}``.
    """
    structure = [(k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, repr(v))
                 for k, v in sorted(state.items())]
    return {name: digest(structure), f"{name} values": state_fingerprint(state), f"{name} bits": state_digest(state)}
