"""The subcommands of the ``permgraph`` command line (the parser is `permgraph.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from permgraph.cli import load_model, make_input, pairs
from permgraph.errors import PermGraphError, TraceError
from permgraph.pipeline import (
    Architecture,
    align_checkpoints,
    apply_to_checkpoint,
    architecture,
    match_checkpoints,
    merge_checkpoints,
)

__all__ = ["inspect", "align", "merge", "apply", "barrier", "export", "demo"]


# -- inputs -----------------------------------------------------------------------------------

def _data(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``digits`` / ``digits-images`` (the demo's held-out split) or a safetensors file with ``x`` and ``y``."""
    if source in ("digits", "digits-images"):
        from permgraph.examples.digits import load_digits

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


def _example(args: argparse.Namespace, x: torch.Tensor | None = None) -> Any:
    """The example input of a ``--model`` architecture: two rows of the data, else ``--input-shape``."""
    x = x[:2] if x is not None else make_input(args.input_shape, args.input_dtype, args.input_high)
    kwargs = pairs(args.kwarg, "--kwarg")
    if args.input_name:
        return {args.input_name: x, **kwargs}
    if kwargs:
        raise PermGraphError("--kwarg needs --input-name (the keyword the model takes its input by)")
    return (x,)


def _arch(args: argparse.Namespace, paths: list[str], x: torch.Tensor | None = None) -> Architecture:
    """Open the checkpoints and infer the spec: from ``--model`` when given, else from the
    first folder's config.json."""
    model = load_model(args.model, pairs(args.build_arg, "--build-arg")) if args.model else None
    inputs = _example(args, x) if model is not None else None
    try:
        return architecture(paths, model=model, inputs=inputs, heads=args.heads, experts=args.experts)
    except TraceError as exc:
        if model is None:
            raise
        raise TraceError(f"{exc}\n(Set the example input with --input-shape, --input-dtype, --input-name, --kwarg "
                         "or --data.)") from exc


def _batches(arch: Architecture, x: torch.Tensor, batch_size: int) -> Any:
    """``x`` in batches, each passed to the model as its example input was; under torchrun,
    this rank's share (batch ``i`` to rank ``i % world``: the statistics are summed over ranks)."""
    from permgraph.data import batches

    chunks = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    if isinstance(arch.inputs, dict):
        name = next(k for k, v in arch.inputs.items() if isinstance(v, torch.Tensor))
        rest = {k: v for k, v in arch.inputs.items() if not isinstance(v, torch.Tensor)}
        chunks = [{name: c, **rest} for c in chunks]
    return batches(chunks)


def _live_model(args: argparse.Namespace, arch: Architecture, state: Any) -> torch.nn.Module:
    """A model in memory holding ``state`` (for what must run it)."""
    if args.model:
        model = load_model(args.model, pairs(args.build_arg, "--build-arg"))
    else:
        from permgraph.checkpoint import build_model

        model, _ = build_model(arch.checkpoints[0], device="cpu")
    model.load_state_dict({k: state[k] for k in arch.spec.shapes})
    return model.to(args.device).eval()


def _match_options(args: argparse.Namespace) -> dict[str, Any]:
    from permgraph.match.weight import DEFAULT_MAX_MEMORY

    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise PermGraphError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    return {"seed": args.seed, "order": args.order, "tol": args.tol, "first_pass": args.first_pass,
            "max_memory": DEFAULT_MAX_MEMORY if args.max_memory is None else args.max_memory,
            "device": args.device, "dtype": getattr(torch, args.dtype) if args.dtype else None}


def _write_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"overwrite": args.overwrite, "max_shard_size": args.max_shard_size, "progress": not args.quiet}


def _activation_inputs(args: argparse.Namespace, arch: Architecture, x: torch.Tensor | None) -> dict[str, Any]:
    if args.method != "activation":
        return {}
    if x is None:
        raise PermGraphError("--method activation needs --data (the activations are measured on it)")
    a, b = arch.checkpoints[0], arch.checkpoints[1]
    return {"batches": _batches(arch, x.to(args.device), args.batch_size),
            "load_models": lambda: (_live_model(args, arch, a), _live_model(args, arch, b))}


