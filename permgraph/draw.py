"""Draw a model's graph coloured by permutation group: `draw` (Graphviz DOT, SVG, PNG).

The traced graph is collapsed to one node per leaf-module call (``layer1.0.conv1``) or per
cluster of functional ops (``add``, ``view · transpose``); every edge between two nodes is a
tensor, coloured and labelled by the group(s) that permute its axes (name, units, and the
layout when it is not the whole axis: blocks, offsets, repeats as in heads). A tensor that no
group permutes is dashed, with the reason it is fixed (model input or output, an op without a
rule, ...) as its tooltip. Model inputs and outputs are marked; a legend lists every group.

Options: ``module=PREFIX`` draws one region, ``depth=N`` collapses every module below depth
``N`` into one node, ``fold=True`` draws a run of four or more identical indexed blocks
(``h.0``, ``h.1``, ...) as its first block, one node for the middle ones and its last block.

The DOT text is always produced (no dependency); rendering to SVG/PNG/PDF needs Graphviz's
``dot`` binary and the Python ``graphviz`` package (``pip install "permgraph[draw]"``). When
either is missing, `Drawing.save` writes the ``.dot`` file instead and warns how to install
them. Nodes and edges carry ``pg_kind``, ``pg_groups`` and ``pg_params`` attributes (JSON
lists) for tools that post-process the DOT text.
"""

from __future__ import annotations

import colorsys
import html
import importlib.util
import json
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from permgraph.errors import DrawError, GraphvizMissingWarning
from permgraph.spec import Layout, PermSpec

__all__ = ["draw", "Drawing", "DrawError", "GraphvizMissingWarning", "FORMATS", "graphviz_missing", "check_path"]

FORMATS = ("svg", "png", "pdf", "dot", "gv")
INSTALL_HINT = (
    "install Graphviz's `dot` binary (apt-get install graphviz, brew install graphviz or "
    "conda install -c conda-forge graphviz) and the Python package (pip install \"permgraph[draw]\")"
)


# ---------------------------------------------------------------------------------------
# The adapter: the one place that reads ``spec.graph`` node attributes and ``spec.traced``.
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tensor:
    """One tensor a node produces: its shape and, per dim, the ``(group, Layout)`` pairs."""

    shape: tuple[int, ...]
    dims: tuple[tuple[tuple[str, Layout], ...], ...]

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(g for d in self.dims for g, _ in d))


@dataclass(frozen=True)
class _Node:
    name: str
    kind: str  # "op", "input", "output", "parameter", "constant"
    op: str  # short op name ("conv2d", "add"), "" for non-ops
    module: str
    calls: tuple[tuple[str, str, str], ...]  # nn_module_stack: (call key, path, class), root first
    tensors: tuple[_Tensor, ...]
    keys: tuple[str, ...]  # state_dict keys (parameters)


def _short_op(target: str) -> str:
    parts = target.split(".")
    if target.startswith("aten.") and len(parts) >= 3:
        return parts[1]
    return parts[-1] if parts else target


def _is_shape(s: Any) -> bool:
    return isinstance(s, tuple) and all(isinstance(x, int) for x in s)


def _tensors(attrs: dict[str, Any]) -> tuple[_Tensor, ...]:
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
        out.append(_Tensor(tuple(s), dims))
    return tuple(out)


