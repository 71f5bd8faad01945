"""Per-head units: split a within-head group shared by every head into one group per head.

The unifier gives the within-head units of attention one permutation shared by every head
(the inner factor ``D`` of an axis refined as ``H x D``). The true symmetry is larger: each
head may permute its own units, independently of the others. This pass offers that, and only
where it can prove it. For a within-head group ``R`` it looks for an *index* variable ``I``
(the heads) such that

* every value that carries ``R`` also carries ``I`` exactly once: as an outer factor of the
  very axis that holds ``R`` (``[..., H*D]`` from a projection: parameters must be of this
  form, so that each head's units are one `Layout`), or as a dim of its own
  (``[B, H, L, D]``);
* every op that reads or writes a value carrying ``R`` acts head by head: element-wise ops,
  views and moves of positions (reshape, permute, expand, cat, slice, select, unbind:
  the unifier's layouts say where each head's units go), products batched over the heads
  or summing over the units (``linear``, ``bmm``, ``matmul``, attention), and reductions
  or normalisations over dims that are not the head dim.

Anything else (a sum or mean over the heads, a softmax across them, a roll, a gather, an
op this pass does not know) leaves ``R`` shared: sound first.

A per-head group is indexed by the head's *position* along ``I``. Placed after the groups
that move the heads (see ``analysis._build_spec``), spec order reads: move the heads, then
permute the units inside each head at its new position.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from permgraph.layout import Layout
from permgraph.rules import bind_args, op_name, value_of_arg, values_of
from permgraph.unify import Leaf, Tree

__all__ = ["HEAD_MODES", "Occurrence", "occurrences", "split_layouts", "find_splits", "AxisTrees", "contains",
           "packet", "pointwise"]

HEAD_MODES = ("shared", "independent")


@dataclass(frozen=True)
class Occurrence:
    """One place where a variable sits in an axis: its unit block (``scale``), offset, the
    factors outside it (``atoms``: ``(root, count, stride)``, outermost first), and for each
    root among those factors (composite ones too) its ``(start, stop)`` atom ranges."""

    offset: int
    scale: int
    atoms: tuple[tuple[int, int, int], ...]
    ranges: dict[int, list[tuple[int, int]]]


def contains(t: Leaf | Tree, r: int) -> bool:
    """Whether variable ``r`` occurs in the axis tree ``t``."""
    return t.root == r if isinstance(t, Leaf) else any(contains(p, r) for p in t.parts)


def _flatten(t: Leaf | Tree, stride: int, atoms: list, ranges: dict[int, list[tuple[int, int]]]) -> None:
    """Split ``t`` (one unit every ``stride`` positions) through its products into atoms."""
    start = len(atoms)
    if isinstance(t, Tree) and t.kind == "prod":
        sizes = [p.size for p in t.parts]
        for k, p in enumerate(t.parts):
            _flatten(p, stride * math.prod(sizes[k + 1:]), atoms, ranges)
    else:
        atoms.append((t.root, t.size, stride))
    ranges.setdefault(t.root, []).append((start, len(atoms)))


def occurrences(t: Leaf | Tree, r: int) -> list[Occurrence]:
    """Every place where variable ``r`` sits in the axis tree ``t``."""
    out: list[Occurrence] = []

    def walk(t, offset, scale, atoms, ranges):
        if isinstance(t, Leaf):
            if t.root == r:
                out.append(Occurrence(offset, scale, tuple(atoms), {k: list(v) for k, v in ranges.items()}))
            return
        if t.kind == "cat":
            start = 0
            for p in t.parts:
                walk(p, offset + start * scale, scale, atoms, ranges)
                start += p.size
            return
        sizes = [p.size for p in t.parts]
        for i, p in enumerate(t.parts):
            if not contains(p, r):
                continue
            a, rg = list(atoms), {k: list(v) for k, v in ranges.items()}
            for j in range(i):
                _flatten(t.parts[j], math.prod(sizes[j + 1:]) * scale, a, rg)
            walk(p, offset, scale * math.prod(sizes[i + 1:]), a, rg)

    walk(t, 0, 1, [], {})
    return out


def _merge(reps: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Drop count-1 repeats and merge an outer repeat with the inner one it continues."""
    out: list[tuple[int, int]] = []
    for c, s in reps:
        if c == 1:
            continue
        if out and out[-1][1] == c * s:
            out[-1] = (out[-1][0] * c, s)
        else:
            out.append((c, s))
    return tuple(out)


