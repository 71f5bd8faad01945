"""Picks through views: each slice of a fused tensor gets its own axes.

A fused projection computes queries, keys and values in one matmul, then splits them with
views and a pick: ``z [B, T, 3E] -> view [B, T, 3, H, D] -> permute -> unbind(0)``. Read op
by op, the ``D`` axis of the viewed tensor is one axis, so the within-head units of queries,
keys *and values* would share one permutation. Yet each picked slice is a box of ``z``:
``q[b, h, t, d] = z[b, t, 0 * E + h * D + d]``. This pass finds such chains (views and
copies with no other users, ending in a tensor whose every user picks along one dim) and
relates each picked slice to ``z`` directly, as a segment of ``z``'s axes, skipping the
views. The relation is read off numerically: the chain is run on ``arange(z.numel())``, and
the picked indices must be an affine, axis-aligned box of ``z``; anything else leaves the
chain to the ordinary rules.
"""

from __future__ import annotations

import math

import torch

from permgraph.rules import Cat, Constraint, Free, Fresh, Prod, TensorValue, Tie, op_name, value_of_arg, values_of

__all__ = ["picks_through_views"]

_VIEWS = {
    "aten.view", "aten.reshape", "aten._unsafe_view", "aten.unflatten", "aten.flatten", "aten.squeeze",
    "aten.unsqueeze", "aten.permute", "aten.transpose", "aten.t", "aten.contiguous", "aten.clone",
    "aten.alias", "aten.detach", "aten.movedim", "aten.swapaxes", "aten.swapdims", "aten.mT",
}
_MAX_ELEMENTS = 1 << 24  # the index tensor run through the chain


def _packet(node: torch.fx.Node) -> str:
    return op_name(node.target).rsplit(".", 1)[0] if node.op == "call_function" else ""


def _pick_dim(node: torch.fx.Node) -> int | None:
    if _packet(node) in ("aten.select", "aten.unbind") and node.args and isinstance(node.args[0], torch.fx.Node):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(node.args[0].meta["val"].shape)
        return int(dim) % rank
    return None


def _run(chain: list[torch.fx.Node], x: torch.Tensor) -> torch.Tensor:
    prev = chain[0].args[0]
    for node in chain:
        args = [x if a is prev else a for a in node.args]
        if any(isinstance(a, torch.fx.Node) for a in args) or any(isinstance(v, torch.fx.Node) for v in node.kwargs.values()):
            raise ValueError("a view in the chain reads another tensor")
        x, prev = node.target(*args, **node.kwargs), node
    return x


def _box(z: TensorValue, q: TensorValue, q_idx: torch.Tensor, tag: int) -> list[Constraint] | None:
    """Constraints tying ``q`` to ``z`` when ``q``'s elements are an axis-aligned box of
    ``z`` (each of ``q``'s axes a row-major part of one of ``z``'s axes), else None.
    ``tag`` keeps the segments of each pick apart."""
    flat = q_idx.reshape(-1)
    if flat.numel() == 0:
        return None
    off = int(flat[0])
    strides = [0] * q.ndim
    expected = torch.full(q.shape, off, dtype=torch.int64)
    for j, n in enumerate(q.shape):
        if n > 1:
            strides[j] = int(q_idx.select(j, 1).reshape(-1)[0]) - off
            shape = [1] * q.ndim
            shape[j] = n
            expected = expected + strides[j] * torch.arange(n).view(shape)
    if not torch.equal(expected, q_idx):
        return None
    z_strides = [math.prod(z.shape[k + 1:]) for k in range(z.ndim)]
    parts: dict[int, list[int]] = {k: [] for k in range(z.ndim)}
    out: list[Constraint] = []
    for j, n in enumerate(q.shape):
        if n == 1:
            out.append(Free(q.axis(j)))
            continue
        k = next((k for k in range(z.ndim) if z_strides[k] <= strides[j] < z_strides[k] * z.shape[k]
                  and strides[j] % z_strides[k] == 0), None)
        if k is None:
            return None
        parts[k].append(j)
    for k in range(z.ndim):
        js = sorted(parts[k], key=lambda j: -strides[j])
        step = z_strides[k]
        for j in reversed(js):  # innermost first: each part's stride is the extent of those inside it
            if strides[j] != step:
                return None
            step *= q.shape[j]
        extent = step // z_strides[k]
        start = (off // z_strides[k]) % z.shape[k]
        if start + extent > z.shape[k]:
            return None
        inner = Prod(*(q.axis(j) for j in js)) if len(js) > 1 else (q.axis(js[0]) if js else Fresh(1, f"pick {tag} at {k}"))
        if extent == z.shape[k]:
            out.append(Tie(z.axis(k), inner, "a slice of a fused tensor, through views"))
        else:
            seg = Cat(Fresh(start, f"before {tag} at {k}"), inner,
                      Fresh(z.shape[k] - start - extent, f"after {tag} at {k}"))
            out.append(Tie(z.axis(k), seg, "a slice of a fused tensor, through views"))
    return out


def picks_through_views(graph: torch.fx.Graph) -> tuple[set[str], dict[str, list[Constraint]]]:
    """Find view chains that end in picks (see the module docstring).

    Returns:
        ``(skipped, replaced)``: the names of the chain's view nodes, whose rules must not
        run, and for each pick node the constraints that replace its rule.
    """
    skipped: set[str] = set()
    replaced: dict[str, list[Constraint]] = {}
    for y in graph.nodes:
        if _packet(y) not in _VIEWS or not y.users:
            continue
        dims = {_pick_dim(u) for u in y.users}
        if len(dims) != 1 or None in dims or any(u.args[0] is not y for u in y.users):
            continue
        chain = [y]
        while True:
            prev = chain[0].args[0] if chain[0].args else None
            if isinstance(prev, torch.fx.Node) and _packet(prev) in _VIEWS and len(prev.users) == 1:
                chain.insert(0, prev)
            else:
                break
        z = value_of_arg(chain[0].args[0]) if chain[0].args else None
        if z is None or math.prod(z.shape) > _MAX_ELEMENTS or any(n.name in skipped for n in chain):
            continue
        try:
            y_idx = _run(chain, torch.arange(math.prod(z.shape)).view(z.shape))
        except Exception:  # noqa: BLE001 - a chain we cannot replay keeps its ordinary rules
            continue
        (dim,) = dims
        found: dict[str, list[Constraint]] = {}
        for pick in y.users:
            cons: list[Constraint] = []
            outs = values_of(pick)
            if _packet(pick) == "aten.select":
                idx = [int(pick.args[2] if len(pick.args) > 2 else pick.kwargs["index"]) % y_idx.shape[dim]]
            else:
                idx = list(range(y_idx.shape[dim]))
            for i, q in zip(idx, outs):
                box = _box(z, q, y_idx.select(dim, i), i)
                if box is None:
                    break
                cons += box
            else:
                found[pick.name] = cons
                continue
            break
        else:
            skipped.update(n.name for n in chain)
            replaced.update(found)
    return skipped, replaced

