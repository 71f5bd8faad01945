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

import importlib.util
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from permgraph._draw_dot import render_dot
from permgraph._draw_layout import in_region
from permgraph._draw_view import GraphView
from permgraph.errors import DrawError, GraphvizMissingWarning
from permgraph.spec import PermSpec

__all__ = ["draw", "Drawing", "DrawError", "GraphvizMissingWarning", "FORMATS", "graphviz_missing", "check_path"]

FORMATS = ("svg", "png", "pdf", "dot", "gv")
INSTALL_HINT = (
    "install Graphviz's `dot` binary (apt-get install graphviz, brew install graphviz or "
    "conda install -c conda-forge graphviz) and the Python package (pip install \"permgraph[draw]\")"
)


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
    view = GraphView(spec)
    ops = [n for n, x in view.nodes.items() if x.kind == "op" and x.tensors]
    region = [n for n in ops if in_region(view.nodes[n].module, module or None)]
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
    source, listed, num_nodes, num_edges = render_dot(spec, view, region, module or None, depth, fold, rankdir, legend,
                                                      max_groups_per_edge, fanout)
    drawing = Drawing(source, listed, num_nodes, num_edges, module or None)
    if path is not None:
        drawing.save(path)
    return drawing
