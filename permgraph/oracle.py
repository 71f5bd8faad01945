"""The oracle: permute every group of a spec and check the model's outputs do not change.

`verify` runs the model itself, eagerly, through ``torch.func.functional_call`` on permuted
copies of its weights: it checks the groups against the model as written, not against the
traced program the groups were derived from.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from permgraph.errors import OracleArgumentError, RoundingWarning, VerificationError
from permgraph.spec import PermSpec
from permgraph.tracing import as_args, module_modes, restore_modes, tensors_in

__all__ = ["verify"]


def verify(
    spec: PermSpec,
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    perm: Mapping[str, torch.Tensor] | None = None,
    rtol: float = 1e-4,
    atol: float | None = None,
    generator: torch.Generator | None = None,
    draws: int = 2,
    float64: bool = True,
) -> float:
    """The oracle: permute every group and check the outputs do not change.

    Without ``perm`` it tries ``draws`` permutations: a derangement first (every unit of
    every group moves, so no group can pass by being left in place) and then uniform
    draws. Outputs are compared element by element, as ``torch.testing.assert_close``
    does: ``|y' - y| <= atol + rtol * |y|`` for every element, with ``atol`` defaulting,
    per output, to the smaller of ``assert_close``'s default for its dtype (``1e-5`` for
    float32) and ``rtol`` times the output's mean magnitude; NaN and infinities are compared
    by position (a NaN or an infinity where the reference has none fails), integer and
    boolean outputs exactly.

    The model is left as it was: it runs with `functional_call` on copies of its
    parameters and every buffer (non-persistent ones too), in eval mode (set through
    ``train(False)`` before each run, so a module that caches tensors derived from its
    weights drops them), each submodule's mode restored afterwards; each run starts from the same random seed (a
    forward that draws noise draws the same noise) and torch's global random state is not
    advanced.

    When a float32 (or half precision) check fails, it is re-run in float64 before any
    group is blamed: very deep models amplify rounding chaotically, and a permutation
    that only reorders sums then changes float32 outputs by O(1). If float64 agrees, the
    spec passes, a `RoundingWarning` says so, and the float64 error is returned.

    Args:
        spec: the groups to check (``spec.verify(model, inputs)`` is the same call).
        model: the model the spec was inferred from (or one of its architecture).
        example_inputs: a Tensor, a tuple of positional or a dict of keyword arguments.
        perm: check this permutation only, instead of the draws.
        rtol: relative tolerance per element (> 0).
        atol: absolute tolerance per element; default: the smaller of
            ``assert_close``'s default for the output's dtype and ``rtol`` x its mean magnitude.
        generator: the source of the draws.
        draws: how many permutations to try without ``perm`` (>= 1).
        float64: re-check a failure in float64 before blaming a group.

    Returns:
        The worst element-wise relative error over the draws,
        ``max |y' - y| / (|y| + atol / rtol)``; the check passes when it is ``<= rtol``
        (exactly the element-wise criterion above).

    Raises:
        VerificationError: the outputs changed (``culprits`` names the groups, found by
            bisection over the groups in the precision that failed), or the outputs change
            between two runs with the same weights and seed (then nothing is blamed).
        OracleArgumentError: ``rtol``, ``atol`` or ``draws`` out of range.
        SpecMismatchError: the model's state_dict does not match the spec, or the spec does
            not pass `PermSpec.lint`.
        PermutationError: ``perm`` is not a permutation of every group.
    """
    if not (isinstance(rtol, (int, float)) and rtol > 0 and math.isfinite(rtol)):
        raise OracleArgumentError(f"verify: rtol must be a positive number, got {rtol!r}")
    if atol is not None and not (isinstance(atol, (int, float)) and atol >= 0 and math.isfinite(atol)):
        raise OracleArgumentError(f"verify: atol must be a non-negative number or None, got {atol!r}")
    if perm is None and not (isinstance(draws, int) and draws >= 1):
        raise OracleArgumentError(f"verify: draws must be a positive integer, got {draws!r}")
    args, kwargs = as_args(example_inputs)
    full = model.state_dict()
    spec.check_state_dict(full, "model.state_dict()")
    spec.lint()  # a malformed spec (a hand-written one) is named, not half-applied
    state = {k: v.detach() for k, v in full.items() if isinstance(v, torch.Tensor)}
    if perm is not None:
        spec.check_permutation(perm)
        perms = [dict(perm)]
    else:
        perms = [spec.derangement(generator)] + [spec.random_permutation(generator) for _ in range(draws - 1)]
    # every tensor the forward can read or write: parameters, persistent and non-persistent buffers
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    saved = {k: v.detach().clone() for k, v in own.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in saved.items() if k not in state}  # non-persistent buffers
    modes = module_modes(model)
    model.eval()
    cuda = sorted({t.device.index or 0 for t in saved.values() if t.device.type == "cuda"})

    def runner(wide: bool) -> Callable[[Mapping[str, torch.Tensor]], list[torch.Tensor]]:
        def run(sd: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
            fresh = {k: _widen(v) if wide else v.clone() for k, v in (dict(extra) | dict(sd)).items()}
            a, kw = torch.utils._pytree.tree_map(_widen, (args, kwargs)) if wide else (args, kwargs)
            model.eval()  # through train(): a module caching tensors derived from its weights drops them
            with torch.random.fork_rng(devices=cuda), _default_dtype(torch.float64 if wide else None):
                torch.manual_seed(0)
                out = torch.func.functional_call(model, fresh, a, kw, tie_weights=False)
            return [t.detach() for t in _flat_outputs(out)]

        return run

    def check(run, ref, p, names=None) -> float:
        if names is not None:
            p = spec.identity() | {n: p[n] for n in names}
        return _elementwise_error(ref, run(spec.apply(p, state, check=False)), rtol, atol)

    try:
        with torch.no_grad():
            run32 = runner(False)
            ref = run32(state)
            errs = [check(run32, ref, p) for p in perms]
            err = max(errs)
            if err <= rtol:
                return err
            noise = _elementwise_error(ref, run32(state), rtol, atol)
            if not noise <= rtol:
                raise VerificationError(
                    f"the model's outputs differ between two runs with the same weights and the same "
                    f"random seed (relative error {noise:.3g} > {rtol:g}), so verify cannot tell what a "
                    "permutation changes. Make forward deterministic for the check (fixed noise or masks, "
                    "no sampling, deterministic kernels), or raise rtol above that noise.",
                    error=noise,
                )
            failing = next(p for p, e in zip(perms, errs) if not e <= rtol)
            run, base, where, note = run32, ref, "", ""
            if float64 and any(t.is_floating_point() and t.dtype != torch.float64 for t in state.values()):
                try:
                    run64 = runner(True)
                    ref64 = run64(state)
                    tried = [p for p, e in zip(perms, errs) if not e <= rtol]
                    errs64 = [check(run64, ref64, p) for p in tried]
                except Exception as exc:  # noqa: BLE001 - a model that cannot run in float64: blame in float32
                    note = f" (the float64 re-check could not run: {type(exc).__name__}: {str(exc)[:200]})"
                else:
                    if max(errs64) <= rtol:
                        warnings.warn(
                            f"verify: float32 outputs changed by {err:.3g} (relative) under the permutation, "
                            f"but in float64 they agree to {max(errs64):.3g}: that is float32 rounding "
                            "amplified by the model, not a wrong group. The spec passes.",
                            RoundingWarning,
                            stacklevel=2,
                        )
                        return max(errs64)
                    run, base, where = run64, ref64, " in float64 too"
                    err = max(errs64)
                    failing = next(p for p, e in zip(tried, errs64) if not e <= rtol)
            culprits = _bisect(spec.names, lambda ns: not check(run, base, failing, ns) <= rtol)
            raise VerificationError(
                f"permuting the groups changed the outputs{where} (relative error {err:.3g} > {rtol:g}){note}; "
                f"culprit group(s): {', '.join(culprits)}. Their members:\n  "
                + "\n  ".join(f"{n}: {', '.join(map(str, spec[n].members[:6]))}" for n in culprits)
                + "\nThis is a bug in a rule (please report it with the model), or the model "
                "reads its parameters outside the traced forward.",
                culprits=tuple(culprits),
                error=err,
            )
    finally:
        _restore(model, own, saved, modes)



def _flat_outputs(out: Any) -> list[torch.Tensor]:
    return tensors_in(out)


def _widen(x: Any) -> Any:
    """A floating (or complex) tensor in double precision; anything else as it is."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            return x.detach().to(torch.complex128)
        if x.is_floating_point():
            return x.detach().to(torch.float64)
        return x.detach().clone()
    return x