def _report(arch: Architecture, perm: dict[str, torch.Tensor], hist: Any, seconds: float, out: dict[str, Any],
            args: argparse.Namespace, what: str) -> None:
    moved = {g.name: float((perm[g.name] != torch.arange(g.size)).float().mean()) for g in arch.spec.groups}
    total = sum(moved[g.name] * g.size for g in arch.spec.groups) / max(arch.spec.num_units, 1)
    if hist is not None:
        out |= {"sweeps": hist.sweeps, "objective": [hist.objective[0], hist.objective[-1]],
                "cache_peak_bytes": hist.cache_peak, "gemm_flops": hist.gemm_flops, "lap_seconds": hist.lap_seconds,
                "matching_seconds": hist.seconds}
    rows = [{"group": g.name, "size": g.size, "moved": moved[g.name]} for g in arch.spec.groups]
    if len(arch.checkpoints) > 1:  # how far B's first member of each group is from A's, before and after
        from permgraph.pipeline import permuted

        a, b = arch.checkpoints[0], arch.checkpoints[1]
        aligned = permuted(arch.spec, perm, b)
        for row, g in zip(rows, arch.spec.groups):
            key = g.members[0].key
            row["distance_before"] = float((a[key].float() - b[key].float()).norm())
            row["distance_after"] = float((a[key].float() - aligned(key).float()).norm())
    out |= {"seconds": round(seconds, 3), "moved_fraction": total, "groups": rows}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    how = f"{args.method} matching" if getattr(args, "method", None) else "permutation"
    sweeps = f", {hist.sweeps} sweeps, objective {hist.objective[0]:.4g} -> {hist.objective[-1]:.4g}" if hist else ""
    print(f"{how}: {len(arch.spec.groups)} groups, {arch.spec.num_units} units in {seconds:.2f} s{sweeps}; "
          f"{total:.1%} of B's units moved; {what}")
    if len(arch.spec.groups) <= 40:
        w = max([len("group")] + [len(g.name) for g in arch.spec.groups])
        dist = "distance_before" in rows[0] if rows else False
        print(f"  {'group':<{w}}  {'size':>6}  {'moved':>6}" + ("  ||A-B|| of its first member: before -> after" if dist else ""))
        for r in rows:
            print(f"  {r['group']:<{w}}  {r['size']:>6}  {r['moved']:>6.1%}"
                  + (f"  {r['distance_before']:.4g} -> {r['distance_after']:.4g}" if dist else ""))


# -- commands ---------------------------------------------------------------------------------

def inspect(args: argparse.Namespace) -> int:
    """``permgraph inspect TARGET``: the groups of MODULE:CALLABLE, a folder or a checkpoint file."""
    from permgraph.analysis import infer

    if args.draw:
        from permgraph.draw import check_path

        check_path(args.draw)  # a bad suffix fails before the model is built and traced
    elif args.module is not None or args.depth is not None or args.fold:
        raise PermGraphError("--module, --depth and --fold shape the drawing: add --draw FILE.svg|.png|.dot")
    t0 = time.perf_counter()
    target = args.target
    extra: dict[str, Any] = {}
    if Path(target).exists() or ":" not in target:
        arch = _arch(args, [target])
        spec, ck = arch.spec, arch.checkpoints[0]
        if args.verify:
            raise PermGraphError("--verify runs the model, which inspecting a checkpoint does not load; run "
                                 "`permgraph inspect MODULE:CALLABLE --verify` or spec.verify in Python")
        dtypes = sorted({str(ck.dtype(k)).removeprefix("torch.") for k in ck.stored_keys})
        extra = {"checkpoint": str(ck.path), "files": len(ck.files), "tensors": len(ck.stored_keys),
                 "bytes": ck.nbytes(), "dtypes": dtypes, "architecture": type(arch.model).__name__}
        title = (f"{target}: {type(arch.model).__name__}, {len(ck.stored_keys)} tensors in {len(ck.files)} file(s), "
                 f"{ck.nbytes() / 1e9:.3g} GB {'/'.join(dtypes)}")
    else:
        model = load_model(target, pairs(args.build_arg, "--build-arg"))
        inputs = _example(args)
        try:
            spec = infer(model, inputs, strict=args.strict, heads=args.heads, experts=args.experts)
        except TraceError as exc:
            raise TraceError(f"{exc}\n(Set the example input with --input-shape, --input-dtype, --input-name, --kwarg.)") from exc
        if args.verify:
            extra["verify_error"] = spec.verify(model, inputs)
        title = (f"{target}: traced with {spec.analysis.traced.method} in {spec.analysis.traced.seconds:.2f} s"
                 if spec.analysis is not None else f"{target}: not traceable whole, analysed as islands (see the blocked ops)")
    if args.strict and spec.unsupported:
        from permgraph.errors import UnsupportedOpError

        raise UnsupportedOpError(f"{len(spec.unsupported)} op(s) have no rule: " + "; ".join(map(str, spec.unsupported[:5])))
    seconds = time.perf_counter() - t0
    if args.json:
        out = spec.to_dict() | {"model": target, "seconds": round(seconds, 3),
                                "trace": spec.analysis.traced.method if spec.analysis is not None else "islands"} | extra
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(f"{title}; {seconds:.2f} s in all")
        print(spec.table(max_members=args.members))
        if "verify_error" in extra:
            print(f"verify: a random permutation of every group changes the outputs by {extra['verify_error']:.2e} (relative)")
    if args.draw:
        from permgraph.draw import draw

        written = draw(spec, module=args.module, depth=args.depth, fold=args.fold).save(args.draw)
        print(f"drawing: {written}", file=sys.stderr if args.json else sys.stdout)
    return 0


