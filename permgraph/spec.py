"""PermSpec: the permutation groups of a model, and how to apply them to a state_dict.

A group is an unknown permutation of ``size`` units. Each member says where those units sit
in one axis of one state_dict tensor (its `Layout`): unit ``u`` occupies positions
``offset + Σ_k r_k * stride_k + u * block + j`` for ``j < block`` and every repeat index
``r_k < count_k``. A Linear's output rows are ``Layout()``; a Linear after a flatten of
``C x H x W`` sees channel ``u`` as a block of ``H*W`` columns (``Layout(block=H*W)``); a slice
of a concatenation has an ``offset``; within-head units shared by every head are repeated
``H`` times every head width (``repeats=((H, D),)``).

A permutation is a dict ``group name -> int64 tensor p`` meaning "new unit ``u`` is old unit
``p[u]``", so ``spec.apply(p, state_b)`` gathers ``W[p]`` along every member axis.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from permgraph.errors import (
    OracleArgumentError,
    PermutationError,
    RoundingWarning,
    SpecMismatchError,
    VerificationError,
)
from permgraph.trace import as_args, module_modes, restore_modes, tensors_in

__all__ = ["Layout", "Member", "Group", "Unsupported", "PermSpec", "Permutation"]

Permutation = dict[str, torch.Tensor]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """Where a group's units sit along one axis (see the module docstring)."""

    offset: int = 0
    block: int = 1
    repeats: tuple[tuple[int, int], ...] = ()  # (count, stride) pairs, outermost first

    def positions(self, n: int) -> torch.Tensor:
        """Axis positions as an int64 tensor of shape ``(*counts, n, block)``."""
        pos = torch.arange(n).mul_(self.block).unsqueeze(-1) + torch.arange(self.block)
        for count, stride in reversed(self.repeats):
            pos = (torch.arange(count) * stride).view(count, *([1] * pos.ndim)) + pos
        return pos + self.offset

    def span(self, n: int) -> int:
        """One past the largest position used."""
        last = self.offset + (n - 1) * self.block + self.block - 1
        return last + sum((c - 1) * s for c, s in self.repeats) + 1

    def __str__(self) -> str:
        parts = []
        if self.offset:
            parts.append(f"offset {self.offset}")
        if self.block != 1:
            parts.append(f"blocks of {self.block}")
        for c, s in self.repeats:
            parts.append(f"x{c} every {s}")
        return ", ".join(parts) or "whole axis"


@dataclass(frozen=True)
class Member:
    """One axis of one state_dict tensor that a group permutes."""

    key: str
    axis: int
    layout: Layout = Layout()

    def __str__(self) -> str:
        lay = str(self.layout)
        return f"{self.key}[{self.axis}]" + ("" if lay == "whole axis" else f" ({lay})")


@dataclass(frozen=True)
class Group:
    """A set of units that can be reordered together without changing the function.

    Attributes:
        name: readable name, after the module that produces the units.
        size: number of units.
        members: the tensor axes it permutes.
        why: the ties that joined it, as ``"rule: reason @ module"`` strings.
    """

    name: str
    size: int
    members: tuple[Member, ...]
    why: tuple[str, ...] = ()

    def why_summary(self, limit: int = 4) -> str:
        """The ties that made this group, counted by rule (``"conv x20, add x8, ..."``)."""
        counts = Counter(w.split(":")[0].split(" @ ")[0] for w in self.why)
        items = [f"{k} x{v}" if v > 1 else k for k, v in counts.most_common()]
        more = len(items) - limit
        return ", ".join(items[:limit]) + (f", +{more} more" if more > 0 else "")


@dataclass(frozen=True)
class Unsupported:
    """An op whose axes were blocked because no rule (or no use of a rule) understood it."""

    node: str
    op: str
    module: str
    reason: str

    def __str__(self) -> str:
        where = f" in {self.module}" if self.module else ""
        return f"{self.op} ({self.node}){where}: {self.reason}"


