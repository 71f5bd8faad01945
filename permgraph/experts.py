"""Per-expert units: split a group shared by the experts of a stacked weight into one group
per expert.

A mixture of experts that stacks its experts' weights (``gate_up_proj`` of shape
``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``) and runs them as grouped products
(``out[s] = x[s] @ w[g(s)]``, row ``s`` taken by the expert ``g(s)`` that the offsets name)
gets from the rules one group for the hidden units ``I``, shared by every expert: the rules
see one axis ``I`` in each weight and in each activation between the two products. The true
symmetry is larger: each expert may permute its own hidden units. This pass offers that, and
only where it can prove it. For a group ``R`` it checks that every value carrying ``R`` is

* a *stack*: a parameter whose dim 0 is the experts (``E >= 2``, not carrying ``R``), or a
  view of a stack that keeps dim 0 in place (``transpose`` of other dims, a slice along
  another dim, a copy); or
* a *row-labelled* activation: the output of a grouped product over a stack (``_grouped_mm``
  or Hugging Face's grouped-mm fallback) whose rows are named by an offsets value ``O``, or
  what row-wise ops make of such outputs (element-wise ops, ``split``/``chunk``/``slice``
  along another dim than the rows, copies), every input carrying ``R`` labelled by the same
  ``O``;

and that every use of such a value is one of those, a grouped product that contracts ``R``
over rows labelled by the same ``O`` against a stack, or an assertion on its metadata. Row
``s`` of every labelled value then belongs to expert ``g(s)`` of one offsets value, so
permuting expert ``e``'s units in its weights' slices and in the rows ``g(s) = e`` leaves
every product unchanged. Anything else (a shared bias gathered per row, a view that moves
the rows, an op this pass does not know) leaves ``R`` shared: sound first.

A per-expert group's members are its shared group's members restricted to index ``e`` of
the weight's dim 0 (`permgraph.spec.Member` ``at``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch

from permgraph.heads import AxisTrees, contains, packet, pointwise
from permgraph.rules import bind_args, values_of
from permgraph.spec import Member

__all__ = ["EXPERT_MODES", "find_expert_splits", "split_per_expert"]

EXPERT_MODES = ("shared", "independent")

#: ops whose output is their input, dims in place (a stack stays a stack, rows stay rows)
_COPIES = {"aten._to_copy", "aten.to", "aten.clone", "aten.contiguous", "aten.alias", "aten.detach",
           "aten.type_as", "aten.lift_fresh_copy", "aten.dropout"}
#: ops that take positions along one dim (a row-labelled value keeps its rows if not dim 0)
_ALONG = {"aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split", "aten.slice", "aten.narrow"}
#: grouped products: (input, stacked weight, offsets) argument names
_GROUPED = {"aten._grouped_mm": ("self", "mat2", "offs"), "transformers.grouped_mm_fallback": ("input", "weight", "offs")}
#: uses that read a value's metadata only
_META = {"aten._assert_tensor_metadata", "aten.sym_size", "aten.sym_numel", "aten.sym_stride"}

Kind = tuple[str, object]  # ("stack", E) | ("rows", offsets node name)


def find_expert_splits(traced, s, roots: Iterable[int]) -> dict[int, int]:
    """For each group root in ``roots``, the number of experts it splits into, where the
    proof in the module docstring holds."""
    nodes = traced.graph_module.graph.nodes
    roots = list(roots)
    if not roots or not any(n.op == "call_function" and packet(n) in _GROUPED for n in nodes):
        return {}  # the proof needs a grouped product
    vals = AxisTrees(s)
    out: dict[int, int] = {}
    for r, found in vals.carriers(nodes, roots).items():
        experts = _proof(traced, vals, r, found)
        if experts:
            out[r] = experts
    return out


def split_per_expert(traced, s, found: dict, parents: dict) -> None:
    """Replace, in ``found`` (group root -> members), each group of stacked weights that
    `find_expert_splits` proves splits by one group per expert, root ``(root, e, "expert")``:
    the shared group's members in slice ``e`` of the stack (dim 0); ``parents`` (root -> the
    roots it was refined from) follows."""
    stacked = [r for r, ms in found.items() if not isinstance(r, tuple)
               and any(len(traced.state_shapes[m.key]) >= 3 for m in ms)]
    for r, n in find_expert_splits(traced, s, stacked).items():
        for e in range(n):
            found[(r, e, "expert")] = [Member(m.key, m.axis, m.layout, at=((0, e),)) for m in found[r]]
            parents[(r, e, "expert")] = parents.get(r, set())
        del found[r]


def _dims_with(vals: AxisTrees, tv, r: int) -> list[int]:
    return [d for d in range(len(tv.shape)) if (t := vals.tree(tv.value, d)) is not None and contains(t, r)]


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg_value(arg) -> tuple | None:
    """The value key of a node argument (a node's own tensor)."""
    return (arg.name, None) if isinstance(arg, torch.fx.Node) else None


def _kind(node: torch.fx.Node, tv, kinds: dict[tuple, Kind], vals: AxisTrees, r: int, traced) -> Kind | None:
    """What a value carrying ``r`` is (see the module docstring), or None when no case fits."""
    dims = _dims_with(vals, tv, r)
    if len(dims) != 1 or dims[0] == 0 or len(tv.shape) < 2:
        return None
    if node.op == "placeholder":
        return ("stack", tv.shape[0]) if node.name in traced.params and tv.shape[0] >= 2 else None
    if node.op != "call_function":
        return None
    pkt = packet(node)
    if node.target is operator.getitem:
        src, i = node.args[0], node.args[1]
        return kinds.get((src.name, i)) if isinstance(src, torch.fx.Node) and isinstance(i, int) else None
    args = bind_args(node)
    first = args.get("self", args.get("input"))
    src = kinds.get(_arg_value(first)) if isinstance(first, torch.fx.Node) else None
    if pkt in _GROUPED:
        x, w, offs = (args.get(n) for n in _GROUPED[pkt])
        wk = kinds.get(_arg_value(w))
        xv = _arg_value(x)
        if wk is None or wk[0] != "stack" or not isinstance(offs, torch.fx.Node) or xv is None \
                or _shape(offs) != (wk[1],):
            return None
        if any(contains(t, r) for d in range(2) if (t := vals.tree(xv, d)) is not None):
            return None  # r on both sides of one product
        return ("rows", offs.name)
    if src is None:
        if pointwise(node):
            return _pointwise_kind(node, kinds, vals, r, tv)
        return None
    if pkt in _COPIES:
        return src
    if src[0] == "stack" and pkt in ("aten.transpose", "aten.permute"):
        ndim = len(tv.shape)
        if pkt == "aten.transpose":
            keep = 0 not in {_norm(int(args["dim0"]), ndim), _norm(int(args["dim1"]), ndim)}
        else:
            keep = _norm(int(list(args["dims"])[0]), ndim) == 0
        return src if keep else None
    if pkt in _ALONG:  # positions along the units (or another dim than rows and experts)
        return src if _norm(int(args.get("dim", 0)), len(_shape(first))) != 0 else None
    if pointwise(node):
        return _pointwise_kind(node, kinds, vals, r, tv)
    return None


def _pointwise_kind(node: torch.fx.Node, kinds: dict[tuple, Kind], vals: AxisTrees, r: int, tv) -> Kind | None:
    """An element-wise op keeps its rows when every input carrying ``r`` has the same row
    labels and the output's rows are theirs (same rank, same number of rows)."""
    labels = set()
    for arg in node.all_input_nodes:
        key = _arg_value(arg)
        if key is None:
            continue
        k = kinds.get(key)
        if k is None:
            in_tv = next((v for v in values_of(arg) if v.value == key), None)
            if in_tv is not None and _dims_with(vals, in_tv, r):
                return None  # carries r, but not as labelled rows
            continue
        if k[0] != "rows" or len(_shape(arg)) != len(tv.shape) or _shape(arg)[0] != tv.shape[0]:
            return None
        labels.add(k)
    return labels.pop() if len(labels) == 1 else None


def _proof(traced, vals: AxisTrees, r: int, found: list) -> int | None:
    kinds: dict[tuple, Kind] = {}
    for node, tv in found:  # graph order: a value's inputs come first
        k = _kind(node, tv, kinds, vals, r, traced)
        if k is None:
            return None
        kinds[tv.value] = k
    experts = {k[1] for k in kinds.values() if k[0] == "stack"}
    params = any(node.op == "placeholder" for node, _ in found)
    if len(experts) != 1 or not params or not any(k[0] == "rows" for k in kinds.values()):
        return None
    (n_experts,) = experts
    for node in dict.fromkeys(node for node, _ in found):
        if not all(_use_ok(user, kinds, vals, r, n_experts) for user in node.users):
            return None
    return int(n_experts)


def _shape(arg: torch.fx.Node) -> tuple[int, ...]:
    val = arg.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _use_ok(user: torch.fx.Node, kinds: dict[tuple, Kind], vals: AxisTrees, r: int,
            n_experts: int) -> bool:
    """Is this use of a value carrying ``r`` one the proof allows?"""
    if user.op != "call_function":
        return False
    if any(tv.value in kinds for tv in values_of(user)):
        return True  # itself a carrier, checked as one
    pkt = packet(user)
    if pkt in _META:
        return True
    if pkt not in _GROUPED:
        return False
    # a product that contracts r: rows labelled by its own offsets, against a stack
    x, w, offs = (bind_args(user).get(n) for n in _GROUPED[pkt])
    xk, wk = kinds.get(_arg_value(x)), kinds.get(_arg_value(w))
    if xk is None or wk is None or not isinstance(offs, torch.fx.Node):
        return False
    shape = _shape(offs)
    return xk == ("rows", offs.name) and wk == ("stack", n_experts) and shape == (n_experts,) \
        and _dims_with(vals, _tv(x), r) == [1] and _dims_with(vals, _tv(w), r) == [1]


def _tv(arg: torch.fx.Node):
    return values_of(arg)[0]
