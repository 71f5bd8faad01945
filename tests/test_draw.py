"""`permgraph.draw`: the drawing's content (read back from its DOT text), the ``.dot``
fallback without Graphviz, bad input, and rendering where Graphviz's ``dot`` is installed."""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings

import pytest
import torch
from torch import nn

import permgraph
from permgraph.draw import DrawError, Drawing, GraphvizMissingWarning, check_path, draw, graphviz_missing
from permgraph.testing import ZOO

pytestmark = pytest.mark.usefixtures("one_thread")

needs_dot = pytest.mark.skipif(graphviz_missing() is not None, reason=f"rendering needs Graphviz: {graphviz_missing()}")

# -- reading the DOT text back ------------------------------------------------------------

_ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|<.*?>(?=, \w+=|$)|[-\d.]+)')
_NODE = re.compile(r"^  (n\d+) \[(.*)\]$")
_EDGE = re.compile(r"^  (n\d+) -> (n\d+) \[(.*)\]$")


def _value(raw: str) -> str:
    if raw.startswith('"'):
        return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), raw[1:-1])
    return raw


def _attrs(text: str) -> dict[str, str]:
    return {k: _value(v) for k, v in _ATTR.findall(text)}


def parse(d: Drawing) -> tuple[dict[str, dict[str, str]], list[tuple[str, str, dict[str, str]]], dict[str, str]]:
    """Nodes (id -> attrs), edges (src, dst, attrs) and the graph's attributes."""
    nodes, edges, graph = {}, [], {}
    for line in d.source.splitlines():
        if m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2), _attrs(m.group(3))))
        elif m := _NODE.match(line):
            nodes[m.group(1)] = _attrs(m.group(2))
        elif line.startswith("  graph ["):
            graph.update(_attrs(line[len("  graph ["):-1]))
    return nodes, edges, graph


def edge_groups(e: dict[str, str]) -> list[str]:
    return json.loads(e["pg_groups"])


# -- models ---------------------------------------------------------------------------------


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.conv2(torch.relu(self.conv1(h)))
        return self.head(torch.flatten(h, 1))


