"""Unification of axis layouts: the solver behind `infer`.

Every tensor axis gets a *variable* standing for the unknown permutation of its units.
A rule ties variables (same permutation) or *refines* one into a row-major product
(``view``: E -> H x D) or a concatenation (``cat``, ``slice``) of smaller variables.
Ties are merged by union-find; when two refinements of one variable meet they are aligned
on their common boundaries (a product is associative, so ``(4, 6)`` meets ``(4, 2, 3)`` as
``4 = 4`` and ``6 = 2 x 3``). Refinements that share no boundary cannot both hold: the
variables involved are blocked (sound) and the conflict is recorded.

A blocked variable never moves, and neither does anything it is refined into; the parts of
a refinement can be blocked without blocking the whole (a fixed head axis leaves the
within-head units free).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Literal

Kind = Literal["prod", "cat"]

__all__ = ["Unifier", "Leaf", "Tree"]


@dataclass(frozen=True)
class Leaf:
    """A variable that is not refined further: a group root, or fixed units."""

    root: int
    size: int
    blocked: bool


@dataclass(frozen=True)
class Tree:
    """A refined variable: ``kind`` is ``"prod"`` (row-major product) or ``"cat"``."""

    kind: Kind
    parts: tuple[Leaf | Tree, ...]
    size: int
    root: int = -1


class Unifier:
    """Union-find over axis variables with product/concat refinements.

    Examples:
        >>> u = Unifier()
        >>> e, h, d = u.new(12), u.new(3), u.new(4)
        >>> u.unify(e, u.term("prod", [h, d]), why="view")
        >>> u.finish()
        >>> u.tree(e).kind, [p.size for p in u.tree(e).parts]
        ('prod', [3, 4])
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._term: dict[int, tuple[Kind, tuple[int, ...]]] = {}
        self._blocked: dict[int, str] = {}
        self._why: dict[int, list[str]] = {}
        self.conflicts: list[str] = []
        self.conflict_vars: list[list[int]] = []  # the variables each conflict blocked
        self._final_blocked: set[int] | None = None

    # -- variables ---------------------------------------------------------------------
    def new(self, size: int) -> int:
        """A fresh, unconstrained variable for ``size`` units."""
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        return len(self._parent) - 1

    def size(self, v: int) -> int:
        return self._size[v]

    def find(self, v: int) -> int:
        parent = self._parent
        root = v
        while parent[root] != root:
            root = parent[root]
        while parent[v] != root:
            parent[v], v = root, parent[v]
        return root

    def term(self, kind: Kind, parts: list[int]) -> int:
        """A variable refined into ``parts`` (size-1 / empty parts are dropped)."""
        parts = [p for p in parts if self._size[p] > (1 if kind == "prod" else 0)]
        if len(parts) == 1:
            return parts[0]
        size = prod(self._size[p] for p in parts) if kind == "prod" else sum(self._size[p] for p in parts)
        v = self.new(size)
        if parts:
            self._term[v] = (kind, tuple(parts))
        return v

    # -- constraints -------------------------------------------------------------------
    def block(self, v: int, reason: str) -> None:
        """``v`` (and everything it is refined into) must never be permuted."""
        self._blocked.setdefault(self.find(v), reason)

    def unify(self, a: int, b: int, why: str) -> None:
        """``a`` and ``b`` receive the same permutation."""
        stack = [(a, b)]
        while stack:
            x, y = stack.pop()
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if self._size[rx] != self._size[ry]:
                msg = f"{why}: sizes {self._size[rx]} and {self._size[ry]} cannot be tied"
                self.conflicts.append(msg)
                self.conflict_vars.append([rx, ry])
                self.block(rx, msg)
                self.block(ry, msg)
                continue
            tx, ty = self._term.pop(rx, None), self._term.pop(ry, None)
            r = self._union(rx, ry, why)
            if tx is None or ty is None:
                if tx or ty:
                    self._term[r] = tx or ty  # type: ignore[assignment]
                continue
            self._term[r] = tx
            stack.extend(self._align(tx, ty, why))

    # -- internals ---------------------------------------------------------------------
    def _union(self, rx: int, ry: int, why: str) -> int:
        wx, wy = self._why.pop(rx, []), self._why.pop(ry, [])
        if len(wx) < len(wy):
            rx, ry, wx, wy = ry, rx, wy, wx
        self._parent[ry] = rx
        wx.extend(wy)
        wx.append(why)
        self._why[rx] = wx
        if ry in self._blocked:
            self._blocked.setdefault(rx, self._blocked.pop(ry))
        return rx

    def _flatten(self, kind: Kind, parts: tuple[int, ...]) -> list[int]:
        out: list[int] = []
        for p in parts:
            t = self._term.get(self.find(p))
            if t is not None and t[0] == kind:
                out.extend(self._flatten(kind, t[1]))
            else:
                out.append(p)
        return out

    def _align(self, tx: tuple[Kind, tuple[int, ...]], ty: tuple[Kind, tuple[int, ...]], why: str):
        """Pairs of variables to unify so that two refinements agree, or block on conflict."""
        if tx[0] != ty[0]:
            self._conflict(list(tx[1]) + list(ty[1]), f"{why}: a {tx[0]} layout met a {ty[0]} layout")
            return []
        kind = tx[0]
        xs, ys = self._flatten(kind, tx[1]), self._flatten(kind, ty[1])
        step = (lambda acc, s: acc * s) if kind == "prod" else (lambda acc, s: acc + s)
        unit = 1 if kind == "prod" else 0
        pairs = []
        i = j = 0
        cx: list[int] = []
        cy: list[int] = []
        ax = ay = unit
        while i < len(xs) or j < len(ys):
            if j >= len(ys) or (i < len(xs) and ax <= ay):
                ax = step(ax, self._size[xs[i]])
                cx.append(xs[i])
                i += 1
            else:
                ay = step(ay, self._size[ys[j]])
                cy.append(ys[j])
                j += 1
            if ax == ay and cx and cy:
                if len(cx) == 1 and len(cy) == 1:
                    pairs.append((cx[0], cy[0]))
                elif len(cx) == 1:
                    pairs.append((cx[0], self.term(kind, cy)))
                elif len(cy) == 1:
                    pairs.append((self.term(kind, cx), cy[0]))
                else:
                    pairs.extend(self._refine(kind, cx, cy, why))
                cx, cy = [], []
        return pairs

    def _refine(self, kind: Kind, cx: list[int], cy: list[int], why: str) -> list[tuple[int, int]]:
        """Two runs of parts with no inner boundary in common, like ``(2, 768)`` and
        ``(24, 64)``: split every part at the other run's boundaries (``768 = 12 x 64``,
        ``24 = 2 x 12``) so that the pieces pair up. Refining a part only restricts it to
        a subgroup, which is sound; when a product's boundaries do not divide each other
        there is no common refinement and the parts are blocked."""

        def bounds(vs: list[int]) -> list[int]:
            out, acc = [], 1 if kind == "prod" else 0
            for v in vs:
                acc = acc * self._size[v] if kind == "prod" else acc + self._size[v]
                out.append(acc)
            return out

        start = 1 if kind == "prod" else 0
        cuts = sorted(set(bounds(cx)) | set(bounds(cy)))
        if kind == "prod" and any(b % a for a, b in zip([start] + cuts, cuts)):
            sizes_x = [self._size[v] for v in cx]
            sizes_y = [self._size[v] for v in cy]
            self._conflict(cx + cy, f"{why}: layouts {sizes_x} and {sizes_y} have no common refinement")
            return []

        pairs: list[tuple[int, int]] = []

        def pieces(vs: list[int]) -> list[int]:
            out, lo = [], start
            for v, hi in zip(vs, bounds(vs)):
                edges = [lo] + [c for c in cuts if lo < c <= hi]
                if len(edges) == 2:
                    out.append(v)
                else:
                    parts = [self.new(b // a if kind == "prod" else b - a) for a, b in zip(edges, edges[1:])]
                    pairs.append((v, self.term(kind, parts)))
                    out.extend(parts)
                lo = hi
            return out

        pairs.extend(zip(pieces(cx), pieces(cy)))
        return pairs

    def _conflict(self, vs: list[int], msg: str) -> None:
        self.conflicts.append(msg)
        self.conflict_vars.append(list(vs))
        for v in vs:
            self.block(v, msg)

    # -- results -----------------------------------------------------------------------
    def finish(self) -> None:
        """Propagate blocks from each blocked variable into everything it is refined into."""
        blocked: set[int] = set()
        stack = [self.find(v) for v in self._blocked]
        while stack:
            r = self.find(stack.pop())
            if r in blocked:
                continue
            blocked.add(r)
            t = self._term.get(r)
            if t is not None:
                stack.extend(t[1])
        self._final_blocked = blocked

    def reachable(self, vs: list[int]) -> set[int]:
        """The roots of ``vs`` and of every variable they are refined into, recursively.

        Examples:
            >>> u = Unifier()
            >>> e, h, d = u.new(12), u.new(3), u.new(4)
            >>> u.unify(e, u.term("prod", [h, d]), why="view")
            >>> u.reachable([e]) == {u.find(e), u.find(h), u.find(d)}
            True
        """
        out: set[int] = set()
        stack = [self.find(v) for v in vs]
        while stack:
            r = self.find(stack.pop())
            if r in out:
                continue
            out.add(r)
            t = self._term.get(r)
            if t is not None:
                stack.extend(t[1])
        return out

    def is_blocked(self, v: int) -> bool:
        assert self._final_blocked is not None, "call finish() first"
        return self.find(v) in self._final_blocked

    def block_reason(self, v: int) -> str | None:
        return self._blocked.get(self.find(v))

    def why(self, v: int) -> list[str]:
        """The constraints that joined this variable's class, oldest first."""
        return self._why.get(self.find(v), [])

    def tree(self, v: int) -> Leaf | Tree:
        """The resolved layout of variable ``v``."""
        r = self.find(v)
        t = self._term.get(r)
        if t is None:
            return Leaf(r, self._size[r], self.is_blocked(r))
        return Tree(t[0], tuple(self.tree(p) for p in t[1]), self._size[r], r)
