"""Helpers shared by the rule families."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from permgraph.rules import Axis, Block, Constraint, Free, Prod, TensorValue, Tie


def broadcast(inputs: Sequence[TensorValue | None], out: TensorValue, why: str) -> Iterator[Constraint]:
    """Inputs broadcast against ``out`` (dims aligned from the right): equal sizes are tied,
    size-1 dims are free (their single unit has nowhere to move), anything else blocks."""
    for x in inputs:
        if x is None:
            continue
        if x.ndim > out.ndim:
            yield from (Block(a, f"{why}: input has more dims than the output", True) for a in x.axes)
            continue
        for d in range(1, x.ndim + 1):
            xa, oa = x.axis(-d), out.axis(-d)
            if xa.size == oa.size:
                yield Tie(xa, oa, why)
            elif xa.size == 1:
                yield Free(xa)
            else:
                yield Block(xa, f"{why}: size {xa.size} does not broadcast to {oa.size}", True)


def tie_all(x: TensorValue, y: TensorValue, why: str) -> Iterator[Constraint]:
    """Tie dim d of ``x`` to dim d of ``y`` for every d (same shape expected)."""
    if x.shape != y.shape:
        yield from (Block(a, f"{why}: shapes {x.shape} and {y.shape} differ", True) for a in x.axes + y.axes)
        return
    for a, b in zip(x.axes, y.axes):
        yield Tie(a, b, why)


def tie_except(x: TensorValue, y: TensorValue, skip: set[int], why: str) -> Iterator[Constraint]:
    """Tie the dims of ``x`` to those of ``y`` in order, skipping ``x``'s dims in ``skip``
    (which ``y`` does not have)."""
    kept = [d for d in range(x.ndim) if d not in skip]
    if len(kept) != y.ndim:
        yield from (Block(a, f"{why}: unexpected output rank", True) for a in x.axes + y.axes)
        return
    for dx, dy in zip(kept, range(y.ndim)):
        yield Tie(x.axis(dx), y.axis(dy), why)


def reshape(x: TensorValue, y: TensorValue, why: str) -> Iterator[Constraint]:
    """Same elements in row-major order under another shape: the product of ``x``'s axes
    equals the product of ``y``'s (size-1 axes carry nothing and are free)."""
    for a in x.axes + y.axes:
        if a.size == 1:
            yield Free(a)
    xs = [a for a in x.axes if a.size != 1]
    ys = [a for a in y.axes if a.size != 1]
    if xs or ys:
        yield Tie(Prod(*xs), Prod(*ys), why)


def block_all(values: Sequence[TensorValue | None], reason: str, report: bool = False) -> Iterator[Constraint]:
    """Block every axis of ``values``; ``report=True`` lists the op in ``spec.unsupported``."""
    for v in values:
        if v is not None:
            yield from (Block(a, reason, report) for a in v.axes)


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def axes_of(v: TensorValue | None) -> list[Axis]:
    return [] if v is None else v.axes


def is_mask(node: Any) -> bool:
    """Whether an index argument is a boolean (or uint8) mask: it indexes as many dims as it has."""
    val = getattr(node, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.dtype in (torch.bool, torch.uint8)