class _GraphView:
    """What the drawing needs from a `PermSpec`, read once: nodes in graph (topological)
    order, their producers and users, and why fixed axes are fixed."""

    def __init__(self, spec: PermSpec) -> None:
        graph = getattr(spec, "graph", None)
        if graph is None:
            raise DrawError(
                "this PermSpec has no graph (specs read back from JSON or a file keep only the groups); "
                "draw the spec that permgraph.infer(model, example_inputs) returns"
            )
        self.spec = spec
        self.traced = getattr(spec, "traced", None)
        fx = {n.name: n for n in self.traced.graph_module.graph.nodes} if self.traced is not None else {}
        self.nodes: dict[str, _Node] = {}
        for name, d in graph.nodes(data=True):
            calls: tuple[tuple[str, str, str], ...] = ()
            stack = fx[name].meta.get("nn_module_stack") if name in fx else None
            if stack:
                calls = tuple((str(k), str(v[0]), str(v[1]).rsplit(".", 1)[-1]) for k, v in stack.items())
            self.nodes[name] = _Node(
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
                    self._reasons = _block_reasons(self.traced)
                except Exception as exc:  # noqa: BLE001 - a drawing without reasons beats none
                    warnings.warn(f"permgraph.draw could not read why axes are blocked ({type(exc).__name__}: "
                                  f"{exc}); fixed tensors are drawn without their reason", stacklevel=3)
                    self._reasons = {n: [[_UNKNOWN] * len(t.shape) for t in x.tensors] for n, x in self.nodes.items()}
        return self._reasons.get(name, [])


_UNTRACKED = "no group: the rules relate this view's source to its users directly"
_UNKNOWN = "no group (the reason could not be read)"


def _block_reasons(traced: Any) -> dict[str, list[list[str | None]]]:
    """Re-run the rules (milliseconds: no trace) to read why each blocked axis is blocked;
    the graph's attributes only say which groups permute an axis."""
    from permgraph.analysis import analyze
    from permgraph.rules import values_of

    s, _ = analyze(traced)
    out: dict[str, list[list[str | None]]] = {}
    for node in traced.graph_module.graph.nodes:
        per = []
        for v in values_of(node):
            dims: list[str | None] = []
            for a in v.axes:
                var = s.axis_var.get((a.value, a.dim))
                if var is None:
                    dims.append("")
                elif not s.u.is_blocked(var):
                    dims.append(None)
                else:
                    dims.append(s.u.block_reason(var) or "part of a blocked axis")
            per.append(dims)
        out[node.name] = per
    return out


# ---------------------------------------------------------------------------------------
# Clustering: fx nodes -> drawn nodes
# ---------------------------------------------------------------------------------------

@dataclass
class _Cluster:
    cid: str
    kind: str  # "module", "ops", "fold", "input", "output", "outside"
    title: str
    subtitle: str
    members: list[str] = field(default_factory=list)
    module: str = ""  # the module path it runs in ("" for the root's functional ops)


class _UF:
    def __init__(self) -> None:
        self.p: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.p.setdefault(x, x)
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[rb] = ra


def _convex(members: set[str], view: _GraphView) -> bool:
    """No path leaves the set and comes back (so contracting it adds no cycle)."""
    top = max(view.order[n] for n in members)
    stack = [w for n in members for w in view.succs[n] if w not in members and view.order[w] < top]
    seen: set[str] = set()
    while stack:
        w = stack.pop()
        if w in seen:
            continue
        seen.add(w)
        for x in view.succs[w]:
            if x in members:
                return False
            if view.order[x] < top and x not in seen:
                stack.append(x)
    return True


def _call_entry(node: _Node, depth: int | None) -> tuple[str, str, str]:
    if not node.calls:
        return ("", node.module, "")
    i = len(node.calls) - 1 if depth is None else min(depth, len(node.calls) - 1)
    return node.calls[i]


def _in_region(module: str, prefix: str | None) -> bool:
    return prefix is None or module == prefix or module.startswith(prefix + ".")


def _ops_summary(ops: Iterable[str], limit: int = 4) -> str:
    counts = Counter(o for o in ops if o and o != "getitem")
    items = [f"{o} ×{c}" if c > 1 else o for o, c in counts.items()]
    more = len(items) - limit
    return " · ".join(items[:limit]) + (f" · +{more}" if more > 0 else "")


def _cluster(view: _GraphView, region: list[str], depth: int | None) -> dict[str, list[str]]:
    """Region op nodes -> clusters (lists of node names), keyed by a representative."""
    by_call: dict[str, list[str]] = {}
    for n in region:
        key, mpath, _ = _call_entry(view.nodes[n], depth)
        by_call.setdefault(key + "\0" + mpath, []).append(n)
    uf = _UF()
    for nodes in by_call.values():
        members = set(nodes)
        comp = _UF()
        for n in nodes:
            comp.find(n)
            for w in view.succs[n]:
                if w in members:
                    comp.union(n, w)
        parts: dict[str, list[str]] = {}
        for n in nodes:
            parts.setdefault(comp.find(n), []).append(n)
        for part in parts.values():
            pset = set(part)
            if len(part) == 1 or _convex(pset, view):
                for n in part[1:]:
                    uf.union(part[0], n)
                continue
            # not contractible whole: merge only straight chains u -> v inside it
            for u in part:
                succ = [w for w in view.succs[u] if view.nodes[w].kind == "op" or view.nodes[w].kind == "output"]
                if len(succ) == 1 and succ[0] in pset:
                    v = succ[0]
                    pred = [p for p in view.preds[v] if view.nodes[p].kind in ("op", "input")]
                    if pred == [u]:
                        uf.union(u, v)
    out: dict[str, list[str]] = {}
    for n in region:
        out.setdefault(uf.find(n), []).append(n)
    return out


def _fold(view: _GraphView, region: list[str], clusters: dict[str, list[str]]) -> dict[str, tuple[str, int, str]]:
    """Runs of >= 4 identical consecutive indexed blocks: every node of the middle blocks
    maps to one fold id. Returns node -> (fold id, number of blocks, title)."""
    children: dict[str, dict[int, list[str]]] = {}
    for n in region:
        comps = view.nodes[n].module.split(".") if view.nodes[n].module else []
        for i, c in enumerate(comps):
            if c.isdigit():
                children.setdefault(".".join(comps[:i]), {}).setdefault(int(c), []).append(n)
    owner = {n: rep for rep, ns in clusters.items() for n in ns}
    folded: dict[str, tuple[str, int, str]] = {}
    for parent in sorted(children, key=lambda p: (p.count("."), p)):
        inst = children[parent]

        def path(i: int, parent: str = parent) -> str:
            return f"{parent}.{i}" if parent else str(i)

        def signature(i: int, inst: dict[int, list[str]] = inst) -> tuple:
            base = path(i)
            return tuple((view.nodes[n].module[len(base):], view.nodes[n].op) for n in inst[i])

        idx = sorted(inst)
        runs: list[list[int]] = []
        for i in idx:
            if any(n in folded for n in inst[i]):
                runs.append([])
                continue
            if runs and runs[-1] and runs[-1][-1] == i - 1 and signature(runs[-1][-1]) == signature(i):
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            if len(run) < 4:  # with three, the middle is one block: nothing to fold
                continue
            middle = run[1:-1]
            nodes = {n for i in middle for n in inst[i]}
            # a fold must not cut a drawn node in two, nor add a cycle
            if any(not nodes.issuperset(clusters[owner[m]]) for m in nodes) or not _convex(nodes, view):
                continue
            title = f"{path(middle[0])} … {path(middle[-1])}"
            fid = f"fold:{path(middle[0])}"
            for n in nodes:
                folded[n] = (fid, len(middle), title + f"\0{path(run[0])}")
    return folded


# ---------------------------------------------------------------------------------------
# DOT text
# ---------------------------------------------------------------------------------------

_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f"]
_FIXED = "#9a9a9a"


def _palette(n: int) -> list[str]:
    """``n`` distinguishable colours: tab10 (without grey, which marks fixed tensors), then
    golden-ratio hues at alternating lightness."""
    base = [c for c in _TAB10 if c != "#7f7f7f"]
    out = base[:n]
    h = 0.11
    while len(out) < n:
        h = (h + 0.61803398875) % 1.0
        k = len(out)
        r, g, b = colorsys.hsv_to_rgb(h, 0.85 if k % 2 else 0.6, 0.75 if k % 3 else 0.55)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def _q(s: str) -> str:
    """A DOT double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _h(s: str) -> str:
    return html.escape(s, quote=True)


def _dims(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _layout_text(lay: Layout) -> str:
    text = str(lay)
    return "" if text == "whole axis" else text


def _attrs(**kw: Any) -> str:
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        if isinstance(v, _Html):
            parts.append(f"{k}=<{v.text}>")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}={_q(str(v))}")
    return "[" + ", ".join(parts) + "]"


@dataclass(frozen=True)
class _Html:
    text: str


def _pad(label: str) -> str:
    """Edge labels sit against their edge: a leading space keeps the first letter off the line."""
    return "\n".join("  " + line for line in label.split("\n"))


def _relative(path: str, region: str | None) -> str:
    """A module path as drawn inside a region: relative to it (the region itself by its last name)."""
    if region is None or not path:
        return path
    if path == region:
        return region.rsplit(".", 1)[-1]
    return path[len(region) + 1:] if path.startswith(region + ".") else path


def _strip_where(reason: str) -> str:
    return reason.split(" @ ")[0].strip()


@dataclass(frozen=True)
class Drawing:
    """A drawing of a `PermSpec`'s graph: its Graphviz DOT text and what it shows.

    Displays itself as SVG in Jupyter (when Graphviz is installed).

    Attributes:
        source: the DOT text.
        groups: every group of the spec, as listed in the legend.
        num_nodes: nodes drawn (without the legend).
        num_edges: edges drawn.
        module: the region drawn (``None``: the whole model).
    """

    source: str
    groups: tuple[str, ...]
    num_nodes: int
    num_edges: int
    module: str | None = None

    def pipe(self, fmt: str) -> bytes:
        """Render with Graphviz's ``dot``.

        Args:
            fmt: ``"svg"``, ``"png"`` or ``"pdf"``.

        Returns:
            The rendered file's bytes.

        Raises:
            DrawError: ``fmt`` is not one of those, Graphviz is not installed, or ``dot`` failed.
        """
        fmt = _check_format(fmt, renderable=True)
        missing = graphviz_missing()
        if missing:
            raise DrawError(f"cannot render {fmt}: {missing}; {INSTALL_HINT} (or save as .dot)")
        import graphviz

        try:
            return graphviz.Source(self.source).pipe(format=fmt, engine="dot")
        except graphviz.ExecutableNotFound as exc:  # pragma: no cover - dot vanished between the check and the call
            raise DrawError(f"cannot render {fmt}: Graphviz's dot was not found; {INSTALL_HINT}") from exc
        except graphviz.CalledProcessError as exc:
            err = (exc.stderr or b"").decode(errors="replace").strip()[-600:]
            raise DrawError(f"Graphviz's dot failed on this drawing: {err}") from exc

    def svg(self) -> str:
        """The drawing as SVG text (hover an edge or node for its tooltip).

        Raises:
            DrawError: Graphviz is not installed, or ``dot`` failed.
        """
        return self.pipe("svg").decode()

    def png(self) -> bytes:
        """The drawing as PNG bytes.

        Raises:
            DrawError: Graphviz is not installed, or ``dot`` failed.
        """
        return self.pipe("png")

    def save(self, path: str | Path) -> Path:
        """Write the drawing; the format follows the suffix (``.svg``, ``.png``, ``.pdf``, ``.dot``).

        Args:
            path: the file to write.

        Returns:
            The path written: ``path`` itself, or ``path`` with the suffix ``.dot`` when an
            image was asked for and Graphviz is missing (a `GraphvizMissingWarning` says how
            to install it).

        Raises:
            DrawError: the suffix is not a supported format, or ``dot`` failed.
        """
        path = Path(path)
        fmt = check_path(path)
        if fmt in ("dot", "gv"):
            path.write_text(self.source)
            return path
        missing = graphviz_missing()
        if missing:
            dot = path.with_suffix(".dot")
            dot.write_text(self.source)
            warnings.warn(
                f"wrote {dot} instead of {path}: {missing}. To render images, {INSTALL_HINT}; "
                f"or render this file yourself: dot -T{fmt} {dot} -o {path}",
                GraphvizMissingWarning,
                stacklevel=2,
            )
            return dot
        path.write_bytes(self.pipe(fmt))
        return path

    def _repr_svg_(self) -> str | None:
        """Jupyter's rich display: the SVG, or None (plain repr) without Graphviz."""
        if graphviz_missing():
            return None
        return self.svg()

    def __repr__(self) -> str:
        where = f" of {self.module!r}" if self.module else ""
        return f"<Drawing{where}: {self.num_nodes} nodes, {self.num_edges} edges, {len(self.groups)} groups>"


def graphviz_missing() -> str | None:
    """Why images cannot be rendered here (None when Graphviz and its Python package are installed).

    Returns:
        None, or a sentence naming what is missing.
    """
    if importlib.util.find_spec("graphviz") is None:
        return "the Python package graphviz is not installed"
    if shutil.which("dot") is None:
        return "Graphviz's dot binary is not on PATH"
    return None


def check_path(path: str | Path) -> str:
    """The drawing format a file name asks for (its suffix), checked before any work is done.

    Args:
        path: a file name such as ``"model.svg"``.

    Returns:
        ``"svg"``, ``"png"``, ``"pdf"``, ``"dot"`` or ``"gv"``.

    Raises:
        DrawError: the suffix is none of these.

    Examples:
        >>> check_path("resnet.PNG")
        'png'
    """
    return _check_format(Path(path).suffix.lstrip(".") or "(none)", renderable=False, path=Path(path))


def _check_format(fmt: str, *, renderable: bool, path: Path | None = None) -> str:
    fmt = fmt.lower()
    allowed = [f for f in FORMATS if not (renderable and f in ("dot", "gv"))]
    if fmt not in allowed:
        where = f" for {path}" if path is not None else ""
        raise DrawError(
            f"unknown drawing format {fmt!r}{where}: use one of "
            + ", ".join("." + f if path is not None else f for f in allowed)
        )
    return fmt


def draw(
    spec: PermSpec,
    path: str | Path | None = None,
    *,
    module: str | None = None,
    depth: int | None = None,
    fold: bool = False,
    rankdir: str = "TB",
    legend: bool = True,
    max_groups_per_edge: int = 3,
    fanout: int = 4,
) -> Drawing:
    """Draw the model's graph, each tensor coloured and labelled by the group that permutes it.

    Args:
        spec: a `PermSpec` from `permgraph.infer` (it carries the graph).
        path: if given, also save there; the suffix picks the format (``.svg``, ``.png``,
            ``.pdf``, ``.dot``). Without Graphviz an image path gets a ``.dot`` file instead
            (see `Drawing.save`).
        module: draw only this module and everything under it (a path such as ``"layer1"``
            or ``"transformer.h.0.attn"``); tensors from and to the rest show as grey stubs.
        depth: collapse every module deeper than this many path components into one node
            (``depth=2``: ``layer1.0``); ``None`` draws each leaf-module call.
        fold: draw a run of four or more identical consecutive indexed blocks (``h.0`` ...
            ``h.23``) as its first block, one node for the middle blocks and its last block.
        rankdir: Graphviz layout direction, ``"TB"`` (top to bottom) or ``"LR"``.
        legend: add the legend of groups.
        max_groups_per_edge: at most this many groups are named in an edge label (all are
            in its tooltip).
        fanout: a tensor used by more nodes than this is drawn as a short stub at each user
            (``⋯ source``) instead of an edge from its source: such edges cross the whole
            layout (an attention mask feeding every layer) and make Graphviz slow.

    Returns:
        The `Drawing` (its DOT text in ``.source``; ``.svg()``, ``.png()``, ``.save()``).

    Raises:
        DrawError: the spec has no graph, ``module`` matches no module, ``depth`` or
            ``rankdir`` is invalid, or ``path`` has an unknown suffix.

    Examples:
        >>> import torch, permgraph
        >>> from permgraph.draw import draw
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> d = draw(permgraph.infer(mlp, torch.randn(3, 4)))
        >>> d
        <Drawing: 5 nodes, 4 edges, 1 groups>
        >>> print(d.source.splitlines()[0])
        digraph permgraph {
    """
    if path is not None:
        check_path(path)
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise DrawError(f"depth must be a positive integer (1: top-level modules), got {depth!r}")
    if rankdir not in ("TB", "LR", "BT", "RL"):
        raise DrawError(f"rankdir must be 'TB', 'LR', 'BT' or 'RL', got {rankdir!r}")
    if module is not None:
        module = module.strip().strip(".")
    view = _GraphView(spec)
    ops = [n for n, x in view.nodes.items() if x.kind == "op" and x.tensors]
    region = [n for n in ops if _in_region(view.nodes[n].module, module or None)]
    if module and not region:
        import difflib

        paths = sorted({view.nodes[n].module for n in ops if view.nodes[n].module})
        tops = sorted({p.split(".")[0] for p in paths})
        close = difflib.get_close_matches(module, paths, n=5, cutoff=0.5)
        raise DrawError(
            f"no op of the traced graph runs in module {module!r}"
            + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
            + f" Top-level modules: {', '.join(tops[:20]) or '(none)'}"
            + " (module paths are state_dict prefixes, such as 'layer1.0' or 'transformer.h.3')"
        )
    return _render(spec, view, region, module or None, depth, fold, rankdir, legend, max_groups_per_edge, fanout, path)


def _build_clusters(view: _GraphView, region: list[str], depth: int | None,
                    fold: bool) -> tuple[dict[str, _Cluster], dict[str, str]]:
    """The drawn nodes of a region, and the drawn node of each fx node."""
    parents = {c[0] for x in view.nodes.values() for c in x.calls[:-1]}
    clusters_raw = _cluster(view, region, depth)
    folded = _fold(view, region, clusters_raw) if fold else {}

    clusters: dict[str, _Cluster] = {}
    owner: dict[str, str] = {}  # fx node -> cluster id
    for rep, nodes in clusters_raw.items():
        if nodes[0] in folded:
            fid, count, title = folded[nodes[0]]
            first = title.split("\0")[1]
            c = clusters.setdefault(fid, _Cluster(fid, "fold", title.split("\0")[0], f"{count} blocks like {first}",
                                                  module=title.split("\0")[0]))
            c.members += nodes
            for n in nodes:
                owner[n] = fid
            continue
        key, mpath, cls = _call_entry(view.nodes[nodes[0]], depth)
        same = all(_call_entry(view.nodes[n], depth)[0] == key for n in nodes)
        collapsed = depth is not None and any(len(view.nodes[n].calls) - 1 > depth for n in nodes)
        opsum = _ops_summary(view.nodes[n].op for n in nodes)
        if same and mpath and (key not in parents or collapsed):
            c = _Cluster(rep, "module", mpath, cls or opsum)
        elif same and mpath:
            c = _Cluster(rep, "ops", mpath, opsum or view.nodes[nodes[0]].op)
        else:  # functional ops of the root module (or of several modules)
            c = _Cluster(rep, "ops", opsum or view.nodes[nodes[0]].op, "", module=mpath if same else "")
        c.members = list(nodes)
        c.module = c.module or (c.title if c.kind != "ops" or c.subtitle else "")
        clusters[rep] = c
        for n in nodes:
            owner[n] = rep
    return clusters, owner


def _collect_edges(view: _GraphView, region: list[str], owner: dict[str, str]):
    """Edges ``(source node, target node, fx tensor)`` between drawn nodes, and the input,
    output and outside-the-region nodes they need."""
    edges: dict[tuple[str, str, str], None] = {}
    outside: dict[str, _Cluster] = {}
    outputs: dict[str, _Cluster] = {}
    region_set = set(region)
    for n in region:
        for p in view.preds[n]:
            px = view.nodes[p]
            if p in owner:
                if owner[p] != owner[n]:
                    edges[(owner[p], owner[n], p)] = None
            elif px.kind == "input":
                edges[(f"in:{p}", owner[n], p)] = None
            elif px.kind == "op" and px.tensors:
                oid = f"out:{px.module or px.op}"
                outside.setdefault(oid, _Cluster(oid, "outside", px.module or px.op, px.op))
                edges[(oid, owner[n], p)] = None
        for w in view.succs[n]:
            wx = view.nodes[w]
            if wx.kind == "output":
                if n in view.user_outputs:
                    oid = f"y:{n}"
                    outputs.setdefault(oid, _Cluster(oid, "output", "output", ""))
                    edges[(owner[n], oid, n)] = None
            elif w not in region_set and wx.kind == "op" and wx.tensors:
                oid = f"out:{wx.module or wx.op}"
                outside.setdefault(oid, _Cluster(oid, "outside", wx.module or wx.op, wx.op))
                edges[(owner[n], oid, n)] = None
    return edges, outside, outputs


def _render(spec: PermSpec, view: _GraphView, region: list[str], module: str | None, depth: int | None,
            fold: bool, rankdir: str, legend: bool, max_groups: int, fanout: int, path: str | Path | None) -> Drawing:
    groups = {g.name: g for g in spec.groups}
    colours = dict(zip(groups, _palette(len(groups))))
    clusters, owner = _build_clusters(view, region, depth, fold)
    edges, outside, outputs = _collect_edges(view, region, owner)

    inputs = [n for n, x in view.nodes.items() if x.kind == "input"]
    lines: list[str] = []
    ids: dict[str, str] = {}

    def nid(cid: str) -> str:
        if cid not in ids:
            ids[cid] = f"n{len(ids)}"
        return ids[cid]

    used_inputs = [i for i in inputs if any(e[0] == f"in:{i}" for e in edges)]

    # a tensor used by many nodes (an attention mask, rotary tables) would cross the whole
    # layout once per use, and such long edges cost Graphviz minutes: draw a stub at each user
    users: dict[tuple[str, str], list[str]] = {}
    for src, dst, tensor in edges:
        users.setdefault((src, tensor), []).append(dst)
    stubs: dict[str, tuple[str, str, int]] = {}  # stub id -> (source cluster, tensor, users)
    fans: dict[str, tuple[str, int]] = {}  # the source's end: one short edge to "-> N users"
    for (src, tensor), dsts in users.items():
        if len(dsts) > fanout:
            fans[f"fan:{tensor}"] = (src, len(dsts))
            edges[(src, f"fan:{tensor}", tensor)] = None
            for dst in dsts:
                sid = f"stub:{tensor}:{dst}"
                stubs[sid] = (src, tensor, len(dsts))
                del edges[(src, dst, tensor)]
                edges[(sid, dst, tensor)] = None

    boundary: dict[str, set[str]] = {}
    edge_lines: list[str] = []
    drawn_groups: set[str] = set()
    for src, dst, tensor in edges:
        x = view.nodes[tensor]
        gs = [g for t in x.tensors for g in t.groups]
        gs = list(dict.fromkeys(gs))
        boundary.setdefault(stubs[src][0] if src in stubs else src, set()).update(gs)
        boundary.setdefault(dst, set()).update(gs)
        drawn_groups.update(gs)
        shapes = ", ".join(_dims(t.shape) for t in x.tensors)
        tip = [f"{tensor} ({x.op or x.kind}): {shapes}"]
        if gs:
            where: dict[str, list[str]] = {g: [] for g in gs}  # group -> its layouts in this tensor
            for t in x.tensors:
                for d, pairs in enumerate(t.dims):
                    for g, lay in pairs:
                        lt = _layout_text(lay)
                        size = groups[g].size if g in groups else "?"
                        if lt and lt not in where[g]:
                            where[g].append(lt)
                        tip.append(f"dim {d} ({t.shape[d]}): group {g}, {size} units" + (f", {lt}" if lt else ""))
            label_parts = [f"{g} ({groups[g].size if g in groups else '?'}"
                           + (": " + "; ".join(where[g][:2]) if where[g] else "")
                           + ("; ..." if len(where[g]) > 2 else "") + ")" for g in gs]
            more = len(label_parts) - max_groups
            label = "\n".join(label_parts[:max_groups]) + (f"\n+{more} more" if more > 0 else "")
            colour = ":".join(colours.get(g, _FIXED) for g in gs[:max_groups])
            edge_lines.append(f"  {nid(src)} -> {nid(dst)} " + _attrs(
                label=_pad(label), color=colour, fontcolor=colours.get(gs[0], "#000000"), penwidth=2.2,
                tooltip="\n".join(tip), pg_kind="grouped", pg_groups=json.dumps(gs), pg_tensor=tensor))
        else:
            found: list[tuple[int, str]] = []
            for t, rs in zip(x.tensors, view.reasons(tensor) or [[None] * len(t.shape) for t in x.tensors]):
                for d, r in enumerate(rs):
                    if d < len(t.shape) and t.shape[d] > 1:
                        tip.append(f"dim {d} ({t.shape[d]}): " + (
                            f"fixed: {r}" if r else _UNTRACKED if r == "" else "free, but no weight is permuted with it"))
                        if r:
                            found.append((t.shape[d], _strip_where(r)))
            # the label names the reason of the widest axis (the features, as a rule); all are in the tooltip
            found.sort(key=lambda f: -f[0])
            reasons = list(dict.fromkeys(r for _, r in found))
            if reasons:
                short = reasons[0] if len(reasons[0]) <= 56 else reasons[0][:54] + "…"
                label = f"fixed: {short}" + (f" (+{len(reasons) - 1})" if len(reasons) > 1 else "")
                edge_lines.append(f"  {nid(src)} -> {nid(dst)} " + _attrs(
                    label=_pad(label), color=_FIXED, fontcolor="#666666", style="dashed", penwidth=1.2,
                    tooltip="\n".join(tip), pg_kind="blocked", pg_groups="[]", pg_reasons=json.dumps(reasons),
                    pg_tensor=tensor))
            else:
                edge_lines.append(f"  {nid(src)} -> {nid(dst)} " + _attrs(
                    color="#c8c8c8", penwidth=1.0, tooltip="\n".join(tip), pg_kind="free", pg_groups="[]",
                    pg_tensor=tensor))

    # -- nodes
    node_lines: list[str] = []
    inside_all: set[str] = set()
    in_folds: set[str] = set()
    connected = {stubs[e][0] if e in stubs else e for src, dst, _ in edges for e in (src, dst)}
    for cid, c in clusters.items():
        if edges and cid not in connected:
            continue  # dead code (a value nothing uses): nothing to see
        keys: list[str] = []
        inner: list[str] = []
        opcount = Counter(view.nodes[n].op for n in c.members)
        for n in c.members:
            for t in view.nodes[n].tensors:
                inner += t.groups
            for p in view.preds[n]:
                px = view.nodes[p]
                if px.kind == "parameter":
                    keys += [k for k in px.keys if k not in keys]
                    for t in px.tensors:
                        inner += t.groups
        inside = [g for g in dict.fromkeys(inner) if g not in boundary.get(cid, set())]
        inside_all.update(inside)
        if c.kind == "fold":
            in_folds.update(inside)
        title = _relative(c.title, module) if c.kind != "ops" or c.subtitle else c.title
        rows = [f"<B>{_h(title)}</B>"]
        if c.subtitle:
            rows.append(f'<FONT POINT-SIZE="9" COLOR="#555555">{_h(c.subtitle)}</FONT>')
        if inside:
            shown = [f'<FONT COLOR="{colours.get(g, _FIXED)}">{_h(g)} ({groups[g].size if g in groups else "?"})</FONT>'
                     for g in inside[:3]]
            more = f" +{len(inside) - 3}" if len(inside) > 3 else ""
            rows.append('<FONT POINT-SIZE="8">inside: ' + ", ".join(shown) + more + "</FONT>")
        tip = [title + (f" ({c.subtitle})" if c.subtitle else ""),
               "ops: " + ", ".join(f"{o} x{k}" if k > 1 else o for o, k in opcount.items() if o)]
        tip += [f"{k} {_dims(spec.shapes.get(k, ()))}" for k in keys[:12]]
        if len(keys) > 12:
            tip.append(f"+{len(keys) - 12} more tensors")
        if inside:
            tip.append("groups inside: " + ", ".join(inside))
        style = {"module": ("box", "rounded,filled", "#f4f4f4"), "ops": ("box", "rounded,filled", "#ffffff"),
                 "fold": ("box3d", "filled", "#eaeaf4")}[c.kind]
        node_lines.append(f"  {nid(cid)} " + _attrs(
            label=_Html("<BR/>".join(rows)), shape=style[0], style=style[1], fillcolor=style[2],
            tooltip="\n".join(tip), pg_kind=c.kind, pg_module=c.module, pg_params=json.dumps(keys),
            pg_inside=json.dumps(inside)))
    for i in used_inputs:
        x = view.nodes[i]
        shapes = ", ".join(_dims(t.shape) for t in x.tensors)
        node_lines.append(f"  {nid('in:' + i)} " + _attrs(
            label=_Html(f"<B>{_h('input' if i == 'input' else 'input ' + i)}</B><BR/>{_h(shapes)}"), shape="oval", style="filled",
            fillcolor="#dff0d8", tooltip=f"model input {i}: {shapes}", pg_kind="input"))
    for oid in outputs:
        x = view.nodes[oid[2:]]
        shapes = ", ".join(_dims(t.shape) for t in x.tensors)
        node_lines.append(f"  {nid(oid)} " + _attrs(
            label=_Html(f"<B>output</B><BR/>{_h(shapes)}"), shape="oval", peripheries=2, style="filled", fillcolor="#f2dede",
            tooltip=f"model output {oid[2:]}: {shapes}", pg_kind="output"))
    titles = {cid: c.title for cid, c in clusters.items()} | {f"in:{i}": f"input {i}" for i in inputs}
    for fid, (src, count) in fans.items():
        node_lines.append(f"  {nid(fid)} " + _attrs(
            label=f"→ {count} users", shape="plaintext", fontcolor="#888888", fontsize=8,
            tooltip=f"{fid[4:]} is used by {count} nodes: each shows it as a stub (⋯ {titles.get(src, src)})",
            pg_kind="fan"))
    for sid, (src, tensor, count) in stubs.items():
        node_lines.append(f"  {nid(sid)} " + _attrs(
            label=f"⋯ {titles.get(src, src)}", shape="plaintext", fontcolor="#888888", fontsize=8,
            tooltip=f"{tensor} from {titles.get(src, src)}, used by {count} nodes (drawn as stubs)", pg_kind="stub"))
    for oid, c in outside.items():
        node_lines.append(f"  {nid(oid)} " + _attrs(
            label=f"⋯ {c.title}", shape="plaintext", fontcolor="#888888",
            tooltip=f"outside {module}: {c.title} ({c.subtitle})", pg_kind="outside"))

    # a region's legend lists the groups it shows; the whole model's lists every group
    listed = [g for g in groups if module is None or g in drawn_groups or g in inside_all]
    lines.append("digraph permgraph {")
    title = f"{len(spec.groups)} groups, {spec.num_units} units" + (f" (region {module})" if module else "")
    lines.append("  " + "graph " + _attrs(rankdir=rankdir, fontname="Helvetica", fontsize=10, nodesep=0.3,
                                          ranksep=0.35, tooltip=title, newrank="true"))
    lines.append("  node " + _attrs(fontname="Helvetica", fontsize=10, color="#777777", margin="0.08,0.03", height=0.3))
    lines.append("  edge " + _attrs(fontname="Helvetica", fontsize=8, arrowsize=0.6))
    lines += node_lines
    lines += edge_lines
    if legend:
        # the legend is the graph's label: it takes no rank, so it stretches no row of the layout
        lines.append("  graph " + _attrs(label=_Html(_legend_html(spec, listed, colours, drawn_groups, inside_all, in_folds, module, view.unused)),
                                         labelloc="t", labeljust="l", pg_legend=json.dumps(listed)))
    lines.append("}")
    drawing = Drawing("\n".join(lines) + "\n", tuple(listed), len(node_lines), len(edge_lines), module)
    if path is not None:
        drawing.save(path)
    return drawing


def _legend_html(spec: PermSpec, listed: list[str], colours: dict[str, str], drawn: set[str], inside: set[str],
                 in_folds: set[str], module: str | None, unused: set[str]) -> str:
    head = f"{len(spec.groups)} groups, {spec.num_units} permutable units"
    if module is not None:
        head = f"{module}: {len(listed)} of the model's {len(spec.groups)} groups"
    rows = [f'<TR><TD COLSPAN="4" ALIGN="LEFT"><B>{_h(head)}</B></TD></TR>']
    if listed:
        rows.append('<TR><TD></TD><TD ALIGN="LEFT"><I>group</I></TD><TD><I>units</I></TD><TD ALIGN="LEFT"><I>tensors</I></TD></TR>')
    shown = set(listed)
    for g in spec.groups:
        if g.name not in shown:
            continue
        where = ("" if g.name in drawn else " (in folded blocks)" if g.name in in_folds
                 else " (inside a node)" if g.name in inside
                 else " (its tensors are unused by the forward)" if all(m.key in unused for m in g.members)
                 else " (not drawn)")
        rows.append(
            f'<TR><TD BGCOLOR="{colours[g.name]}" WIDTH="18"> </TD><TD ALIGN="LEFT">{_h(g.name)}{_h(where)}</TD>'
            f'<TD ALIGN="RIGHT">{g.size}</TD><TD ALIGN="RIGHT">{len(g.members)}</TD></TR>'
        )
    rows.append('<TR><TD><FONT COLOR="#9a9a9a">- - -</FONT></TD><TD COLSPAN="3" ALIGN="LEFT">fixed (dashed): hover for the reason</TD></TR>')
    if spec.unsupported:
        rows.append(f'<TR><TD COLSPAN="4" ALIGN="LEFT"><FONT COLOR="#b00000">{len(spec.unsupported)} op(s) without a rule '
                    "were blocked (spec.unsupported)</FONT></TD></TR>")
    return '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">' + "".join(rows) + "</TABLE>"
