"""The DOT text of `permgraph.draw`: drawn nodes and edges coloured and labelled by group,
tooltips with the reasons fixed axes are fixed, and the legend."""

from __future__ import annotations

import colorsys
import html
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from permgraph._draw_layout import build_clusters, collect_edges
from permgraph._draw_view import UNTRACKED, GraphView
from permgraph.spec import Layout, PermSpec

__all__ = ["render_dot"]


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


def render_dot(spec: PermSpec, view: GraphView, region: list[str], module: str | None, depth: int | None,
               fold: bool, rankdir: str, legend: bool, max_groups: int, fanout: int
               ) -> tuple[str, tuple[str, ...], int, int]:
    """The DOT text of a region, the groups its legend lists, and the numbers of nodes and edges drawn."""
    groups = {g.name: g for g in spec.groups}
    colours = dict(zip(groups, _palette(len(groups))))
    clusters, owner = build_clusters(view, region, depth, fold)
    edges, outside, outputs = collect_edges(view, region, owner)

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
                            f"fixed: {r}" if r else UNTRACKED if r == "" else "free, but no weight is permuted with it"))
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
    return "\n".join(lines) + "\n", tuple(listed), len(node_lines), len(edge_lines)


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