class NoRule(nn.Module):
    """An op without a rule (kthvalue) in the middle: its axes are blocked and reported."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.kthvalue(h, 2, dim=0, keepdim=True).values + h)


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    """Six identical residual blocks between an input and an output projection."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*[Block() for _ in range(n)])
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.g(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return permgraph.infer(TinyResNet(), torch.randn(2, 3, 4, 4))


def _spec(name: str) -> permgraph.PermSpec:
    e = ZOO[name]
    return permgraph.infer(e.build().eval(), e.inputs())


# -- content ----------------------------------------------------------------------------------


def check_content(spec: permgraph.PermSpec, d: Drawing) -> None:
    """Every group is in the legend; every member's tensor shows its group on an edge at the
    node that holds the member, or inside that node; grouped edges name only real groups."""
    nodes, edges, graph = parse(d)
    names = spec.names
    assert json.loads(graph["pg_legend"]) == names
    legend = graph["label"]
    for name in names:
        assert f">{name}<" in legend or f">{name} (" in legend, name
    incident: dict[str, set[str]] = {n: set() for n in nodes}
    for src, dst, e in edges:
        gs = edge_groups(e)
        assert set(gs) <= set(names)
        if gs:
            assert e["pg_kind"] == "grouped" and "dashed" not in e.get("style", "")
            for g in gs[:3]:
                assert g in e["label"]
        incident[src].update(gs)
        incident[dst].update(gs)
    holders: dict[str, list[str]] = {}
    for nid, a in nodes.items():
        for k in json.loads(a.get("pg_params", "[]")):
            holders.setdefault(k, []).append(nid)
    unused = {k for n, a in spec.analysis.graph.nodes(data=True) if a["kind"] == "parameter" and not spec.analysis.graph.out_degree(n)
              for k in a["keys"]}
    for g in spec.groups:
        if all(m.key in unused for m in g.members):  # no op reads it: nothing to draw but the legend row
            assert f">{g.name} (its tensors are unused by the forward)<" in legend
            continue
        for m in g.members:
            if m.key in unused:
                continue
            assert m.key in holders, f"{m.key} is in no drawn node"
            shown = [n for n in holders[m.key] if g.name in incident[n] or g.name in json.loads(nodes[n]["pg_inside"])]
            assert shown, f"group {g.name}: member {m} is not shown at {holders[m.key]}"


def test_tiny_resnet_edges_carry_their_groups(tiny):
    d = draw(tiny)
    check_content(tiny, d)
    nodes, edges, _ = parse(d)
    title = {n: a.get("pg_module") or re.sub(r"<[^>]*>", "", a["label"][1:-1]) for n, a in nodes.items()}
    by = {(title[s], title[t]): e for s, t, e in edges}
    assert edge_groups(by[("stem", "bn")]) == ["stem"]
    assert edge_groups(by[("conv1", "relu")]) == ["conv1"]
    (add,) = [t for t in title.values() if t.startswith("add")]  # add, then flatten (or view)
    assert edge_groups(by[("conv2", add)]) == ["stem"]  # the residual stream
    flat = by[(add, "head")]
    assert edge_groups(flat) == ["stem"] and "blocks of 16" in flat["label"]  # flatten after the conv
    assert d.num_nodes == len(nodes) and d.num_edges == len(edges)


def test_inputs_outputs_and_blocked_edges_are_marked(tiny):
    nodes, edges, _ = parse(draw(tiny))
    kinds = {n: a["pg_kind"] for n, a in nodes.items()}
    assert sorted(kinds.values()).count("input") == 1 and sorted(kinds.values()).count("output") == 1
    (inp,) = [e for s, _, e in edges if kinds[s] == "input"]
    (out,) = [e for _, t, e in edges if kinds[t] == "output"]
    for e, reason in ((inp, "model input x"), (out, "model output")):
        assert e["pg_kind"] == "blocked" and e["style"] == "dashed" and edge_groups(e) == []
        assert reason in e["tooltip"] and e["label"].strip().startswith("fixed")
    assert "model output" in out["label"]  # the widest axis (10 logits) names the reason
    assert "2×3×4×4" in nodes[next(n for n, k in kinds.items() if k == "input")]["label"]


def test_op_without_a_rule_dashes_its_tensors_with_the_reason():
    spec = permgraph.infer(NoRule(), torch.randn(5, 4))
    assert [u.op for u in spec.unsupported] == ["aten.kthvalue.default"]
    d = draw(spec)
    nodes, edges, graph = parse(d)
    src = {n for n, a in nodes.items() if "kthvalue" in a["label"]}
    assert src
    out_edges = [e for s, _, e in edges if s in src]
    assert out_edges and all(e["pg_kind"] == "blocked" and e["style"] == "dashed" for e in out_edges)
    assert any("no rule for this op" in e["tooltip"] for e in out_edges)
    assert "without a rule" in graph["label"]  # the legend reports blocked ops


def test_reasons_that_cannot_be_read_still_draw_dashed(tiny, monkeypatch):
    import permgraph._draw_view as pd

    def broken(traced):
        raise AttributeError("_Solver has no attribute 'axis_var'")  # as if analysis changed

    monkeypatch.setattr(pd, "block_reasons", broken)
    with pytest.warns(UserWarning, match="could not read why axes are blocked.*axis_var"):
        nodes, edges, _ = parse(draw(tiny))
    kinds = {n: a["pg_kind"] for n, a in nodes.items()}
    (inp,) = [e for s, _, e in edges if kinds[s] == "input"]
    assert inp["pg_kind"] == "blocked" and "could not be read" in inp["label"]
    assert [edge_groups(e) for s, t, e in edges if nodes[s].get("pg_module") == "stem"] == [["stem"]]


@pytest.mark.parametrize("name", ["mlp", "resnet18", "gpt2"])
def test_zoo_drawings_show_every_group(name):
    spec = _spec(name)
    check_content(spec, draw(spec))


def test_a_parameter_the_forward_never_reads_is_listed_as_unused():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
            self.mask_embed = nn.Parameter(torch.zeros(5))  # read only by a training-time branch

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    spec = permgraph.infer(Unused(), torch.randn(2, 4))
    assert "mask_embed" in spec.names
    check_content(spec, draw(spec))


def test_grouped_conv_and_heads_show_layouts():
    spec = permgraph.infer(GroupedConv(), torch.randn(1, 3, 6, 6))
    d = draw(spec)
    check_content(spec, d)
    gpt = _spec("gpt2")
    labels = " ".join(e["label"] for _, _, e in parse(draw(gpt))[1] if e["pg_kind"] == "grouped")
    assert "blocks of 16" in labels and "x4 every 16" in labels  # head blocks, within-head units


def test_fold_draws_repeated_blocks_once():
    torch.manual_seed(0)
    spec = permgraph.infer(Stack(), torch.randn(3, 4))
    full, folded = draw(spec), draw(spec, fold=True)
    check_content(spec, folded)
    nodes, _, _ = parse(folded)
    (fold,) = [a for a in nodes.values() if a["pg_kind"] == "fold"]
    assert "blocks.1" in fold["label"] and "blocks.4" in fold["label"] and "4 blocks like blocks.0" in fold["label"]
    inside = set(json.loads(fold["pg_inside"]))
    assert {f"blocks.{i}.up" for i in range(1, 5)} <= inside
    assert folded.num_nodes < full.num_nodes
    titles = {a.get("pg_module") for a in nodes.values()}
    assert {"blocks.0.up", "blocks.5.up"} <= titles and "blocks.2.up" not in titles
    assert "blocks.2.up (in folded blocks)" in parse(folded)[2]["label"]


def test_fold_leaves_distinct_blocks_alone(tiny):
    assert draw(tiny, fold=True).source == draw(tiny).source
    torch.manual_seed(0)
    three = permgraph.infer(Stack(3), torch.randn(3, 4))  # a middle of one block: nothing to fold
    assert draw(three, fold=True).source == draw(three).source


def test_module_region_and_depth():
    torch.manual_seed(0)
    spec = permgraph.infer(Stack(12), torch.randn(3, 4))
    d = draw(spec, module="blocks.1")
    nodes, edges, _ = parse(d)
    inner = [a["pg_module"] for a in nodes.values() if a["pg_kind"] in ("module", "ops")]
    assert inner and all(m == "blocks.1" or m.startswith("blocks.1.") for m in inner)  # not blocks.10, blocks.11
    assert {a["pg_kind"] for a in nodes.values()} >= {"outside"}
    shown = {g for _, _, e in edges for g in edge_groups(e)} | {
        g for a in nodes.values() for g in json.loads(a.get("pg_inside", "[]"))}
    listed = json.loads(parse(d)[2]["pg_legend"])
    assert set(listed) == shown and list(d.groups) == listed  # a region's legend: the groups it shows
    assert "blocks.1.up" in listed and "blocks.3.up" not in listed and "inp" in listed  # the residual stream
    assert "blocks.1: 2 of the model" in parse(d)[2]["label"]
    shallow = parse(draw(spec, depth=1))[0]
    assert {a["pg_module"] for a in shallow.values() if a["pg_kind"] == "module"} == {"inp", "blocks", "out"}


def test_wide_fanout_becomes_stubs():
    class Fan(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))

        def forward(self, x):
            h = self.a(x)
            return sum(head(h) for head in self.heads)

    spec = permgraph.infer(Fan(), torch.randn(2, 4))
    nodes, edges, _ = parse(draw(spec))
    stubs = [n for n, a in nodes.items() if a["pg_kind"] == "stub"]
    assert len(stubs) == 6 and all("⋯ a" in nodes[s]["label"] for s in stubs)
    assert all(edge_groups(e) == ["a"] for s, _, e in edges if s in stubs)
    (fan,) = [n for n, a in nodes.items() if a["pg_kind"] == "fan"]  # the source's end
    assert "6 users" in nodes[fan]["label"] and [edge_groups(e) for _, t, e in edges if t == fan] == [["a"]]
    check_content(spec, draw(spec))
    assert len(parse(draw(spec, fanout=6))[0]) == len(nodes) - 7