def align(args: argparse.Namespace) -> int:
    """``permgraph align A B --out OUT``: B aligned to A, streamed."""
    if not args.main_rank and args.method == "weight":
        return 0  # under torchrun, weight matching reads no data: rank 0 alone does it
    x = _data(args.data)[0] if args.data else None
    arch = _arch(args, [args.a, args.b], x)
    t0 = time.perf_counter()
    if not args.main_rank:  # take part in activation matching's statistics; rank 0 writes
        match_checkpoints(arch, method=args.method, progress=False, **_match_options(args),
                          **_activation_inputs(args, arch, x))
        return 0
    perm, hist = align_checkpoints(arch, args.out, method=args.method, perm_out=args.perm_out,
                                   **_match_options(args), **_activation_inputs(args, arch, x), **_write_options(args))
    wrote = f"B aligned to A written to {args.out}" + (f", permutation to {args.perm_out}" if args.perm_out else "")
    _report(arch, perm, hist, time.perf_counter() - t0,
            {"aligned": args.out, "permutation": args.perm_out, "method": args.method}, args, wrote)
    return 0


def _correction(args: argparse.Namespace, arch: Architecture, x: torch.Tensor | None,
                perm: dict[str, torch.Tensor]) -> Callable[[Callable[[str], torch.Tensor]], dict[str, torch.Tensor]] | None:
    """The in-memory step of ``merge --reset-bn`` / ``--repair``: merged tensors -> corrected state_dict."""
    if not (args.reset_bn or args.repair):
        return None
    if x is None:
        raise PermGraphError(f"--{'reset-bn' if args.reset_bn else 'repair'} needs --data (the statistics come from it)")
    from permgraph.merge import repair, reset_batchnorm

    data = _batches(arch, x.to(args.device), args.batch_size)

    def correct(mixed: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        merged = _live_model(args, arch, {k: mixed(k) for k in arch.spec.shapes})
        if args.reset_bn:
            reset_batchnorm(merged, data)
        else:
            from permgraph.pipeline import permuted

            a, b = arch.checkpoints[0], arch.checkpoints[1]
            aligned = permuted(arch.spec, perm, b)
            repair(_live_model(args, arch, a), _live_model(args, arch, {k: aligned(k) for k in arch.spec.shapes}),
                   merged, data, arch.spec, args.alpha)
        return merged.state_dict()

    return correct


def merge(args: argparse.Namespace) -> int:
    """``permgraph merge A B --out OUT``: ``(1 - alpha) A + alpha P(B)``, streamed."""
    from permgraph.io import load_permutation, save_permutation

    x = _data(args.data)[0] if args.data else None
    arch = _arch(args, [args.a, args.b], x)
    t0 = time.perf_counter()
    hist = None
    if args.perm:
        perm = load_permutation(args.perm, arch.spec)
    elif args.method == "activation" or args.main_rank or args.reset_bn or args.repair:
        # (under torchrun, activation matching and the corrections read every rank's data; weight
        # matching reads none and is deterministic, so each rank that needs its result runs it)
        perm, hist = match_checkpoints(arch, method=args.method, progress=not args.quiet and args.main_rank,
                                       **_match_options(args), **_activation_inputs(args, arch, x))
    else:
        return 0  # under torchrun, rank 0 alone matches weights and writes
    correct = _correction(args, arch, x, perm)
    if not args.main_rank:  # take part in the correction's statistics; rank 0 writes
        if correct is not None:
            from permgraph.pipeline import interpolated

            correct(interpolated(arch, perm, args.alpha))
        return 0
    merge_checkpoints(arch, perm, args.out, alpha=args.alpha, correct=correct,
                      **_write_options(args))
    if args.perm_out:
        save_permutation(args.perm_out, arch.spec, perm)
    fix = "BatchNorm reset" if args.reset_bn else "REPAIR" if args.repair else "none"
    _report(arch, perm, hist, time.perf_counter() - t0,
            {"merged": args.out, "alpha": args.alpha, "method": args.method, "correction": fix}, args,
            f"merge at alpha={args.alpha:g} (correction: {fix}) written to {args.out}")
    return 0


def apply(args: argparse.Namespace) -> int:
    """``permgraph apply PERM_FILE B --out OUT``."""
    from permgraph.io import load_permutation

    arch = _arch(args, [args.b])
    t0 = time.perf_counter()
    perm = load_permutation(args.perm, arch.spec)
    apply_to_checkpoint(arch, perm, args.out, **_write_options(args))
    args.method = None
    _report(arch, perm, None, time.perf_counter() - t0, {"permuted": args.out, "permutation": args.perm}, args,
            f"{args.b} permuted by {args.perm} written to {args.out}")
    return 0


def export(args: argparse.Namespace) -> int:
    """``permgraph export A B --perm-out FILE``: the weight-matching permutation only."""
    from permgraph.io import save_permutation

    if not args.main_rank:
        return 0  # weight matching reads no data: under torchrun, rank 0 alone does it
    x = _data(args.data)[0] if args.data else None
    arch = _arch(args, [args.a, args.b], x)
    t0 = time.perf_counter()
    args.method = "weight"
    perm, hist = match_checkpoints(arch, progress=not args.quiet, **_match_options(args))
    path = save_permutation(args.perm_out, arch.spec, perm)
    if args.aligned:
        apply_to_checkpoint(arch, perm, args.aligned, checkpoint=arch.checkpoints[1], progress=not args.quiet)
    _report(arch, perm, hist, time.perf_counter() - t0, {"permutation": str(path), "aligned": args.aligned}, args,
            f"permutation written to {path}" + (f", B aligned to A written to {args.aligned}" if args.aligned else ""))
    return 0


def barrier(args: argparse.Namespace) -> int:
    """``permgraph barrier A B --data D``: loss and accuracy barriers, naive and aligned."""
    from permgraph.examples.digits import evaluator
    from permgraph.io import load_permutation
    from permgraph.merge import repair, reset_batchnorm
    from permgraph.metrics import interpolation_curve

    x, y = _data(args.data)
    arch = _arch(args, [args.a, args.b], x)
    spec = arch.spec
    state_a = {k: arch.checkpoints[0][k] for k in spec.shapes}
    state_b = {k: arch.checkpoints[1][k] for k in spec.shapes}
    model = _live_model(args, arch, state_a)
    evaluate = evaluator(model, x.to(args.device), y.to(args.device), batch_size=args.batch_size)
    data = _batches(arch, x.to(args.device), args.batch_size)
    transform = None
    if args.reset_bn:
        def transform(alpha: float, sd: dict) -> dict:
            model.load_state_dict(sd)
            reset_batchnorm(model, data)
            return {k: v.clone() for k, v in model.state_dict().items()}
    elif args.repair:
        model_a, model_b = _live_model(args, arch, state_a), _live_model(args, arch, state_b)

        def transform(alpha: float, sd: dict) -> dict:
            model.load_state_dict(sd)
            repair(model_a, model_b, model, data, spec, alpha)
            return {k: v.clone() for k, v in model.state_dict().items()}
    perms: dict[str, Any] = {"naive": spec.identity()}
    if args.perm:
        perms["aligned"] = load_permutation(args.perm, spec)
    elif args.align == "weight":
        from permgraph.match import weight_matching

        opts = _match_options(args)
        perms["weight_matching"] = weight_matching(spec, state_a, state_b, progress=not args.quiet, **opts)
    elif args.align == "activation":
        from permgraph.match import activation_matching

        perms["activation_matching"] = activation_matching(
            spec, _live_model(args, arch, state_a), _live_model(args, arch, state_b), data, progress=not args.quiet)
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
    print(f"{args.model or args.a}: A={args.a}, B={args.b}, {len(x)} examples from {args.data}, correction: {correction}")
    print(f"  {'B aligned by':<22} {'loss barrier':>13} {'accuracy barrier':>17}   loss at each alpha")
    for name, c in curves.items():
        print(f"  {name.replace('_', ' '):<22} {c.loss_barrier:>13.4f} {100 * float(c.accuracy_barrier):>12.2f} pts   "
              + " ".join(f"{v:.3f}" for v in c.loss))
    return 0


def demo(args: argparse.Namespace) -> int:
    """``permgraph demo``: two MLPs on digits, aligned, with their barriers."""
    from permgraph.examples.demo import plot_curves, run_demo

    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before training, not after
        except ImportError as exc:
            raise PermGraphError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from exc
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
