"""The ``permgraph`` command line.

``permgraph inspect MODULE:CALLABLE`` builds a model by calling ``CALLABLE`` from
``MODULE`` (e.g. ``torchvision.models:resnet18``), infers its groups and prints them with
the blocked-op report.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from permgraph.errors import PermGraphError, TraceError

__all__ = ["main", "load_model", "make_input"]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PermGraphError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = _literal(value)
    return out


def load_model(target: str, kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build a model from ``"package.module:callable"``.

    Raises:
        PermGraphError: the target is malformed, cannot be imported, or does not return an
            ``nn.Module``.
    """
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise PermGraphError(f"expected MODULE:CALLABLE (e.g. torchvision.models:resnet18), got {target!r}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise PermGraphError(f"cannot import {mod_name!r}: {exc}. Is it installed (pip install -e '.[vision]')?") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PermGraphError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj(**(kwargs or {})) if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise PermGraphError(f"{target} returned {type(model).__name__}, not an nn.Module")
    return model


def make_input(shape: str, dtype: str = "float32", high: int = 2) -> torch.Tensor:
    """A seeded random tensor of ``shape`` (``"1,3,224,224"``); integers lie in [0, high)."""
    try:
        dims = tuple(int(s) for s in shape.split(","))
    except ValueError as exc:
        raise PermGraphError(f"--input-shape expects comma-separated integers, got {shape!r}") from exc
    g = torch.Generator().manual_seed(0)
    if dtype in ("int64", "long"):
        return torch.randint(0, high, dims, generator=g)
    if dtype not in ("float32", "float64"):
        raise PermGraphError(f"--input-dtype must be float32, float64 or int64, got {dtype!r}")
    return torch.randn(dims, generator=g, dtype=getattr(torch, dtype))


def _inspect(args: argparse.Namespace) -> int:
    from permgraph.analysis import infer

    model = load_model(args.model, _pairs(args.build_arg, "--build-arg"))
    x = make_input(args.input_shape, args.input_dtype, args.input_high)
    kwargs = _pairs(args.kwarg, "--kwarg")
    inputs: Any = {args.input_name: x, **kwargs} if args.input_name else ((x,) if not kwargs else None)
    if inputs is None:
        raise PermGraphError("--kwarg needs --input-name (the keyword the model takes its input by)")
    t0 = time.perf_counter()
    try:
        spec = infer(model, inputs, strict=args.strict)
    except TraceError as exc:
        raise TraceError(f"{exc}\n(Set the example input with --input-shape, --input-dtype, --input-name, --kwarg.)") from exc
    seconds = time.perf_counter() - t0
    error = spec.verify(model, inputs) if args.verify else None
    if args.json:
        out = spec.to_dict()
        out["model"] = args.model
        out["seconds"] = round(seconds, 3)
        out["trace"] = spec.traced.method
        if error is not None:
            out["verify_error"] = error
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(f"{args.model}: traced with {spec.traced.method} in {spec.traced.seconds:.2f} s, "
              f"{seconds:.2f} s in all")
        print(spec.table(max_members=args.members))
        if error is not None:
            print(f"verify: a random permutation of every group changes the outputs by {error:.2e} (relative)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="permgraph", description="Permutation symmetries of PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="print the permutation groups of a model")
    ins.add_argument("model", help="MODULE:CALLABLE returning an nn.Module, e.g. torchvision.models:resnet18")
    ins.add_argument("--input-shape", default="1,3,224,224", help="shape of the example input (default 1,3,224,224)")
    ins.add_argument("--input-dtype", default="float32", help="float32 (default), float64 or int64 (token ids)")
    ins.add_argument("--input-high", type=int, default=2, help="int64 inputs are drawn from [0, HIGH)")
    ins.add_argument("--input-name", default=None, help="pass the input as this keyword (e.g. input_ids)")
    ins.add_argument("--kwarg", action="append", metavar="KEY=VALUE", help="extra keyword input, e.g. use_cache=False")
    ins.add_argument("--build-arg", action="append", metavar="KEY=VALUE", help="keyword for CALLABLE, e.g. num_classes=10")
    ins.add_argument("--members", type=int, default=4, help="members shown per group (default 4)")
    ins.add_argument("--verify", action="store_true", help="also run the oracle (random permutation, compare outputs)")
    ins.add_argument("--strict", action="store_true", help="fail if any op has no rule")
    ins.add_argument("--json", action="store_true", help="print the spec as JSON")
    ins.set_defaults(func=_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``permgraph`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PermGraphError as exc:
        print(f"permgraph {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