# -- bad input --------------------------------------------------------------------------------


def test_unknown_format_is_a_named_error(tiny, tmp_path):
    with pytest.raises(DrawError, match=r"unknown drawing format 'jpg'.*\.svg, \.png"):
        draw(tiny, tmp_path / "x.jpg")
    with pytest.raises(DrawError, match="unknown drawing format"):
        draw(tiny).save(tmp_path / "noext")
    with pytest.raises(DrawError, match="unknown drawing format 'dot'"):
        draw(tiny).pipe("dot")
    with pytest.raises(DrawError, match=r"unknown drawing format 'bmp' for x.bmp: use one of .svg, .png, .pdf, .dot, .gv"):
        check_path("x.bmp")  # what the CLI checks before it traces
    assert check_path("a/b.SVG") == "svg"
    assert not list(tmp_path.iterdir())


def test_module_that_matches_nothing_is_a_named_error(tiny):
    with pytest.raises(DrawError, match=r"no op of the traced graph runs in module 'conv3'.*'conv1'.*Top-level modules: bn"):
        draw(tiny, module="conv3")
    with pytest.raises(permgraph.PermGraphError, match="module 'ste'"):
        draw(tiny, module="ste")  # a string prefix of a module is not a module


def test_spec_without_graph_and_bad_options(tiny):
    with pytest.raises(DrawError, match="has no graph"):
        draw(permgraph.PermSpec.from_dict(tiny.to_dict()))
    with pytest.raises(DrawError, match="depth"):
        draw(tiny, depth=0)
    with pytest.raises(DrawError, match="rankdir"):
        draw(tiny, rankdir="up")


