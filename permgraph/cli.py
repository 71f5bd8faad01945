"""The ``permgraph`` command line: the parser and the shared options (the commands are in
`permgraph.commands`).

Every subcommand that reads checkpoints takes a Hugging Face folder (``config.json`` + safetensors
shards), a ``.safetensors`` file or a torch state_dict file; the architecture comes from the
folder's ``config.json``, or from ``--model MODULE:CALLABLE`` (e.g. ``torchvision.models:resnet18``)
with an example input (``--input-shape``, ``--input-name``, ``--kwarg``, or ``--data``). Outputs are
written with ``--out`` (a folder, or a ``.safetensors`` file), permutations with ``--perm-out``. A named
error prints one line and exits with status 2.

Under ``torchrun --nproc_per_node N -m permgraph align|merge|export ...``, each rank reads its share
of ``--data`` (batch ``i`` to rank ``i % N``) and the statistics of activation matching, BatchNorm
reset and REPAIR are summed over the ranks (`permgraph.distributed`); only rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from permgraph.errors import PermGraphError

__all__ = ["main", "build_parser", "load_model", "make_input"]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` as a dict (values read as Python literals, else strings)."""
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
        PermGraphError: the target is malformed, cannot be imported, does not accept the
            keywords (``--build-arg``), or does not return an ``nn.Module``.
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
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        try:
            model = obj(**(kwargs or {}))
        except TypeError as exc:
            raise PermGraphError(f"{target}({', '.join(f'{k}={v!r}' for k, v in (kwargs or {}).items())}) failed: "
                                 f"{exc}. Check the --build-arg names and values") from exc
    else:
        model = obj
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


def _size(text: str) -> int:
    from permgraph.checkpoint import parse_size

    try:
        return parse_size(text)  # type: ignore[return-value]
    except PermGraphError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Option groups shared by the subcommands, so a flag means one thing everywhere."""
    arch = argparse.ArgumentParser(add_help=False)
    g = arch.add_argument_group("architecture (for checkpoint files; a folder's config.json says it)")
    g.add_argument("--model", metavar="MODULE:CALLABLE", help="build the architecture, e.g. torchvision.models:resnet18")
    g.add_argument("--build-arg", action="append", metavar="KEY=VALUE", help="keyword for CALLABLE, e.g. num_classes=10")
    g.add_argument("--input-shape", default="1,3,224,224", help="shape of the example input (default 1,3,224,224)")
    g.add_argument("--input-dtype", default="float32", help="float32 (default), float64 or int64 (token ids)")
    g.add_argument("--input-high", type=int, default=2, help="int64 inputs are drawn from [0, HIGH)")
    g.add_argument("--input-name", default=None, help="pass the input as this keyword (e.g. input_ids)")
    g.add_argument("--kwarg", action="append", metavar="KEY=VALUE", help="extra keyword input, e.g. use_cache=False")
    g.add_argument("--heads", choices=("shared", "independent"), default="shared",
                   help="units within attention heads: one group shared by every head (default) or one per head")
    g.add_argument("--experts", choices=("shared", "independent"), default="shared",
                   help="hidden units of stacked experts: one group shared by every expert (default) or one per "
                        "expert (weight matching only)")

    run = argparse.ArgumentParser(add_help=False)
    r = run.add_argument_group("running")
    r.add_argument("--device", default="cpu", help="where the products run: cpu (default), cuda, cuda:1, ...")
    r.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="compute dtype of weight matching (default float32, or wider when stored wider)")
    r.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="what weight matching keeps between visits, e.g. 2GB (default 512MiB)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--json", action="store_true", help="print the results as JSON")

    write = argparse.ArgumentParser(add_help=False)
    w = write.add_argument_group("output")
    w.add_argument("--out", required=True, metavar="PATH",
                   help="the checkpoint to write: a folder (safetensors shards, index, the input's config and "
                        "tokenizer files) or a .safetensors file; written to a temporary name and renamed")
    w.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    w.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                   help="bytes per shard (default: as the input's largest shard)")

    match = argparse.ArgumentParser(add_help=False)
    m = match.add_argument_group("matching")
    m.add_argument("--method", choices=("weight", "activation"), default="weight",
                   help="weight matching (streamed, default) or activation matching (needs --data; loads the models)")
    m.add_argument("--data", help="'digits', 'digits-images', or a .safetensors file with x (inputs) and y (labels): "
                                  "activations for --method activation, statistics for --repair/--reset-bn")
    m.add_argument("--batch-size", type=int, default=256, help="batch size for the data (default 256)")
    return {"arch": arch, "run": run, "write": write, "match": match, "descent": _descent_parent()}


def _descent_parent() -> argparse.ArgumentParser:
    """The options of weight matching's coordinate descent (align, merge, barrier, export)."""
    descent = argparse.ArgumentParser(add_help=False)
    m = descent.add_argument_group("weight matching")
    m.add_argument("--seed", type=int, default=0, help="seed of weight matching's visiting order")
    m.add_argument("--order", choices=("random", "graph"), default="random",
                   help="weight matching's visiting order: random each sweep (default) or the state_dict's")
    m.add_argument("--tol", type=float, default=0.0,
                   help="stop weight matching at a sweep that raises the objective by at most this fraction of "
                        "what all sweeps raised it (default 0: when a sweep changes nothing)")
    m.add_argument("--first-pass", choices=("sweep", "forward"), default="sweep",
                   help="'forward': weight matching first matches each layer on its aligned input side "
                        "(fewer GEMMs; see the weight matching options in the docs)")
    return descent


