"""PermSpec: the permutation groups of a model, and how to apply them to a state_dict.

A group is an unknown permutation of ``size`` units. Each member says where those units sit
in one axis of one state_dict tensor (its `Layout`): unit ``u`` occupies positions
``offset + Σ_k r_k * stride_k + u * block + j`` for ``j < block`` and every repeat index
``r_k < count_k``. A Linear's output rows are ``Layout()``; a Linear after a flatten of
``C x H x W`` sees channel ``u`` as a block of ``H*W`` columns (``Layout(block=H*W)``); a slice
of a concatenation has an ``offset``; within-head units shared by every head are repeated
``H`` times every head width (``repeats=((H, D),)``).

A member may cover one slice of its tensor only (``at``): the stacked experts of a
mixture-of-experts layer are one tensor ``[E, 2I, H]``, and each expert ``e`` permutes its own
``I`` hidden units, so its group's members are ``Member(key, 1, layout, at=((0, e),))``: the
units sit along axis 1 (of the full tensor) of the slice ``t[e]``. An axis that picks a slice
is never permuted itself, and on one axis the positions of slice members and of whole-tensor
members are disjoint, so the two kinds commute.

A permutation is a dict ``group name -> int64 tensor p`` meaning "new unit ``u`` is old unit
``p[u]``", so ``spec.apply(p, state_b)`` gathers ``W[p]`` along every member axis.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from permgraph.errors import PermutationError, SpecMismatchError
from permgraph.layout import Layout, at_axis, at_slice, compose_index

__all__ = ["Layout", "Member", "Group", "Unsupported", "PermSpec", "Permutation"]

Permutation = dict[str, torch.Tensor]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Member:
    """One axis of one state_dict tensor (or of one slice of it) that a group permutes.

    Attributes:
        key: the state_dict key.
        axis: the axis the units sit along (an axis of the full tensor, also with ``at``).
        layout: where the units sit along it.
        at: ``(axis, index)`` pairs, sorted by axis: the member covers only the slice of the
            tensor where each of those axes takes its index (``at=((0, e),)``: expert ``e`` of
            a stacked ``[E, ...]`` tensor). ``()``: the whole tensor.
    """

    key: str
    axis: int
    layout: Layout = Layout()
    at: tuple[tuple[int, int], ...] = ()

    def __str__(self) -> str:
        lay = str(self.layout)
        parts = [] if lay == "whole axis" else [lay]
        if self.at:
            parts.append("at " + ", ".join(f"[{a}]={i}" for a, i in self.at))
        return f"{self.key}[{self.axis}]" + (f" ({'; '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class Group:
    """A set of units that can be reordered together without changing the function.

    Attributes:
        name: readable name, after the module that produces the units, with a role where
            one module yields several groups (``attn.heads``, ``attn.qk``, ``attn.v``;
            ``attn.qk.h3`` for one head's units).
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

    The spec is plain data: `to_dict` / `from_dict` round-trip it, and equality compares the
    groups, the report and the shapes. A spec from `permgraph.infer` also remembers the
    `permgraph.analysis.Analysis` it came from (`analysis`; not serialised, not compared).
    """

    groups: tuple[Group, ...]
    unsupported: tuple[Unsupported, ...] = ()
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _analysis: Any = field(default=None, init=False, repr=False, compare=False)
    _index_cache: dict[str, list[tuple[int, Member, torch.Tensor]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # -- provenance --------------------------------------------------------------------
    @property
    def analysis(self) -> Any:
        """The `permgraph.analysis.Analysis` (traced program, graph) this spec came from,
        or None for a spec built by hand or read back with `from_dict`."""
        return self._analysis

    @property
    def graph(self) -> Any:
        """Deprecated: ``spec.analysis.graph`` (None without an analysis)."""
        warnings.warn("PermSpec.graph is deprecated: use spec.analysis.graph (or permgraph.analyze(model, inputs))",
                      DeprecationWarning, stacklevel=2)
        return None if self._analysis is None else self._analysis.graph

    @property
    def traced(self) -> Any:
        """Deprecated: ``spec.analysis.traced`` (None without an analysis)."""
        warnings.warn("PermSpec.traced is deprecated: use spec.analysis.traced (or permgraph.analyze(model, inputs))",
                      DeprecationWarning, stacklevel=2)
        return None if self._analysis is None else self._analysis.traced

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
        from permgraph import nesting  # groups that do not commute (per-head units)

        if nesting.is_nested(self):
            return nesting.inverse(self, perm)
        return {k: torch.argsort(v) for k, v in perm.items()}

    def compose(self, first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Permutation:
        """The permutation equal to applying ``first``, then ``then``."""
        self.check_permutation(first)
        self.check_permutation(then)
        from permgraph import nesting  # groups that do not commute (per-head units)

        if nesting.is_nested(self):
            return nesting.compose(self, first, then)
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

    def axis_index(self, key: str, axis: int, perm: Mapping[str, torch.Tensor], *,
                   at: tuple[tuple[int, int], ...] = ()) -> torch.Tensor | None:
        """The gather index that ``perm`` applies along ``axis`` of ``key`` (None if none):
        of the whole-tensor members, or with ``at``, of the members on that slice (see `Member`)."""
        return compose_index(self.shapes[key][axis], ((pos, perm[self.groups[gi].name]) for gi, m, pos in
                                                      self._indices(key) if m.axis == axis and m.at == at))

    def apply_tensor(self, perm: Mapping[str, torch.Tensor], key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor ``key`` of a state_dict permuted as `apply` does (out of place; for
        streaming one tensor at a time): the whole-tensor gathers, then, slice by slice, those
        of the members with an ``at``."""
        entries = self._indices(key)
        t = tensor
        for axis in sorted({m.axis for _, m, _ in entries if not m.at}):
            t = t.index_select(axis, self.axis_index(key, axis, perm).to(t.device))
        for at in dict.fromkeys(m.at for _, m, _ in entries if m.at):
            if t is tensor:
                t = t.clone()
            view = at_slice(t, at)
            sub = view
            for axis in sorted({m.axis for _, m, _ in entries if m.at == at}):
                sub = sub.index_select(at_axis(axis, at), self.axis_index(key, axis, perm, at=at).to(t.device))
            view.copy_(sub)
        return t

    def apply(self, perm: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], *, check: bool = True) -> dict[str, torch.Tensor]:
        """Permute a state_dict: a new dict, the input untouched.

        Tensors in no group pass through as they are; every member axis is gathered with its
        group's permutation (new unit ``u`` = old unit ``perm[u]``), on the member's slice
        for a member with an ``at`` (see `apply_tensor`). Entries that are not
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
            out[key] = self.apply_tensor(perm, key, state_dict[key])
        return out

    # -- checks ------------------------------------------------------------------------
    def lint(self) -> None:
        """Check the structure: names unique, members in range and of one size per group,
        no member twice, and the groups acting on one axis commute (they permute disjoint
        segments or independent factors) or nest, outer groups first (whole heads, then the
        units inside each head: see `permgraph.nesting`). Members with an ``at`` (see
        `Member`): the slice is in range and picked along other axes than the member's, the
        members of one tensor slice it along the same axes, no member permutes such an axis,
        and on one axis the slices' positions are disjoint from the whole-tensor members'.

        Raises:
            SpecMismatchError: listing every problem found.
        """
        from permgraph.linting import lint

        lint(self)

    def verify(self, model: torch.nn.Module, example_inputs: Any, **options: Any) -> float:
        """The oracle: `permgraph.oracle.verify` of this spec (same arguments, result and errors).

        Examples:
            >>> import torch, permgraph
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> permgraph.infer(mlp, torch.randn(3, 4)).verify(mlp, torch.randn(3, 4)) < 1e-5
            True
        """
        from permgraph.oracle import verify

        return verify(self, model, example_inputs, **options)

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
                         "repeats": [list(r) for r in m.layout.repeats]} | ({"at": [list(p) for p in m.at]} if m.at else {})
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
                        Member(m["key"], int(m["axis"]), Layout(int(m["offset"]), int(m["block"]), tuple(_pair(r) for r in m["repeats"])),
                               tuple(_pair(p) for p in m.get("at", ())))
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

        core = [[g.name, g.size, [[m.key, m.axis, m.layout.offset, m.layout.block, [list(r) for r in m.layout.repeats]]
                                  + ([[list(p) for p in m.at]] if m.at else []) for m in g.members]] for g in self.groups]
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


