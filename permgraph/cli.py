"""The ``permgraph`` command line.

``permgraph inspect MODULE:CALLABLE`` builds a model by calling ``CALLABLE`` from
``MODULE`` (e.g. ``torchvision.models:resnet18``), infers its groups and prints them with
the blocked-op report. ``permgraph demo`` trains two MLPs on digits and prints the barriers
naive and aligned; ``permgraph barrier A B`` measures them between two checkpoints;
``permgraph export A B`` writes the weight-matching permutation file.
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


# -- demo, barrier, export ----------------------------------------------------------------

def _load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` (no pickle) or a torch file (``weights_only=True``)."""
    from pathlib import Path

    if not Path(path).is_file():
        raise PermGraphError(f"no such checkpoint file: {path!r}")
    if path.endswith(".safetensors"):
        from permgraph.io import load_aligned

        return load_aligned(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise PermGraphError(
            f"cannot load {path!r} as a torch checkpoint with weights_only=True: {exc}. "
            "Save a plain state_dict (torch.save(model.state_dict(), path)) or a .safetensors file"
        ) from exc
    for wrapper in ("state_dict", "model"):  # {"state_dict": {...}, "epoch": ...}
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PermGraphError(f"{path!r} does not hold a state_dict (a dict of tensors)")
    return obj


def _load_data(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``digits`` / ``digits-images`` (the demo's held-out split) or a safetensors file with ``x`` and ``y``."""
    if source in ("digits", "digits-images"):
        from permgraph.demo import load_digits

        data = load_digits(images=source == "digits-images")
        return data.x_test, data.y_test
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(source)
    except (OSError, SafetensorError) as exc:
        raise PermGraphError(
            f"--data {source!r}: not 'digits', 'digits-images' or a readable safetensors file ({exc})"
        ) from exc
    if "x" not in tensors or "y" not in tensors:
        raise PermGraphError(f"--data {source!r} must hold tensors named 'x' (inputs) and 'y' (integer labels); it has {sorted(tensors)}")
    x, y = tensors["x"], tensors["y"]
    if len(x) != len(y) or y.dtype.is_floating_point:
        raise PermGraphError(f"--data {source!r}: 'y' must hold one integer label per row of 'x'")
    return x, y


def _spec_and_models(args: argparse.Namespace, example: torch.Tensor) -> tuple[Any, Any, dict, dict]:
    from permgraph.analysis import infer

    model = load_model(args.model, _pairs(args.build_arg, "--build-arg"))
    state_a, state_b = _load_checkpoint(args.a), _load_checkpoint(args.b)
    try:
        spec = infer(model, example)
    except TraceError as exc:
        raise TraceError(f"{exc}\n(The example input was {tuple(example.shape)} {example.dtype}.)") from exc
    spec.check_state_dict(state_a, f"checkpoint A ({args.a})")
    spec.check_state_dict(state_b, f"checkpoint B ({args.b})")
    return spec, model, state_a, state_b


def _demo(args: argparse.Namespace) -> int:
    from permgraph.demo import plot_curves, run_demo

    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before training, not after
        except ImportError as exc:
            raise PermGraphError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from exc
        from pathlib import Path

        if not Path(args.plot).resolve().parent.is_dir():
            raise PermGraphError(f"--plot {args.plot!r}: the folder {str(Path(args.plot).parent)!r} does not exist")
    result = run_demo(seed_a=args.seed_a, seed_b=args.seed_b, epochs=args.epochs, alphas=args.alphas,
                      widths=(64, *([args.hidden] * args.depth), 10), progress=not args.quiet)
    if args.plot:
        plot_curves(result.curves, args.plot, title="Interpolating two MLPs trained on digits (held-out data)")
    if args.save_dir:
        result.save(args.save_dir)
    if args.json:
        print(result.to_json())
    else:
        print(result)
        if args.plot:
            print(f"  curves saved to {args.plot}")
        if args.save_dir:
            print(f"  models (a, b) and permutations saved in {args.save_dir}/")
    return 0


def _barrier(args: argparse.Namespace) -> int:
    from permgraph.demo import batches, evaluator
    from permgraph.io import load_permutation
    from permgraph.merge import repair, reset_batchnorm
    from permgraph.metrics import interpolation_curve

    if args.reset_bn and args.repair:
        raise PermGraphError("choose one of --reset-bn and --repair")
    x, y = _load_data(args.data)
    spec, model, state_a, state_b = _spec_and_models(args, x[: args.batch_size])
    evaluate = evaluator(model, x, y, batch_size=args.batch_size)
    data = batches(x, batch_size=args.batch_size)
    transform = None
    if args.reset_bn:
        def transform(alpha: float, sd: dict) -> dict:
            model.load_state_dict(sd)
            reset_batchnorm(model, data)
            return {k: v.clone() for k, v in model.state_dict().items()}
    elif args.repair:
        import copy

        model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
        model_a.load_state_dict(state_a)

        def transform(alpha: float, sd: dict) -> dict:
            model.load_state_dict(sd)
            repair(model_a, model_b, model, data, spec, alpha)
            return {k: v.clone() for k, v in model.state_dict().items()}
    perms: dict[str, Any] = {"naive": spec.identity()}
    if args.perm:
        perms["aligned"] = load_permutation(args.perm, spec)
    elif args.align == "weight":
        from permgraph.match import weight_matching

        perms["weight_matching"] = weight_matching(spec, state_a, state_b, progress=not args.quiet)
    elif args.align == "activation":
        import copy

        from permgraph.match import activation_matching

        ma, mb = copy.deepcopy(model), copy.deepcopy(model)
        ma.load_state_dict(state_a)
        mb.load_state_dict(state_b)
        perms["activation_matching"] = activation_matching(spec, ma, mb, data, progress=not args.quiet)
    curves = {}
    for name, perm in perms.items():
        aligned_b = spec.apply(perm, state_b)
        if args.repair:
            model_b.load_state_dict(aligned_b)
        curves[name] = interpolation_curve(state_a, aligned_b, evaluate, args.alphas, transform=transform,
                                           progress=not args.quiet, desc=f"interpolate ({name})")
    correction = "BatchNorm reset" if args.reset_bn else "REPAIR" if args.repair else "none"
    if args.json:
        out = {
            "loss_barrier": {k: c.loss_barrier for k, c in curves.items()},
            "accuracy_barrier": {k: c.accuracy_barrier for k, c in curves.items()},
            "correction": correction,
            "curves": {k: c.to_dict() for k, c in curves.items()},
        }
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.model}: A={args.a}, B={args.b}, {len(x)} examples from {args.data}, correction: {correction}")
    print(f"  {'B aligned by':<22} {'loss barrier':>13} {'accuracy barrier':>17}   loss at each alpha")
    for name, c in curves.items():
        print(f"  {name.replace('_', ' '):<22} {c.loss_barrier:>13.4f} {100 * float(c.accuracy_barrier):>12.2f} pts   "
              + " ".join(f"{v:.3f}" for v in c.loss))
    return 0


def _example(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The example input (two rows of ``--data``, else a random ``--input-shape``) and the data."""
    if args.data:
        x, _ = _load_data(args.data)
        return x[:2], x
    return make_input(args.input_shape, args.input_dtype, args.input_high), None


def _export(args: argparse.Namespace) -> int:
    from permgraph.io import save_aligned, save_permutation
    from permgraph.match import weight_matching
    from permgraph.metrics import fixed_points

    example, _ = _example(args)
    spec, _, state_a, state_b = _spec_and_models(args, example)
    t0 = time.perf_counter()
    perm, hist = weight_matching(spec, state_a, state_b, seed=args.seed, progress=not args.quiet, return_history=True)
    seconds = time.perf_counter() - t0
    path = save_permutation(args.out, spec, perm)
    if args.aligned:
        save_aligned(args.aligned, spec.apply(perm, state_b), spec=spec)
    moved = 1.0 - fixed_points(perm).overall
    if args.json:
        print(json.dumps({"permutation": str(path), "aligned": args.aligned, "groups": {g.name: g.size for g in spec.groups},
                          "moved_fraction": moved, "objective": [hist.objective[0], hist.objective[-1]],
                          "sweeps": hist.sweeps, "seconds": round(seconds, 3)}, indent=1))
        return 0
    print(f"weight matching: {len(spec.groups)} groups, {spec.num_units} units, {hist.sweeps} sweeps in {seconds:.2f} s; "
          f"{moved:.1%} of B's units moved; objective {hist.objective[0]:.4g} -> {hist.objective[-1]:.4g}")
    print(f"  permutation written to {path}" + (f", B aligned to A written to {args.aligned}" if args.aligned else ""))
    return 0


def _align(args: argparse.Namespace) -> int:
    from permgraph.io import save_aligned, save_permutation
    from permgraph.match import activation_matching, weight_matching

    example, x = _example(args)
    spec, model, state_a, state_b = _spec_and_models(args, example)
    t0 = time.perf_counter()
    if args.method == "weight":
        perm = weight_matching(spec, state_a, state_b, seed=args.seed, progress=not args.quiet)
    else:
        if not args.data:
            raise PermGraphError("--method activation needs --data (the activations are measured on it)")
        model_b = load_model(args.model, _pairs(args.build_arg, "--build-arg"))
        model.load_state_dict(state_a)
        model_b.load_state_dict(state_b)
        batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
        perm = activation_matching(spec, model, model_b, batches, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    aligned = spec.apply(perm, state_b)
    out = save_aligned(args.out, aligned, spec=spec)
    if args.perm_out:
        save_permutation(args.perm_out, spec, perm)
    rows = []
    for g in spec.groups:
        moved = float((perm[g.name] != torch.arange(g.size)).float().mean())
        before = sum(float((state_a[m.key] - state_b[m.key]).float().norm()) for m in g.members[:1])
        after = sum(float((state_a[m.key] - aligned[m.key]).float().norm()) for m in g.members[:1])
        rows.append({"group": g.name, "size": g.size, "moved": moved, "distance_before": before, "distance_after": after})
    if args.json:
        print(json.dumps({"aligned": str(out), "permutation": args.perm_out, "method": args.method,
                          "seconds": round(seconds, 3), "groups": rows}, indent=1))
        return 0
    print(f"{args.method} matching: {len(spec.groups)} groups, {spec.num_units} units in {seconds:.2f} s; "
          f"B aligned to A written to {out}" + (f", permutation to {args.perm_out}" if args.perm_out else ""))
    w = max([len("group")] + [len(r["group"]) for r in rows])
    print(f"  {'group':<{w}}  {'size':>5}  {'moved':>6}  ||A-B|| of first member: before -> after")
    for r in rows:
        print(f"  {r['group']:<{w}}  {r['size']:>5}  {r['moved']:>6.1%}  {r['distance_before']:.4g} -> {r['distance_after']:.4g}")
    return 0


def _add_end_to_end_commands(sub: Any) -> None:
    """The ``demo``, ``align``, ``barrier`` and ``export`` subcommands."""
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
    demo.set_defaults(func=_demo)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("a", help="checkpoint of model A (.safetensors, or a torch state_dict file)")
        p.add_argument("b", help="checkpoint of model B")
        p.add_argument("--model", required=True, help="MODULE:CALLABLE building the architecture, e.g. permgraph.demo:make_mlp")
        p.add_argument("--build-arg", action="append", metavar="KEY=VALUE", help="keyword for CALLABLE")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--json", action="store_true", help="print the results as JSON")

    ali = sub.add_parser("align", help="align checkpoint B to checkpoint A and write B's aligned weights")
    common(ali)
    ali.add_argument("--out", required=True, metavar="FILE", help="aligned weights of B to write (.safetensors)")
    ali.add_argument("--perm-out", metavar="FILE", help="also write the permutation (.safetensors)")
    ali.add_argument("--method", choices=("weight", "activation"), default="weight", help="matcher (default weight)")
    ali.add_argument("--data", help="data source (as for barrier): the example input, and activations for --method activation")
    ali.add_argument("--batch-size", type=int, default=256, help="batch size for activation matching (default 256)")
    ali.add_argument("--input-shape", default="1,3,224,224", help="shape of the example input when there is no --data")
    ali.add_argument("--input-dtype", default="float32", help="float32 (default), float64 or int64")
    ali.add_argument("--input-high", type=int, default=2, help="int64 inputs are drawn from [0, HIGH)")
    ali.add_argument("--seed", type=int, default=0, help="seed of weight matching's visiting order")
    ali.set_defaults(func=_align)

    bar = sub.add_parser("barrier", help="loss and accuracy barriers between two checkpoints, naive and aligned")
    common(bar)
    bar.add_argument("--data", required=True,
                     help="'digits' or 'digits-images' (scikit-learn digits, the demo's held-out split), "
                          "or a .safetensors file with tensors x (inputs) and y (labels)")
    bar.add_argument("--align", choices=("weight", "activation", "none"), default="weight",
                     help="how to align B to A besides the naive curve (default weight)")
    bar.add_argument("--perm", metavar="FILE", help="use this permutation file (from 'permgraph export') instead")
    bar.add_argument("--alphas", type=int, default=11, help="interpolation points (default 11)")
    bar.add_argument("--reset-bn", action="store_true", help="reset BatchNorm statistics on the data at each alpha")
    bar.add_argument("--repair", action="store_true", help="apply REPAIR on the data at each alpha")
    bar.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    bar.set_defaults(func=_barrier)

    exp = sub.add_parser("export", help="align B to A by weight matching and write the permutation file")
    common(exp)
    exp.add_argument("--out", required=True, metavar="FILE", help="the permutation file to write (.safetensors)")
    exp.add_argument("--aligned", metavar="FILE", help="also write B aligned to A (.safetensors)")
    exp.add_argument("--data", help="take the example input from this data source (as for barrier)")
    exp.add_argument("--input-shape", default="1,3,224,224", help="shape of the example input when there is no --data")
    exp.add_argument("--input-dtype", default="float32", help="float32 (default), float64 or int64")
    exp.add_argument("--input-high", type=int, default=2, help="int64 inputs are drawn from [0, HIGH)")
    exp.add_argument("--seed", type=int, default=0, help="seed of weight matching's visiting order")
    exp.set_defaults(func=_export)


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
    _add_end_to_end_commands(sub)
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