class _default_dtype:
    """Context manager: torch's default dtype set to ``dtype`` (no change for None)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype, self.before = dtype, torch.get_default_dtype()

    def __enter__(self) -> None:
        if self.dtype is not None:
            torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self.before)


def _restore(model: torch.nn.Module, own: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor],
             modes: Mapping[torch.nn.Module, bool]) -> None:
    """Put back every submodule's mode, and any parameter or buffer a forward changed."""
    restore_modes(model, dict(modes))
    with torch.no_grad():
        for k, t in own.items():
            s = saved.get(k)
            if s is not None and not torch.equal(t.detach(), s):
                t.detach().copy_(s)


# torch.testing.assert_close's default absolute tolerances
_ATOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5, torch.float64: 1e-7}


def _elementwise_error(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor], rtol: float, atol: float | None) -> float:
    """The worst element-wise relative error ``max |b - a| / (|a| + atol / rtol)`` over
    pairs of outputs, so it is ``<= rtol`` exactly when every element satisfies
    ``|b - a| <= atol + rtol |a|``. ``atol`` defaults, per output, to the smaller of
    ``torch.testing.assert_close``'s default for its dtype (``1e-5`` for float32) and
    ``rtol`` x its mean magnitude (so outputs that are all tiny are still compared relatively).
    NaN and infinities must sit at the same positions (infinities with the same sign), else
    the error is infinite; so is any difference in shape, dtype kind, or an integer or
    boolean value.

    Examples:
        >>> a = torch.tensor([1.0, 1e-3, float("nan")])
        >>> _elementwise_error([a], [a.clone()], 1e-4, None)
        0.0
        >>> _elementwise_error([a], [torch.tensor([1.0, 1e-3, 0.0])], 1e-4, None)
        inf
    """
    if len(ref) != len(got):
        return math.inf
    worst = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape or a.is_floating_point() != b.is_floating_point() or a.is_complex() != b.is_complex():
            return math.inf
        if a.numel() == 0:
            continue
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a.cpu(), b.to(a.dtype).cpu()):
                return math.inf
            continue
        if a.is_complex():
            a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
        a64, b64 = a.detach().double(), b.detach().double()
        fa, fb = torch.isfinite(a64), torch.isfinite(b64)
        if not torch.equal(fa, fb) or not torch.equal(torch.isnan(a64), torch.isnan(b64)):
            return math.inf
        if not torch.equal(a64[torch.isinf(a64)], b64[torch.isinf(b64)]):
            return math.inf
        a64, b64 = a64[fa], b64[fb]
        if a64.numel() == 0:
            continue
        tol = atol if atol is not None else min(_ATOL.get(a.dtype, 1e-5), rtol * float(a64.abs().mean()))
        floor = tol / rtol
        diff = (b64 - a64).abs()
        if floor > 0:
            worst = max(worst, float((diff / (a64.abs() + floor)).max()))
        else:  # an all-zero reference with no absolute tolerance: any change is infinitely relative
            worst = max(worst, math.inf if bool((diff > 0).any()) else 0.0)
    return worst


def _bisect(names: Sequence[str], fails: Callable[[Sequence[str]], bool]) -> list[str]:
    """The smallest failing subsets found by halving (a failing set whose halves both pass
    is returned whole: its members only fail together)."""
    if len(names) <= 1:
        return list(names)
    half = len(names) // 2
    left, right = names[:half], names[half:]
    out: list[str] = []
    if fails(left):
        out += _bisect(left, fails)
    if fails(right):
        out += _bisect(right, fails)
    return out or list(names)