@dataclass
class PermSpec:
    """The permutation groups of an architecture (see `infer`).

    It depends on state_dict names and shapes only, so it applies to any state_dict of the
    same architecture.

    Attributes:
        groups: the groups, in state_dict order of their first member.
        unsupported: ops whose axes were blocked, with the reason.
        shapes: every state_dict key and its shape.
        graph: the ``networkx`` graph it was derived from (not serialised), or None.
        traced: the `Traced` program (not serialised), or None.
    """

    groups: tuple[Group, ...]
    unsupported: tuple[Unsupported, ...] = ()
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    graph: Any = field(default=None, repr=False, compare=False)
    traced: Any = field(default=None, repr=False, compare=False)
    _index_cache: dict[str, list[tuple[int, Member, torch.Tensor]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # -- lookup ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups are: {', '.join(self.names[:10])}...")

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def num_units(self) -> int:
        """Total number of permutable units over all groups."""
        return sum(g.size for g in self.groups)

    # -- permutations ------------------------------------------------------------------
    def identity(self) -> Permutation:
        """The identity permutation of every group."""
        return {g.name: torch.arange(g.size) for g in self.groups}

    def random_permutation(self, generator: torch.Generator | None = None) -> Permutation:
        """A uniformly random permutation of every group."""
        return {g.name: torch.randperm(g.size, generator=generator) for g in self.groups}

    def derangement(self, generator: torch.Generator | None = None) -> Permutation:
        """A random permutation of every group that moves every unit (one cycle through all
        of a group's units), so no unit of any group is left in place.

        Examples:
            >>> spec = PermSpec((Group("g", 5, (Member("w", 0),)),), shapes={"w": (5,)})
            >>> p = spec.derangement(torch.Generator().manual_seed(0))["g"]
            >>> bool((p != torch.arange(5)).all()), sorted(p.tolist())
            (True, [0, 1, 2, 3, 4])
        """
        out = {}
        for g in self.groups:
            order = torch.randperm(g.size, generator=generator)
            p = torch.empty(g.size, dtype=torch.int64)
            p[order] = order.roll(-1)  # order[i] takes old unit order[i + 1]
            out[g.name] = p
        return out

    def inverse(self, perm: Mapping[str, torch.Tensor]) -> Permutation:
        """The inverse permutation: ``apply(inverse(p), apply(p, sd)) == sd``."""
        self.check_permutation(perm)
        return {k: torch.argsort(v) for k, v in perm.items()}

    def compose(self, first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Permutation:
        """The permutation equal to applying ``first``, then ``then``."""
        self.check_permutation(first)
        self.check_permutation(then)
        return {k: first[k][then[k].to(first[k].device)] for k in first}

    def check_permutation(self, perm: Mapping[str, torch.Tensor]) -> None:
        """Raise `PermutationError` unless ``perm`` is a bijection for every group."""
        names = set(self.names)
        missing = [n for n in self.names if n not in perm]
        extra = [k for k in perm if k not in names]
        if missing or extra:
            raise PermutationError(
                f"permutation does not match the spec: missing groups {missing[:5]}, unknown groups {extra[:5]}"
                " (build it with spec.identity() / spec.random_permutation(), or a matcher, for this spec)"
            )
        for g in self.groups:
            p = perm[g.name]
            if not isinstance(p, torch.Tensor) or p.ndim != 1 or p.dtype.is_floating_point or p.dtype == torch.bool:
                raise PermutationError(f"group {g.name!r}: expected a 1-D integer tensor, got {_describe(p)}")
            if p.numel() != g.size:
                raise PermutationError(f"group {g.name!r} has {g.size} units but its permutation has {p.numel()}")
            seen = torch.zeros(g.size, dtype=torch.bool, device=p.device)
            if bool(((p < 0) | (p >= g.size)).any()):
                raise PermutationError(f"group {g.name!r}: indices must lie in [0, {g.size})")
            seen[p.long()] = True
            if not bool(seen.all()):
                dup = int(torch.bincount(p.long().cpu(), minlength=g.size).argmax())
                raise PermutationError(f"group {g.name!r}: not a bijection (index {dup} appears more than once)")

    # -- state dicts -------------------------------------------------------------------
    def check_state_dict(self, state_dict: Mapping[str, Any], what: str = "state_dict") -> None:
        """Raise `SpecMismatchError` unless keys and shapes match the spec.

        Entries that are not tensors (the extra state of a module with ``get_extra_state``)
        are allowed: they are not weights, and `apply` passes them through.

        Raises:
            SpecMismatchError: a key of the spec is missing, a tensor key is unknown, or a
                shape differs.
        """
        missing = [k for k in self.shapes if k not in state_dict]
        # non-tensor entries (a module's ``get_extra_state``) are no weights: they pass through
        extra = [k for k in state_dict if k not in self.shapes and _is_weight(state_dict[k])]
        if missing or extra:
            raise SpecMismatchError(
                f"{what} does not match the architecture of this spec: "
                + missing_and_extra(missing, extra, "missing keys", "unexpected keys")
                + ". Infer the spec from the same architecture as the weights."
            )
        for k, shape in self.shapes.items():
            t = state_dict[k]
            got = tuple(t.shape) if hasattr(t, "shape") else None
            if got != shape:
                raise SpecMismatchError(f"{what}[{k!r}] has shape {got}, the spec expects {shape}")

    def _indices(self, key: str) -> list[tuple[int, Member, torch.Tensor]]:
        if not self._index_cache and self.groups:
            for gi, g in enumerate(self.groups):
                for m in g.members:
                    pos = m.layout.positions(g.size)
                    self._index_cache.setdefault(m.key, []).append((gi, m, pos))
        return self._index_cache.get(key, [])

    def axis_index(self, key: str, axis: int, perm: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The gather index that ``perm`` applies along ``axis`` of ``key`` (None if none)."""
        idx = None
        for gi, m, pos in self._indices(key):
            if m.axis != axis:
                continue
            p = perm[self.groups[gi].name].to(pos.device).long()
            src = pos.index_select(-2, p)
            if idx is None:
                idx = torch.arange(self.shapes[key][axis])
            idx[pos.reshape(-1)] = idx[src.reshape(-1)]
        return idx

    def apply(self, perm: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], *, check: bool = True) -> dict[str, torch.Tensor]:
        """Permute a state_dict: a new dict, the input untouched.

        Tensors in no group pass through as they are; every member axis is gathered with its
        group's permutation (new unit ``u`` = old unit ``perm[u]``). Entries that are not
        tensors (extra state) pass through, and so does the state_dict's ``_metadata`` (the
        per-module versions ``load_state_dict`` reads), so the result loads like the input.

        Args:
            perm: group name -> permutation (see the module docstring).
            state_dict: a state_dict of the spec's architecture.
            check: validate ``state_dict`` and ``perm`` first.

        Returns:
            A new ``OrderedDict``, in the input's key order, with the input's ``_metadata``.

        Raises:
            SpecMismatchError: the state_dict has missing, extra or mis-shaped keys.
            PermutationError: ``perm`` is not a bijection of every group.
        """
        if check:
            self.check_state_dict(state_dict)
            self.check_permutation(perm)
        out: dict[str, Any] = OrderedDict(state_dict)
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None:
            out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
        keys = {m.key for g in self.groups for m in g.members}
        for key in keys:
            t = state_dict[key]
            for axis in sorted({m.axis for _, m, _ in self._indices(key)}):
                idx = self.axis_index(key, axis, perm)
                t = t.index_select(axis, idx.to(t.device))
            out[key] = t
        return out

    # -- checks ------------------------------------------------------------------------
    def lint(self) -> None:
        """Check the structure: names unique, members in range and of one size per group,
        no member twice, and the groups acting on one axis commute (they permute disjoint
        segments or independent factors).

        Raises:
            SpecMismatchError: listing every problem found.
        """
        problems: list[str] = []
        names = Counter(self.names)
        problems += [f"group name {n!r} used {c} times" for n, c in names.items() if c > 1]
        seen: set[tuple[str, int, Layout]] = set()
        by_axis: dict[tuple[str, int], list[tuple[Group, Member]]] = {}
        for g in self.groups:
            if g.size < 2:
                problems.append(f"group {g.name!r} has {g.size} unit(s)")
            if not g.members:
                problems.append(f"group {g.name!r} has no members")
            for m in g.members:
                if m.key not in self.shapes:
                    problems.append(f"group {g.name!r}: member {m.key!r} is not in the state_dict")
                    continue
                shape = self.shapes[m.key]
                if not 0 <= m.axis < len(shape):
                    problems.append(f"group {g.name!r}: {m.key} has no axis {m.axis}")
                    continue
                if m.layout.span(g.size) > shape[m.axis]:
                    problems.append(f"group {g.name!r}: {m} reaches past size {shape[m.axis]}")
                    continue
                pos = m.layout.positions(g.size).reshape(-1)
                if pos.unique().numel() != pos.numel():
                    problems.append(f"group {g.name!r}: {m} covers a position twice")
                if (m.key, m.axis, m.layout) in seen:
                    problems.append(f"{m} appears twice")
                seen.add((m.key, m.axis, m.layout))
                by_axis.setdefault((m.key, m.axis), []).append((g, m))
        if not problems:
            gen = torch.Generator().manual_seed(0)
            for (key, axis), ms in by_axis.items():
                if len(ms) < 2:
                    continue
                perms = {g.name: torch.randperm(g.size, generator=gen) for g, _ in ms}
                n = self.shapes[key][axis]
                forward, backward = torch.arange(n), torch.arange(n)
                for order, idx in ((ms, forward), (ms[::-1], backward)):
                    for g, m in order:
                        pos = m.layout.positions(g.size)
                        src = pos.index_select(-2, perms[g.name])
                        idx[pos.reshape(-1)] = idx[src.reshape(-1)]
                if not torch.equal(forward, backward) or forward.unique().numel() != n:
                    problems.append(f"groups {[g.name for g, _ in ms]} do not commute on {key}[{axis}]")
        if problems:
            raise SpecMismatchError("lint found problems:\n  " + "\n  ".join(problems))

    def verify(
        self,
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
            SpecMismatchError: the model's state_dict does not match the spec.
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
        self.check_state_dict(full, "model.state_dict()")
        state = {k: v.detach() for k, v in full.items() if isinstance(v, torch.Tensor)}
        if perm is not None:
            self.check_permutation(perm)
            perms = [dict(perm)]
        else:
            perms = [self.derangement(generator)] + [self.random_permutation(generator) for _ in range(draws - 1)]
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
                p = self.identity() | {n: p[n] for n in names}
            return _elementwise_error(ref, run(self.apply(p, state, check=False)), rtol, atol)

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
                culprits = _bisect(self.names, lambda ns: not check(run, base, failing, ns) <= rtol)
                raise VerificationError(
                    f"permuting the groups changed the outputs{where} (relative error {err:.3g} > {rtol:g}){note}; "
                    f"culprit group(s): {', '.join(culprits)}. Their members:\n  "
                    + "\n  ".join(f"{n}: {', '.join(map(str, self[n].members[:6]))}" for n in culprits)
                    + "\nThis is a bug in a rule (please report it with the model), or the model "
                    "reads its parameters outside the traced forward.",
                    culprits=tuple(culprits),
                    error=err,
                )
        finally:
            _restore(model, own, saved, modes)

    # -- presentation ------------------------------------------------------------------
    def table(self, max_members: int = 4) -> str:
        """A readable table of the groups and the blocked-op report."""
        lines = [f"PermSpec: {len(self.groups)} groups, {self.num_units} permutable units"]
        if self.groups:
            w = max(len("group"), *(len(g.name) for g in self.groups))
            lines.append(f"  {'group':<{w}}  {'size':>5}  members / why")
            for g in self.groups:
                mem = ", ".join(str(m) for m in g.members[:max_members])
                more = len(g.members) - max_members
                mem += f", +{more} more" if more > 0 else ""
                lines.append(f"  {g.name:<{w}}  {g.size:>5}  {mem}")
                lines.append(f"  {'':<{w}}  {'':>5}  why: {g.why_summary()}")
        if self.unsupported:
            lines.append(f"blocked ops ({len(self.unsupported)}):")
            lines += [f"  {u}" for u in self.unsupported]
        else:
            lines.append("blocked ops: none")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `from_dict` reads it back."""
        return {
            "format": "permgraph.PermSpec",
            "version": FORMAT_VERSION,
            "groups": [
                {
                    "name": g.name,
                    "size": g.size,
                    "members": [
                        {"key": m.key, "axis": m.axis, "offset": m.layout.offset, "block": m.layout.block,
                         "repeats": [list(r) for r in m.layout.repeats]}
                        for m in g.members
                    ],
                    "why": list(g.why),
                }
                for g in self.groups
            ],
            "unsupported": [asdict(u) for u in self.unsupported],
            "shapes": {k: list(v) for k, v in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermSpec:
        """Rebuild a spec from `to_dict` output.

        Raises:
            SpecMismatchError: the dict is not a permgraph spec of a known version.
        """
        if not isinstance(data, Mapping) or data.get("format") != "permgraph.PermSpec":
            raise SpecMismatchError("not a permgraph PermSpec dict (missing format='permgraph.PermSpec')")
        if data.get("version") != FORMAT_VERSION:
            raise SpecMismatchError(f"PermSpec format version {data.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        try:
            groups = tuple(
                Group(
                    g["name"],
                    int(g["size"]),
                    tuple(
                        Member(m["key"], int(m["axis"]), Layout(int(m["offset"]), int(m["block"]), tuple(_pair(r) for r in m["repeats"])))
                        for m in g["members"]
                    ),
                    tuple(g.get("why", ())),
                )
                for g in data["groups"]
            )
            unsupported = tuple(Unsupported(**u) for u in data.get("unsupported", ()))
            shapes = {k: tuple(int(s) for s in v) for k, v in data["shapes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpecMismatchError(f"malformed PermSpec dict: {exc!r}") from exc
        return cls(groups, unsupported, shapes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def fingerprint(self) -> str:
        """A short hash of the groups' names, sizes and members (not of provenance)."""
        import hashlib

        core = [[g.name, g.size, [[m.key, m.axis, m.layout.offset, m.layout.block, [list(r) for r in m.layout.repeats]] for m in g.members]] for g in self.groups]
        return hashlib.sha256(json.dumps(core).encode()).hexdigest()[:16]


def _pair(r: Any) -> tuple[int, int]:
    count, stride = r  # ValueError / TypeError unless a pair
    return int(count), int(stride)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def missing_and_extra(missing: Sequence[str], extra: Sequence[str], missing_what: str, extra_what: str) -> str:
    """``"<missing_what> [a, b] ...; <extra_what> [c]"`` (the first five of each) for an error message."""

    def few(xs: Sequence[str]) -> str:
        return f"{list(xs[:5])}{' ...' if len(xs) > 5 else ''}"

    parts = [f"{missing_what} {few(missing)}"] * bool(missing) + [f"{extra_what} {few(extra)}"] * bool(extra)
    return "; ".join(parts)


def _is_weight(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


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
