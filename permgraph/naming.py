"""Group names: the module that produces the units, plus a role where one module yields several.

A plain group is named after the module of its first member in state_dict order
(``layer1.0.conv1``). Groups that are factors of one refined axis (``E = H x D``: heads and
the units within each head) form a *family*, and each gets a role read off the structure:

* ``heads``: the outer factor (whole heads move); ``subheads``: a factor between two others
  (with grouped-query attention, the query heads that share one key/value head);
* ``qk``: within-head units that a product of two activations sums away (queries against
  keys);
* ``v``: within-head units that a product of activations carries to its output (values);
* ``blocks`` / ``units``: outer and inner factors of a family that no such product reads
  (the groups of a grouped convolution).

An attention's family is named after the module its products run in (read off the graph's
module stack: the module that calls ``scaled_dot_product_attention`` or ``q @ kᵀ``); another
family after the common module of a group's members and its siblings, or after its first
member's module when they share none. So names do not depend on the order in which
modules were registered. A per-head group adds ``.h<i>``, ``i`` the head's position along
the head axis. A name that would still repeat gets ``#k`` (in spec order).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from permgraph.graph import module_path
from permgraph.rules import value_of_arg, values_of
from permgraph.unify import Leaf, Tree

__all__ = ["base_name", "group_names"]

_SUFFIXES = (".weight", ".bias", ".running_mean", ".running_var", ".in_proj_weight", ".in_proj_bias")


def base_name(key: str) -> str:
    """The module path of a state_dict key (``a.b.weight`` -> ``a.b``)."""
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _prods(t: Leaf | Tree, out: list) -> None:
    """Every product node of an axis tree, as the list of leaf roots under each part."""
    if isinstance(t, Leaf):
        return
    if t.kind == "prod":
        out.append([_leaves(p) for p in t.parts])
    for p in t.parts:
        _prods(p, out)


def _leaves(t: Leaf | Tree) -> list[int]:
    return [t.root] if isinstance(t, Leaf) else [r for p in t.parts for r in _leaves(p)]


def _common(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        out.append(seg[0])
    return ".".join(out)


def _tree_roots(s, value: tuple, ndim: int) -> set[int]:
    out: set[int] = set()
    for d in range(ndim):
        v = s.axis_var.get((value, d))
        if v is not None:
            out |= set(_leaves(s.u.tree(v)))
    return out


def _product_roles(traced, s) -> tuple[dict[int, str], dict[int, set[str]]]:
    """Within-head roles read off products of two activations (``q kᵀ``, ``p v``, attention),
    and the modules those products run in."""
    params = set(traced.params)
    roles: dict[int, str] = {}
    where: dict[int, set[str]] = {}
    for node in traced.graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        ins = [a for a in node.all_input_nodes if value_of_arg(a) is not None]
        acts = [a for a in ins if a.op != "placeholder" or a.name not in params]
        if len(acts) < 2 or not _is_product(node):
            continue
        out = set().union(*(_tree_roots(s, tv.value, len(tv.shape)) for tv in values_of(node)))
        carried = [_tree_roots(s, value_of_arg(a).value, len(value_of_arg(a).shape)) for a in acts]
        for r in set().union(*carried):
            n = sum(r in c for c in carried)
            role = "qk" if n >= 2 and r not in out else "v" if n == 1 and r in out else None
            if role is not None:
                roles.setdefault(r, role)
                where.setdefault(r, set()).add(module_path(node))
    return roles, where


def _is_product(node: torch.fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target))
    return any(k in name for k in ("mm", "matmul", "scaled_dot_product_attention", "einsum"))


def group_names(traced, s, ranked: list[tuple[Any, list]], splits: dict[int, int]) -> dict[Any, str]:
    """Names for ``ranked`` (``(root, members)`` in spec order; a per-head group's root is
    ``(root, head)``): see the module docstring."""
    nodes = {n.name: n for n in traced.graph_module.graph.nodes}
    roots = {(r[0] if isinstance(r, tuple) else r) for r, _ in ranked}
    # families: the groups that are factors of one product in some parameter's axis
    parent = {r: r for r in roots}

    def find(r):
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    position: dict[int, set[str]] = {}
    trees: list[set[int]] = []  # the groups within one parameter axis's products
    for ph in traced.params:
        val = value_of_arg(nodes[ph])
        if val is None:
            continue
        for a in val.axes:
            v = s.axis_var.get((a.value, a.dim))
            if v is None:
                continue
            prods: list = []
            _prods(s.u.tree(v), prods)
            mine: set[int] = set()
            for parts in prods:
                for i, leaves in enumerate(parts):
                    for r in set(leaves) & roots:
                        mine.add(r)
                        if i > 0:
                            position.setdefault(r, set()).add("left")
                        if i < len(parts) - 1:
                            position.setdefault(r, set()).add("right")
            trees.append(mine)
            for r in list(mine)[1:]:
                parent[find(r)] = find(next(iter(mine)))
    roles, where = _product_roles(traced, s)
    attention = {find(r) for r in roots if r in position and roles.get(r)}
    size: dict[int, int] = {}
    for r in roots:
        size[find(r)] = size.get(find(r), 0) + 1
    modules: dict[int, set[str]] = {}
    for root, members in ranked:
        r = root[0] if isinstance(root, tuple) else root
        modules.setdefault(r, set()).update(base_name(m.key) for m in members)
    # the units within heads are named after the module holding them and their siblings
    # (queries, keys and values of one projection): one module per attention
    inner = {r for r in roots if position.get(r) == {"left"}}
    around = {r: set(modules[r]) for r in roots}
    for mine in trees:
        sib = mine & inner
        for r in sib:
            for o in sib:
                around[r] |= modules[o]
    ran: dict[int, set[str]] = {}
    for r in where:
        if r in roots:
            ran.setdefault(find(r), set()).update(where[r])
    names: dict[Any, str] = {}
    used: dict[str, int] = {}
    for root, members in ranked:
        r = root[0] if isinstance(root, tuple) else root
        pos = position.get(r, set())
        if size[find(r)] < 2 and find(r) not in attention:
            pos = set()  # a lone factor (a conv's channels flattened into blocks) is a plain group
        module = _common(sorted(around[r])) if pos else ""
        if pos and find(r) in attention:  # the module that runs the attention
            module = _common(sorted(where[r] if r in where else ran.get(find(r), ()))) or module
        if not pos:
            name = base_name(members[0].key)
        else:
            attn = find(r) in attention
            if pos == {"right"}:
                role = "heads" if attn else "blocks"
            elif pos == {"left", "right"}:
                role = "subheads" if attn else "blocks"
            else:
                role = roles.get(r, "units") if attn else "units"
            if not module and not (attn and not ran.get(find(r)) - {""}):
                module = base_name(members[0].key)  # no module in common: the first member's
            name = f"{module}.{role}" if module else role
        if isinstance(root, tuple):  # (root, head) or (root, expert, "expert")
            name += f".{'e' if len(root) > 2 else 'h'}{root[1]}"
        used[name] = used.get(name, 0) + 1
        names[root] = name if used[name] == 1 else f"{name}#{used[name]}"
    return names
