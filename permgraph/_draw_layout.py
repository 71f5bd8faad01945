"""Clustering for `permgraph.draw`: traced nodes -> drawn nodes (one per leaf-module call or
cluster of functional ops, folded runs of identical blocks), and the edges between them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from permgraph._draw_view import GraphView, Node

__all__ = ["Cluster", "call_entry", "in_region", "build_clusters", "collect_edges"]


@dataclass
class Cluster:
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


def _convex(members: set[str], view: GraphView) -> bool:
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


def call_entry(node: Node, depth: int | None) -> tuple[str, str, str]:
    if not node.calls:
        return ("", node.module, "")
    i = len(node.calls) - 1 if depth is None else min(depth, len(node.calls) - 1)
    return node.calls[i]


def in_region(module: str, prefix: str | None) -> bool:
    return prefix is None or module == prefix or module.startswith(prefix + ".")


def _ops_summary(ops: Iterable[str], limit: int = 4) -> str:
    counts = Counter(o for o in ops if o and o != "getitem")
    items = [f"{o} ×{c}" if c > 1 else o for o, c in counts.items()]
    more = len(items) - limit
    return " · ".join(items[:limit]) + (f" · +{more}" if more > 0 else "")


def _cluster(view: GraphView, region: list[str], depth: int | None) -> dict[str, list[str]]:
    """Region op nodes -> clusters (lists of node names), keyed by a representative."""
    by_call: dict[str, list[str]] = {}
    for n in region:
        key, mpath, _ = call_entry(view.nodes[n], depth)
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


def _fold(view: GraphView, region: list[str], clusters: dict[str, list[str]]) -> dict[str, tuple[str, int, str]]:
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


def build_clusters(view: GraphView, region: list[str], depth: int | None,
                    fold: bool) -> tuple[dict[str, Cluster], dict[str, str]]:
    """The drawn nodes of a region, and the drawn node of each fx node."""
    parents = {c[0] for x in view.nodes.values() for c in x.calls[:-1]}
    clusters_raw = _cluster(view, region, depth)
    folded = _fold(view, region, clusters_raw) if fold else {}

    clusters: dict[str, Cluster] = {}
    owner: dict[str, str] = {}  # fx node -> cluster id
    for rep, nodes in clusters_raw.items():
        if nodes[0] in folded:
            fid, count, title = folded[nodes[0]]
            first = title.split("\0")[1]
            c = clusters.setdefault(fid, Cluster(fid, "fold", title.split("\0")[0], f"{count} blocks like {first}",
                                                  module=title.split("\0")[0]))
            c.members += nodes
            for n in nodes:
                owner[n] = fid
            continue
        key, mpath, cls = call_entry(view.nodes[nodes[0]], depth)
        same = all(call_entry(view.nodes[n], depth)[0] == key for n in nodes)
        collapsed = depth is not None and any(len(view.nodes[n].calls) - 1 > depth for n in nodes)
        opsum = _ops_summary(view.nodes[n].op for n in nodes)
        if same and mpath and (key not in parents or collapsed):
            c = Cluster(rep, "module", mpath, cls or opsum)
        elif same and mpath:
            c = Cluster(rep, "ops", mpath, opsum or view.nodes[nodes[0]].op)
        else:  # functional ops of the root module (or of several modules)
            c = Cluster(rep, "ops", opsum or view.nodes[nodes[0]].op, "", module=mpath if same else "")
        c.members = list(nodes)
        c.module = c.module or (c.title if c.kind != "ops" or c.subtitle else "")
        clusters[rep] = c
        for n in nodes:
            owner[n] = rep
    return clusters, owner


def collect_edges(view: GraphView, region: list[str], owner: dict[str, str]):
    """Edges ``(source node, target node, fx tensor)`` between drawn nodes, and the input,
    output and outside-the-region nodes they need."""
    edges: dict[tuple[str, str, str], None] = {}
    outside: dict[str, Cluster] = {}
    outputs: dict[str, Cluster] = {}
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
                outside.setdefault(oid, Cluster(oid, "outside", px.module or px.op, px.op))
                edges[(oid, owner[n], p)] = None
        for w in view.succs[n]:
            wx = view.nodes[w]
            if wx.kind == "output":
                if n in view.user_outputs:
                    oid = f"y:{n}"
                    outputs.setdefault(oid, Cluster(oid, "output", "output", ""))
                    edges[(owner[n], oid, n)] = None
            elif w not in region_set and wx.kind == "op" and wx.tensors:
                oid = f"out:{wx.module or wx.op}"
                outside.setdefault(oid, Cluster(oid, "outside", wx.module or wx.op, wx.op))
                edges[(owner[n], oid, n)] = None
    return edges, outside, outputs