# -- without Graphviz: the .dot fallback --------------------------------------------------------


@pytest.fixture
def no_dot(monkeypatch, tmp_path):
    """A PATH on which no ``dot`` binary is found."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("dot") is None
    return empty


def test_dot_fallback_when_the_binary_is_missing(tiny, tmp_path, no_dot):
    d = draw(tiny)
    assert graphviz_missing() is not None
    with pytest.warns(GraphvizMissingWarning, match=r"apt-get install graphviz.*permgraph\[draw\]"):
        written = d.save(tmp_path / "tiny.png")
    assert written == tmp_path / "tiny.dot" and written.read_text() == d.source
    assert not (tmp_path / "tiny.png").exists()
    with pytest.warns(GraphvizMissingWarning):
        assert draw(tiny, tmp_path / "t2.svg").module is None
    assert (tmp_path / "t2.dot").read_text() == d.source
    assert d._repr_svg_() is None  # Jupyter falls back to the text repr
    with pytest.raises(DrawError, match="cannot render svg.*not on PATH"):
        d.svg()


def test_dot_fallback_when_the_python_package_is_missing(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)  # as if not installed: import fails
    assert graphviz_missing() == "the Python package graphviz is not installed"
    with pytest.warns(GraphvizMissingWarning, match=r"wrote .*tiny.dot instead of .*tiny.svg.*dot -Tsvg"):
        written = draw(tiny).save(tmp_path / "tiny.svg")
    assert written.suffix == ".dot" and written.read_text().startswith("digraph permgraph {")


def test_dot_file_needs_no_graphviz(tiny, tmp_path, no_dot):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = draw(tiny, tmp_path / "t.dot").save(tmp_path / "t.gv")
    assert written.read_text().startswith("digraph permgraph {")
    assert (tmp_path / "t.dot").read_text() == written.read_text()


# -- rendering (needs Graphviz's dot) -----------------------------------------------------------


@needs_dot
def test_renders_svg_and_png(tiny, tmp_path):
    d = draw(tiny)
    svg = d.svg()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "model input x" in svg  # the blocked edge's tooltip survives into the SVG
    assert "stem (8)" in svg and "conv1 (16)" in svg
    assert d._repr_svg_() == svg
    png = draw(tiny, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.save(tmp_path / "t.svg").read_text().count("<svg") == 1


@needs_dot
def test_every_zoo_dot_text_is_valid_for_graphviz(tiny):
    spec = _spec("gpt2")
    for d in (draw(spec), draw(spec, fold=True), draw(spec, module="transformer.h.0"), draw(tiny, rankdir="LR")):
        assert "<svg" in d.svg()


def test_cli_inspect_draws_one_region(tmp_path, capsys) -> None:
    pytest.importorskip("torchvision")
    from permgraph.cli import main

    out = tmp_path / "r.dot"
    assert main(["inspect", "torchvision.models:resnet18", "--input-shape", "1,3,32,32", "--draw", str(out),
                 "--module", "layer2"]) == 0
    assert f"drawing: {out}" in capsys.readouterr().out
    text = out.read_text()
    assert text.startswith("digraph permgraph {") and 'pg_module="layer2.0.conv1"' in text
    assert 'pg_module="layer3.0.conv1"' not in text
    assert main(["inspect", "torchvision.models:resnet18", "--draw", str(tmp_path / "r.jpg")]) == 2
    assert "jpg" in capsys.readouterr().err
    assert main(["inspect", "torchvision.models:resnet18", "--module", "layer2"]) == 2
    assert "add --draw" in capsys.readouterr().err