def split_layouts(occ: Occurrence, index: int) -> list[Layout] | None:
    """The layout of this occurrence's units at each position of the index variable (one
    per head), or None unless the index is exactly one outer factor of it."""
    rng = occ.ranges.get(index, [])
    if len(rng) != 1:
        return None
    lo, hi = rng[0]
    inside = occ.atoms[lo:hi]
    rest = [(c, s) for k, (_, c, s) in enumerate(occ.atoms) if not lo <= k < hi]
    n = math.prod(c for _, c, _ in inside)
    layouts = []
    for i in range(n):
        off, rem = occ.offset, i
        for _, c, s in reversed(inside):  # row-major digits of head i
            off += (rem % c) * s
            rem //= c
        layouts.append(Layout(off, occ.scale, _merge(rest)))
    return layouts


# -- the proof -------------------------------------------------------------------------------
_VIEWS = {
    "aten.view", "aten.reshape", "aten._unsafe_view", "aten.flatten", "aten.unflatten", "aten.squeeze",
    "aten.unsqueeze", "aten._reshape_alias", "aten.view_as", "aten.reshape_as", "aten.ravel",
    "aten.permute", "aten.transpose", "aten.t", "aten.swapaxes", "aten.swapdims", "aten.movedim", "aten.mT",
    "aten.expand", "aten.expand_as", "aten.broadcast_to", "aten.cat", "aten.concat", "aten.concatenate",
    "aten.stack", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split", "aten.unbind",
    "aten.slice", "aten.narrow", "aten.select", "aten.clone", "aten.contiguous", "aten.alias", "aten.detach",
    "aten._to_copy", "aten.to", "aten.type_as", "aten.lift_fresh_copy", "aten.copy", "aten.dropout",
    "aten.gelu", "aten.silu", "aten.relu", "aten.masked_fill", "aten.where", "aten.clamp", "aten.clamp_min",
    "aten.clamp_max", "aten.hardtanh", "aten.leaky_relu", "aten.elu", "aten.softplus", "aten.mish",
}
_PRODUCTS = {
    "aten.linear", "aten.mm", "aten.bmm", "aten.matmul", "aten.addmm", "aten.baddbmm", "aten.mv", "aten.addmv",
    "aten.scaled_dot_product_attention",
}
_REDUCE = {
    "aten.sum", "aten.mean", "aten.amax", "aten.amin", "aten.var", "aten.std", "aten.var_mean", "aten.std_mean",
    "aten.logsumexp", "aten.linalg_vector_norm", "aten.norm", "aten.nansum", "aten.nanmean",
    "aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten.special_softmax",
}
_NORMS = {"aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten._fused_rms_norm"}


def packet(node: torch.fx.Node) -> str:
    """The op's packet name, ``"aten.add"`` for ``aten.add.Tensor``."""
    return ".".join(op_name(node.target).split(".")[:2])


def pointwise(node: torch.fx.Node) -> bool:
    """Whether the op is element-wise (torch's ``pointwise`` tag)."""
    tags = getattr(node.target, "tags", ())
    return torch.Tag.pointwise in tags


