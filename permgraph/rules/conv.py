"""Convolutions, plain, strided, grouped, depthwise and transposed.

Channels: with ``groups = g`` the input channels are ``g`` blocks of ``Cin/g`` and the
output channels ``g`` blocks of ``Cout/g``; block ``i`` of the output reads only block ``i``
of the input. So the channel axes are row-major products ``(g, Cin/g)`` and ``(g, Cout/g)``
sharing the block factor, and the weight's input-channel dim is the inner ``Cin/g`` factor.
Spatial positions and kernel taps are ordered by the convolution and never move.
"""

from __future__ import annotations

from collections.abc import Iterator

from permgraph.rules import Block, Constraint, Fresh, OpCall, Prod, Tie, rule


@rule(
    "aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten._convolution",
    "aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d",
)
def _conv(op: OpCall) -> Iterator[Constraint]:
    x, w, b, out = op.tensor("input"), op.tensor("weight"), op.tensor("bias"), op.out
    transposed = bool(op.args.get("transposed", False)) or "conv_transpose" in op.name
    groups = int(op.args.get("groups") or 1)
    k = w.ndim - 2  # spatial dims
    c = x.ndim - k - 1  # channel dim of input and output (0 when unbatched)
    why = f"{'transposed ' if transposed else ''}conv"
    for d in range(c):
        yield Tie(x.axis(d), out.axis(d), f"{why}: batch dims")
    for d in range(c + 1, x.ndim):
        yield Block(x.axis(d), f"{why}: spatial positions are ordered")
        yield Block(out.axis(d), f"{why}: spatial positions are ordered")
    for d in range(2, w.ndim):
        yield Block(w.axis(d), f"{why}: kernel taps are ordered")
    w_in, w_out = (w.axis(0), w.axis(1)) if transposed else (w.axis(1), w.axis(0))
    if groups == 1:
        yield Tie(x.axis(c), w_in, f"{why}: input channels")
        yield Tie(out.axis(c), w_out, f"{why}: output channels")
    else:
        g = Fresh(groups, "groups")
        cin, cout = x.shape[c] // groups, out.shape[c] // groups
        if transposed:  # weight [Cin, Cout/g, ...]: rows hold the groups' input channels
            yield Tie(w_in, Prod(g, Fresh(cin, "cin")), f"{why}: weight rows in {groups} groups")
            yield Tie(x.axis(c), w_in, f"{why}: input channels")
            yield Tie(out.axis(c), Prod(g, w_out), f"{why}: output channels in {groups} groups")
        else:  # weight [Cout, Cin/g, ...]
            yield Tie(w_out, Prod(g, Fresh(cout, "cout")), f"{why}: weight rows in {groups} groups")
            yield Tie(out.axis(c), w_out, f"{why}: output channels")
            yield Tie(x.axis(c), Prod(g, w_in), f"{why}: input channels in {groups} groups")
    if b is not None:
        yield Tie(b.axis(0), out.axis(c), f"{why}: bias")
