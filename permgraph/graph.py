"""The graph users inspect: a ``networkx.MultiDiGraph`` of the traced ops.

Nodes are fx node names. Attributes:

* ``kind``: ``"parameter"`` (parameters and persistent buffers), ``"input"``, ``"constant"``
  (non-persistent buffers, lifted constants), ``"op"`` or ``"output"``;
* ``target``: the op, e.g. ``"aten.conv2d.default"``;
* ``module``: the innermost module path that called it (``"layer1.0.conv1"``), or ``""``;
* ``shape``: the output shape (a tuple of shapes for tuple outputs), ``None`` for non-tensors;
* ``keys``: for parameters, the state_dict keys (several for tied weights);
* ``groups``: written by `infer`: for each output dim, the names of the
  groups that permute it (empty when fixed); a tuple of these per element for tuple outputs;
* ``layouts``: likewise, ``(group name, Layout)`` pairs: where each group's units sit.

Edges run from an argument to its user, keyed by the argument's position.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch

from permgraph.rules import op_name
from permgraph.tracing import Traced

__all__ = ["build_graph", "module_path"]


def module_path(node: torch.fx.Node) -> str:
    """The innermost module path recorded for an fx node (``""`` for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path)


def _dim(s: Any) -> int | str:
    """A dim's size, or its symbol (``"u0"``) where it depends on the data."""
    try:
        return int(s)
    except Exception:  # noqa: BLE001 - an unbacked symbol has no value to read
        return str(s)


def _shape(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return tuple(s if isinstance(s, int) else _dim(s) for s in val.shape)
    if isinstance(val, (list, tuple)):
        return tuple(_shape(v) for v in val)
    return None


def build_graph(traced: Traced) -> nx.MultiDiGraph:
    """One networkx node per fx node, one edge per argument use."""
    g = nx.MultiDiGraph()
    for node in traced.graph_module.graph.nodes:
        attrs: dict[str, Any] = {"target": "", "module": module_path(node), "shape": _shape(node.meta.get("val"))}
        if node.op == "placeholder":
            if node.name in traced.params:
                attrs.update(kind="parameter", keys=traced.params[node.name])
            elif node.name in traced.user_inputs:
                attrs.update(kind="input")
            else:
                attrs.update(kind="constant", reason=traced.not_in_state_dict.get(node.name, ""))
        elif node.op == "output":
            attrs.update(kind="output")
        else:
            attrs.update(kind="op", target=op_name(node.target))
        g.add_node(node.name, **attrs)
        for i, arg in enumerate(node.all_input_nodes):
            g.add_edge(arg.name, node.name, key=i)
    return g
