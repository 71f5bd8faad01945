"""Matrix products: linear, addmm, mm, bmm, baddbmm, matmul, einsum.

All reduce to one statement, written as einsum subscripts: an index kept in the output ties
the operands' axes to the output's; an index summed over ties the operands' axes to each
other (a joint permutation of a summed index leaves the sum unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from permgraph.rules import Constraint, Free, OpCall, TensorValue, Tie, rule
from permgraph.rules._util import block_all, broadcast


def einsum_ties(
    subs: Sequence[str], operands: Sequence[TensorValue], out_subs: str, out: TensorValue, why: str
) -> Iterator[Constraint]:
    """Ties for ``out = einsum(",".join(subs) + "->" + out_subs, *operands)``; size-1
    (broadcast) axes are free, a repeated index within one operand (a diagonal) blocks."""
    by_letter: dict[str, list] = {}
    for sub, x in zip(subs, operands):
        if len(set(sub)) != len(sub):
            yield from block_all([x], f"{why}: repeated index in {sub!r}", report=True)
            continue
        for letter, a in zip(sub, x.axes):
            by_letter.setdefault(letter, []).append(a)
    for letter, axes in by_letter.items():
        if letter in out_subs:
            anchor = out.axis(out_subs.index(letter))
        else:
            big = [a for a in axes if a.size != 1]
            anchor = big[0] if big else None
        for a in axes:
            if anchor is None or a.size == 1:
                yield Free(a)
            elif a != anchor:
                yield Tie(a, anchor, f"{why}: index {letter}")
    for letter, a in zip(out_subs, out.axes):
        if letter not in by_letter or all(x.size == 1 for x in by_letter[letter]):
            yield Free(a)  # constant along a broadcast index


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def unused_letters(equation: str, n: int) -> list[str]:
    """``n`` single-character subscripts that ``equation`` does not use (an ellipsis must
    never be spelled with a letter the equation already gives another meaning).

    Examples:
        >>> unused_letters("...B,A->...BA", 3)
        ['C', 'D', 'E']
    """
    used = set(equation)
    out: list[str] = []
    code = ord("A")
    while len(out) < n:
        c = chr(code)
        if c.isalpha() and c not in used:
            out.append(c)
        code += 1
    return out


def _matmul_subs(a: TensorValue, b: TensorValue) -> tuple[str, str, str]:
    """einsum subscripts of torch.matmul(a, b), batch dims broadcast from the right."""
    k, m, n = "K", "M", "N"
    sa = (m + k) if a.ndim >= 2 else k
    sb = (k + n) if b.ndim >= 2 else k
    batch = max(a.ndim - 2, b.ndim - 2, 0)
    letters = _LETTERS[:batch]
    ba = letters[batch - max(a.ndim - 2, 0):] if a.ndim > 2 else ""
    bb = letters[batch - max(b.ndim - 2, 0):] if b.ndim > 2 else ""
    out = letters + (m if a.ndim >= 2 else "") + (n if b.ndim >= 2 else "")
    return ba + sa, bb + sb, out


def _matmul(a: TensorValue, b: TensorValue, out: TensorValue, why: str) -> Iterator[Constraint]:
    sa, sb, so = _matmul_subs(a, b)
    if len(so) != out.ndim:
        yield from block_all([a, b, out], f"{why}: unexpected output rank", report=True)
        return
    # broadcast batch letters of unequal size (1 vs n) are handled by einsum_ties as free
    yield from einsum_ties([sa, sb], [a, b], so, out, why)


@rule("aten.linear")
def _linear(op: OpCall) -> Iterator[Constraint]:
    x, w, b, out = op.tensor("input"), op.tensor("weight"), op.tensor("bias"), op.out
    if w.ndim == 1:  # out = x @ w: contraction to a scalar per row
        yield from _matmul(x, w, out, "linear")
    else:
        yield Tie(x.axis(-1), w.axis(1), "linear: input features = weight columns")
        yield Tie(out.axis(-1), w.axis(0), "linear: output features = weight rows")
        for d in range(x.ndim - 1):
            yield Tie(x.axis(d), out.axis(d), "linear: batch dims")
    if b is not None:
        yield from broadcast([b], out, "linear: bias")


@rule("aten.mm", "aten.bmm", "aten.matmul", "aten.mv", "aten.dot", "aten.vdot")
def _mm(op: OpCall) -> Iterator[Constraint]:
    other = op.tensor("mat2") or op.tensor("other") or op.tensor("vec") or op.tensor("tensor")
    yield from _matmul(op.tensor("self"), other, op.out, op.name)


@rule("aten.addmm", "aten.baddbmm", "aten.addmv", "aten.addbmm")
def _addmm(op: OpCall) -> Iterator[Constraint]:
    a = op.tensor("mat1") or op.tensor("batch1") or op.tensor("mat")
    b = op.tensor("mat2") or op.tensor("batch2") or op.tensor("vec")
    out = op.out
    if op.name.startswith("aten.addbmm"):  # sums over the batch too
        yield from einsum_ties(["bMK", "bKN"], [a, b], "MN", out, op.name)
    else:
        yield from _matmul(a, b, out, op.name)
    yield from broadcast([op.tensor("self")], out, f"{op.name}: added term")


@rule("aten.outer", "aten.ger")
def _outer(op: OpCall) -> Iterator[Constraint]:
    yield from einsum_ties(["i", "j"], [op.tensor("self"), op.tensor("vec2")], "ij", op.out, op.name)


@rule("aten.einsum")
def _einsum(op: OpCall) -> Iterator[Constraint]:
    eq = op.args["equation"].replace(" ", "")
    operands = op.tensors("tensors")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if any(o is None for o in operands) or len(subs) != len(operands):
        yield from block_all([*operands, op.out], f"einsum {eq!r}: operands not understood", report=True)
        return
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        letters = "".join(subs).replace(".", "")
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    # spell out "..." with letters the equation does not use, broadcast from the right
    n_ell = max((x.ndim - len(sub.replace("...", "")) for sub, x in zip(subs, operands) if "..." in sub), default=0)
    ell = "".join(unused_letters(eq, n_ell))
    subs = [sub.replace("...", ell[n_ell - (x.ndim - len(sub.replace("...", ""))):]) for sub, x in zip(subs, operands)]
    rhs = rhs.replace("...", ell)
    yield from einsum_ties(subs, operands, rhs, op.out, f"einsum {eq}")
