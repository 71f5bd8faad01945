"""What `permgraph.draw` reads from a `PermSpec`: the one place that reads ``spec.graph``
node attributes and ``spec.traced`` (nodes in topological order, producers and users, and
why fixed axes are fixed)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from permgraph.errors import DrawError
from permgraph.spec import Layout, PermSpec

__all__ = ["TensorInfo", "Node", "GraphView", "block_reasons", "UNTRACKED", "UNKNOWN"]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor a node produces: its shape and, per dim, the ``(group, Layout)`` pairs."""

    shape: tuple[int, ...]
    dims: tuple[tuple[tuple[str, Layout], ...], ...]

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(g for d in self.dims for g, _ in d))


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # "op", "input", "output", "parameter", "constant"
    op: str  # short op name ("conv2d", "add"), "" for non-ops
    module: str
    calls: tuple[tuple[str, str, str], ...]  # nn_module_stack: (call key, path, class), root first
    tensors: tuple[TensorInfo, ...]
    keys: tuple[str, ...]  # state_dict keys (parameters)


def _short_op(target: str) -> str:
    parts = target.split(".")
    if target.startswith("aten.") and len(parts) >= 3:
        return parts[1]
    return parts[-1] if parts else target


def _is_shape(s: Any) -> bool:
    return isinstance(s, tuple) and all(isinstance(x, int) for x in s)


def _tensors(attrs: dict[str, Any]) -> tuple[TensorInfo, ...]:
    shape, layouts = attrs.get("shape"), attrs.get("layouts") or ()
    if shape is None:
        return ()
    if _is_shape(shape):
        shapes, lays = [shape], [layouts]
    else:  # a tuple output: ``layouts`` has one entry per tensor element
        shapes = [s for s in shape if _is_shape(s)]
        lays = list(layouts) if len(layouts) == len(shapes) else [()] * len(shapes)
    out = []
    for s, lay in zip(shapes, lays):
        dims = tuple(tuple((str(g), lo) for g, lo in d) for d in lay) if len(lay) == len(s) else ((),) * len(s)
        out.append(TensorInfo(tuple(s), dims))
    return tuple(out)


class GraphView:
    """What the drawing needs from a `PermSpec`, read once: nodes in graph (topological)
    order, their producers and users, and why fixed axes are fixed."""

    def __init__(self, spec: PermSpec) -> None:
        analysis = getattr(spec, "analysis", None)
        graph = getattr(analysis, "graph", None)
        if graph is None:
            raise DrawError(
                "this PermSpec has no graph (specs read back from JSON or a file keep only the groups); "
                "draw the spec that permgraph.infer(model, example_inputs) returns"
            )
        self.spec = spec
        self.traced = getattr(analysis, "traced", None)
        fx = {n.name: n for n in self.traced.graph_module.graph.nodes} if self.traced is not None else {}
        self.nodes: dict[str, Node] = {}
        for name, d in graph.nodes(data=True):
            calls: tuple[tuple[str, str, str], ...] = ()
            stack = fx[name].meta.get("nn_module_stack") if name in fx else None
            if stack:
                calls = tuple((str(k), str(v[0]), str(v[1]).rsplit(".", 1)[-1]) for k, v in stack.items())
            self.nodes[name] = Node(
                name=name,
                kind=str(d.get("kind", "op")),
                op=_short_op(str(d.get("target", ""))) if d.get("kind") == "op" else "",
                module=str(d.get("module", "")),
                calls=calls,
                tensors=_tensors(d),
                keys=tuple(d.get("keys", ())),
            )
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.preds: dict[str, list[str]] = {n: [] for n in self.nodes}
        self.succs: dict[str, list[str]] = {n: [] for n in self.nodes}
        for u, v in graph.edges():
            if v not in self.succs[u]:
                self.succs[u].append(v)
                self.preds[v].append(u)
        if self.traced is not None:
            self.user_outputs = set(self.traced.user_outputs)
        else:
            outs = [n for n, x in self.nodes.items() if x.kind == "output"]
            self.user_outputs = {p for o in outs for p in self.preds[o]}
        # state_dict keys no op reads (a parameter only a training-time branch uses)
        self.unused = {k for n, x in self.nodes.items() if x.kind == "parameter" and not self.succs[n] for k in x.keys}
        self._reasons: dict[str, list[list[str | None]]] | None = None

    def reasons(self, name: str) -> list[list[str | None]]:
        """Per tensor, per dim: why the axis is fixed; None when it is not blocked, ``""``
        when the rules never saw it (a view that the picks pass reads through)."""
        if self._reasons is None:
            self._reasons = {}
            if self.traced is not None:
                try:
                    self._reasons = block_reasons(self.traced)
                except Exception as exc:  # noqa: BLE001 - a drawing without reasons beats none
                    warnings.warn(f"permgraph.draw could not read why axes are blocked ({type(exc).__name__}: "
                                  f"{exc}); fixed tensors are drawn without their reason", stacklevel=3)
                    self._reasons = {n: [[UNKNOWN] * len(t.shape) for t in x.tensors] for n, x in self.nodes.items()}
        return self._reasons.get(name, [])


UNTRACKED = "no group: the rules relate this view's source to its users directly"
UNKNOWN = "no group (the reason could not be read)"


def block_reasons(traced: Any) -> dict[str, list[list[str | None]]]:
    """Re-run the rules (milliseconds: no trace) to read why each blocked axis is blocked;
    the graph's attributes only say which groups permute an axis."""
    from permgraph.analysis import block_reasons as reasons

    return reasons(traced)