def build_parser() -> argparse.ArgumentParser:
    from permgraph import __version__, commands

    p = argparse.ArgumentParser(prog="permgraph", description="Permutation symmetries of PyTorch models: find the "
                                "groups, align, merge and permute checkpoints of any size.")
    p.add_argument("--version", action="version", version=f"permgraph {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    par = _parents()
    ckpts = "checkpoint: a Hugging Face folder, a .safetensors file or a torch state_dict file"

    ins = sub.add_parser("inspect", parents=[par["arch"], par["run"]], help="print the permutation groups of a model")
    ins.add_argument("target", metavar="TARGET", help="MODULE:CALLABLE returning an nn.Module, or a " + ckpts)
    ins.add_argument("--members", type=int, default=4, help="members shown per group (default 4)")
    ins.add_argument("--verify", action="store_true", help="also run the oracle (random permutation, compare outputs)")
    ins.add_argument("--strict", action="store_true", help="fail if any op has no rule")
    ins.add_argument("--draw", metavar="FILE", default=None,
                     help="also draw the graph coloured by group: FILE.svg, .png, .pdf or .dot (images need Graphviz)")
    ins.add_argument("--module", metavar="PREFIX", default=None, help="with --draw: only this module, e.g. layer2")
    ins.add_argument("--depth", type=int, default=None, help="with --draw: one node per module down to this depth")
    ins.add_argument("--fold", action="store_true", help="with --draw: runs of identical blocks drawn once")
    ins.set_defaults(func=commands.inspect)

    ali = sub.add_parser("align", parents=[par["arch"], par["match"], par["descent"], par["run"], par["write"]],
                         help="align checkpoint B to checkpoint A and write B aligned")
    ali.add_argument("a", metavar="A", help="the reference " + ckpts)
    ali.add_argument("b", metavar="B", help="the checkpoint to align (same architecture)")
    ali.add_argument("--perm-out", metavar="FILE", help="also write the permutation (.safetensors)")
    ali.set_defaults(func=commands.align)

    mer = sub.add_parser("merge", parents=[par["arch"], par["match"], par["descent"], par["run"], par["write"]],
                         help="align B to A and write (1 - alpha) A + alpha B-aligned")
    mer.add_argument("a", metavar="A", help="the reference " + ckpts)
    mer.add_argument("b", metavar="B", help="the checkpoint to merge into A (same architecture)")
    mer.add_argument("--alpha", type=float, default=0.5, help="weight of B (default 0.5)")
    mer.add_argument("--perm", metavar="FILE", help="use this permutation file instead of matching")
    mer.add_argument("--perm-out", metavar="FILE", help="also write the permutation (.safetensors)")
    fix = mer.add_mutually_exclusive_group()
    fix.add_argument("--reset-bn", action="store_true", help="reset BatchNorm statistics of the merge on --data")
    fix.add_argument("--repair", action="store_true", help="REPAIR the merge on --data (Jordan et al. 2023)")
    mer.set_defaults(func=commands.merge)

    app = sub.add_parser("apply", parents=[par["arch"], par["run"], par["write"]],
                         help="write a checkpoint permuted by a permutation file")
    app.add_argument("perm", metavar="PERM_FILE", help="a permutation file (from align --perm-out)")
    app.add_argument("b", metavar="B", help="the " + ckpts + " to permute")
    app.set_defaults(func=commands.apply)

    bar = sub.add_parser("barrier", parents=[par["arch"], par["descent"], par["run"]],
                         help="loss and accuracy barriers between two checkpoints, naive and aligned")
    bar.add_argument("a", metavar="A", help="the first " + ckpts)
    bar.add_argument("b", metavar="B", help="the second")
    bar.add_argument("--data", required=True,
                     help="'digits' or 'digits-images' (scikit-learn digits, the demo's held-out split), "
                          "or a .safetensors file with tensors x (inputs) and y (labels)")
    bar.add_argument("--align", choices=("weight", "activation", "none"), default="weight",
                     help="how to align B to A besides the naive curve (default weight)")
    bar.add_argument("--perm", metavar="FILE", help="use this permutation file instead")
    bar.add_argument("--alphas", type=int, default=11, help="interpolation points (default 11)")
    bfix = bar.add_mutually_exclusive_group()
    bfix.add_argument("--reset-bn", action="store_true", help="reset BatchNorm statistics on the data at each alpha")
    bfix.add_argument("--repair", action="store_true", help="apply REPAIR on the data at each alpha")
    bar.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    bar.set_defaults(func=commands.barrier)

    exp = sub.add_parser("export", parents=[par["arch"], par["descent"], par["run"]],
                         help="align B to A by weight matching and write the permutation file only")
    exp.add_argument("a", metavar="A", help="the reference " + ckpts)
    exp.add_argument("b", metavar="B", help="the checkpoint to align")
    exp.add_argument("--perm-out", "--out", dest="perm_out", required=True, metavar="FILE",
                     help="the permutation file to write (.safetensors); --out is the old name")
    exp.add_argument("--aligned", metavar="PATH", help="also write B aligned (a folder or a .safetensors file)")
    exp.add_argument("--data", help="take the example input from this data source (as for barrier)")
    exp.set_defaults(func=commands.export)

    demo = sub.add_parser("demo", help="train two MLPs on digits, align them, print the barriers (Git Re-Basin in a minute)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--plot", metavar="FILE.png", help="save the interpolation curves (needs matplotlib)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--seed-a", type=int, default=0, help="seed of model A (default 0)")
    demo.add_argument("--seed-b", type=int, default=1, help="seed of model B (default 1)")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs per model (default 10)")
    demo.add_argument("--hidden", type=int, default=512, help="hidden width (default 512)")
    demo.add_argument("--depth", type=int, default=2, help="hidden layers (default 2)")
    demo.add_argument("--alphas", type=int, default=11, help="interpolation points from 0 to 1 (default 11)")
    demo.add_argument("--save-dir", metavar="DIR", help="also save the two models and the weight-matching permutation")
    demo.set_defaults(func=commands.demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``permgraph`` command."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (status 2, already printed), --help or --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    from permgraph.checkpoint import return_freed_memory

    return_freed_memory()
    distributed = False
    try:
        if args.command in ("align", "merge", "export"):  # under torchrun: one rank of several
            from permgraph.distributed import init_from_env, is_main_process

            distributed = init_from_env()
        args.main_rank = not distributed or is_main_process()
        if not args.main_rank:
            args.quiet = True
        return int(args.func(args))
    except PermGraphError as exc:
        print(f"permgraph {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `permgraph inspect ... --json | head`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