class AxisTrees:
    """Axis trees of the solved graph, without creating variables (also read by
    `permgraph.experts`)."""

    def __init__(self, s) -> None:
        self.s = s
        self.cache: dict[tuple, Leaf | Tree | None] = {}

    def tree(self, value: tuple, dim: int) -> Leaf | Tree | None:
        key = (value, dim)
        if key not in self.cache:
            v = self.s.axis_var.get(key)
            self.cache[key] = None if v is None else self.s.u.tree(v)
        return self.cache[key]

    def carriers(self, nodes, roots) -> dict[int, list]:
        """For each root, the ``(node, value)`` pairs, in graph order, of the values carrying it."""
        out: dict[int, list] = {r: [] for r in roots}
        for node in nodes:
            for tv in values_of(node):
                for r in out:
                    if self.where(tv, r, None):
                        out[r].append((node, tv))
        return out

    def where(self, tv, r: int, index: int | None) -> tuple[int, int | None] | None | bool:
        """For a value: False if it does not carry ``r``; None if it carries it in a way no
        head index explains; else ``(r's dim, the head's dim or None when the head is an
        outer factor of r's own axis)``. With ``index`` None, only whether it carries ``r``."""
        dims = [d for d in range(len(tv.shape)) if (t := self.tree(tv.value, d)) is not None and contains(t, r)]
        if not dims:
            return False
        if index is None:
            return True
        if len(dims) != 1:
            return None
        (d,) = dims
        occs = occurrences(self.tree(tv.value, d), r)
        merged = [len(o.ranges.get(index, [])) for o in occs]
        elsewhere = []
        for e in range(len(tv.shape)):
            t = self.tree(tv.value, e)
            if e != d and t is not None:
                rg: dict[int, list] = {}
                _flatten(t, 1, [], rg)
                elsewhere += [e] * len(rg.get(index, []))
        if all(m == 1 for m in merged) and not elsewhere:
            return (d, None)
        if all(m == 0 for m in merged) and len(elsewhere) == 1:
            return (d, elsewhere[0])
        return None

    def candidates(self, tv, r: int, param: bool) -> set[int]:
        """The roots that could index ``r``'s units in this value, head by head."""
        dims = [d for d in range(len(tv.shape)) if (t := self.tree(tv.value, d)) is not None and contains(t, r)]
        if len(dims) != 1:
            return set()
        occs = occurrences(self.tree(tv.value, dims[0]), r)
        out = set.intersection(*(set(o.ranges) for o in occs)) if occs else set()
        if not param:
            for e in range(len(tv.shape)):
                t = self.tree(tv.value, e)
                if e != dims[0] and t is not None:
                    rg: dict[int, list] = {}
                    _flatten(t, 1, [], rg)
                    out |= set(rg)
        return {c for c in out if c != r and self.where(tv, r, c) not in (None, False)
                and (not param or self.where(tv, r, c)[1] is None)}


def _reduced_dims(node: torch.fx.Node, ndim: int) -> set[int] | None:
    args = bind_args(node)
    pkt = packet(node)
    if pkt in _NORMS:
        k = len(args.get("normalized_shape", ()))
        return set(range(ndim - k, ndim))
    dims = args.get("dim", None)
    if dims is None or dims == []:
        return set(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    try:
        return {int(d) % ndim for d in dims}
    except (TypeError, ValueError):
        return None


def _op_per_head(node: torch.fx.Node, vals: AxisTrees, r: int, index: int) -> bool:
    """Does this call act head by head on the values carrying ``r``? (See the module docstring.)"""
    pkt = packet(node)
    if node.target is operator.getitem or pkt in _VIEWS or pkt in _PRODUCTS or pointwise(node):
        return True
    if pkt in _REDUCE or pkt in _NORMS:
        x = value_of_arg(node.args[0]) if node.args else None
        if x is None:
            return False
        w = vals.where(x, r, index)
        if w is False:
            return True
        dims = _reduced_dims(node, len(x.shape))
        return dims is not None and isinstance(w, tuple) and (w[1] is None or w[1] not in dims)
    return False


def find_splits(traced, s, groups: dict[int, list]) -> dict[int, int]:
    """For each within-head group root in ``groups`` (root -> the parameter values that carry
    it), the head variable it splits along, where the proof holds."""
    vals = AxisTrees(s)
    carriers = vals.carriers(traced.graph_module.graph.nodes, groups)
    out: dict[int, int] = {}
    for r, found in carriers.items():
        cands: set[int] | None = None
        for node, tv in found:
            if node.op == "placeholder" and node.name not in traced.params:
                cands = set()
                break
            c = vals.candidates(tv, r, node.op == "placeholder")
            cands = c if cands is None else cands & c
            if not cands:
                break
        if not cands:
            continue
        index = max(cands, key=lambda c: (s.u.size(c), -c))
        if s.u.size(index) < 2:
            continue
        if all(_carrier_ok(node, tv, vals, r, index) for node, tv in found) and \
                all(_consumers_ok(node, vals, r, index) for node, _ in found):
            out[r] = index
    return out


def _carrier_ok(node, tv, vals: AxisTrees, r: int, index: int) -> bool:
    w = vals.where(tv, r, index)
    if not isinstance(w, tuple):
        return False
    if node.op == "placeholder":
        return w[1] is None
    if node.op != "call_function":
        return False
    return _op_per_head(node, vals, r, index)


def _consumers_ok(node, vals: AxisTrees, r: int, index: int) -> bool:
    """Every user of a value carrying ``r`` acts head by head (the output node never does)."""
    for user in node.users:
        if user.op != "call_function":
            return False
        if not _op_per_head(user, vals, r, index):
            return False
    return True
