"""Unit tests of the layout unifier behind ``infer``: ties, product and concatenation
refinements, their alignment, conflicts, and how blocks propagate."""

from __future__ import annotations

from permgraph.unify import Leaf, Tree, Unifier


def leaves(t: Leaf | Tree) -> list[Leaf]:
    if isinstance(t, Leaf):
        return [t]
    return [leaf for p in t.parts for leaf in leaves(p)]


def shape(t: Leaf | Tree):
    """A tree as nested sizes: ``4`` for a leaf, ``("prod", [2, 3])`` for a refinement."""
    if isinstance(t, Leaf):
        return t.size
    return (t.kind, [shape(p) for p in t.parts])


def test_tie_joins_two_variables():
    u = Unifier()
    a, b, c = u.new(4), u.new(4), u.new(4)
    u.unify(a, b, "a=b")
    u.finish()
    assert u.find(a) == u.find(b) != u.find(c)
    assert u.tree(a) == u.tree(b) == Leaf(u.find(a), 4, False)
    assert "a=b" in u.why(a)
    assert u.why(c) == []


def test_ties_are_transitive_and_idempotent():
    u = Unifier()
    a, b, c = u.new(5), u.new(5), u.new(5)
    u.unify(a, b, "1")
    u.unify(b, c, "2")
    u.unify(c, a, "3")  # already joined: nothing changes
    u.finish()
    assert u.find(a) == u.find(c)
    assert u.why(a).count("1") == 1 and "2" in u.why(a)
    assert not u.conflicts


def test_tie_of_different_sizes_blocks_both():
    u = Unifier()
    a, b = u.new(4), u.new(6)
    u.unify(a, b, "bad tie")
    u.finish()
    assert u.conflicts and "bad tie" in u.conflicts[0]
    assert u.is_blocked(a) and u.is_blocked(b)


def test_product_refinement():
    u = Unifier()
    e, h, d = u.new(12), u.new(3), u.new(4)
    u.unify(e, u.term("prod", [h, d]), "view E -> H x D")
    u.finish()
    t = u.tree(e)
    assert shape(t) == ("prod", [3, 4])
    assert [leaf.root for leaf in t.parts] == [u.find(h), u.find(d)]
    assert not u.is_blocked(e)


def test_term_drops_size_one_parts_and_collapses_singletons():
    u = Unifier()
    one, four = u.new(1), u.new(4)
    assert u.term("prod", [one, four]) == four
    assert u.term("cat", [u.new(0), four]) == four
    three = u.new(3)
    t = u.term("prod", [one, four, three])
    assert u.size(t) == 12


def test_two_products_with_the_same_factors_tie_factor_by_factor():
    u = Unifier()
    x = u.new(12)
    h1, d1, h2, d2 = u.new(3), u.new(4), u.new(3), u.new(4)
    u.unify(x, u.term("prod", [h1, d1]), "q view")
    u.unify(x, u.term("prod", [h2, d2]), "k view")
    u.finish()
    assert u.find(h1) == u.find(h2) and u.find(d1) == u.find(d2)
    assert not u.conflicts


def test_product_associativity_4x6_meets_4x2x3():
    u = Unifier()
    x = u.new(24)
    a4, b6 = u.new(4), u.new(6)
    c4, d2, e3 = u.new(4), u.new(2), u.new(3)
    u.unify(x, u.term("prod", [a4, b6]), "(4, 6)")
    u.unify(x, u.term("prod", [c4, d2, e3]), "(4, 2, 3)")
    u.finish()
    assert not u.conflicts
    assert u.find(a4) == u.find(c4)  # 4 = 4
    assert shape(u.tree(b6)) == ("prod", [2, 3])  # 6 = 2 x 3
    assert [leaf.root for leaf in leaves(u.tree(b6))] == [u.find(d2), u.find(e3)]
    assert [leaf.size for leaf in leaves(u.tree(x))] == [4, 2, 3]
    assert not any(leaf.blocked for leaf in leaves(u.tree(x)))


def test_common_refinement_of_products_with_no_shared_inner_boundary():
    u = Unifier()
    x = u.new(24)
    a2, b12 = u.new(2), u.new(12)
    c4, d6 = u.new(4), u.new(6)
    u.unify(x, u.term("prod", [a2, b12]), "(2, 12)")
    u.unify(x, u.term("prod", [c4, d6]), "(4, 6)")
    u.finish()
    assert not u.conflicts
    # (2, 12) and (4, 6) meet at (2, 2, 6)
    assert [leaf.size for leaf in leaves(u.tree(x))] == [2, 2, 6]
    assert u.find(a2) == leaves(u.tree(c4))[0].root


def test_conflicting_refinements_block():
    u = Unifier()
    x, other = u.new(6), u.new(5)
    a2, b3, c3, d2 = u.new(2), u.new(3), u.new(3), u.new(2)
    u.unify(x, u.term("prod", [a2, b3]), "(2, 3)")
    u.unify(x, u.term("prod", [c3, d2]), "(3, 2)")
    u.finish()
    assert u.conflicts and "no common refinement" in u.conflicts[0]
    assert all(leaf.blocked for leaf in leaves(u.tree(x)))
    for v in (a2, b3, c3, d2):
        assert u.is_blocked(v)
    assert not u.is_blocked(other)


def test_product_meeting_a_concatenation_blocks():
    u = Unifier()
    x = u.new(6)
    u.unify(x, u.term("prod", [u.new(2), u.new(3)]), "view")
    u.unify(x, u.term("cat", [u.new(4), u.new(2)]), "split")
    u.finish()
    assert u.conflicts
    assert all(leaf.blocked for leaf in leaves(u.tree(x)))


def test_block_propagates_into_parts_not_into_parents():
    u = Unifier()
    e, h, d = u.new(12), u.new(3), u.new(4)
    u.unify(e, u.term("prod", [h, d]), "view")
    u.block(h, "head axis fixed")
    u.finish()
    assert u.is_blocked(h)
    assert not u.is_blocked(e)  # the parent is not blocked...
    assert not u.is_blocked(d)  # ...nor its other part
    assert u.block_reason(h) == "head axis fixed"
    t = u.tree(e)
    assert [leaf.blocked for leaf in t.parts] == [True, False]


def test_blocking_a_parent_blocks_every_part():
    u = Unifier()
    e, h, d, d1, d2 = u.new(12), u.new(3), u.new(4), u.new(2), u.new(2)
    u.unify(e, u.term("prod", [h, d]), "view")
    u.unify(d, u.term("prod", [d1, d2]), "view again")
    u.block(e, "model input")
    u.finish()
    for v in (e, h, d, d1, d2):
        assert u.is_blocked(v)


def test_block_before_tie_reaches_the_tied_variable():
    u = Unifier()
    a, b, c = u.new(4), u.new(4), u.new(4)
    u.block(a, "input")
    u.unify(a, b, "tie")
    u.finish()
    assert u.is_blocked(b)
    assert not u.is_blocked(c)


def test_cat_alignment_on_shared_boundaries():
    u = Unifier()
    x = u.new(10)
    a4, b6 = u.new(4), u.new(6)
    c4, d3, e3 = u.new(4), u.new(3), u.new(3)
    u.unify(x, u.term("cat", [a4, b6]), "cat(4, 6)")
    u.unify(x, u.term("cat", [c4, d3, e3]), "split(4, 3, 3)")
    u.finish()
    assert not u.conflicts
    assert u.find(a4) == u.find(c4)
    assert shape(u.tree(b6)) == ("cat", [3, 3])
    assert [leaf.size for leaf in leaves(u.tree(x))] == [4, 3, 3]


def test_cat_with_crossing_boundaries_refines_into_segments():
    u = Unifier()
    x = u.new(10)
    a4, b6, c6, d4 = u.new(4), u.new(6), u.new(6), u.new(4)
    u.unify(x, u.term("cat", [a4, b6]), "cat(4, 6)")
    u.unify(x, u.term("cat", [c6, d4]), "cat(6, 4)")
    u.finish()
    assert not u.conflicts
    # segments 0-3, 4-5, 6-9: every one keeps its own group
    assert [leaf.size for leaf in leaves(u.tree(x))] == [4, 2, 4]
    assert leaves(u.tree(c6))[0].root == u.find(a4)
    assert leaves(u.tree(b6))[1].root == u.find(d4)
    assert not any(leaf.blocked for leaf in leaves(u.tree(x)))


def test_cat_of_the_same_variable_twice():
    u = Unifier()
    h, out = u.new(4), u.new(8)
    u.unify(out, u.term("cat", [h, h]), "cat([h, h])")
    u.finish()
    t = u.tree(out)
    assert shape(t) == ("cat", [4, 4])
    assert t.parts[0].root == t.parts[1].root == u.find(h)


def test_blocked_segment_of_a_cat_leaves_the_others_free():
    u = Unifier()
    x, a, b = u.new(10), u.new(4), u.new(6)
    u.unify(x, u.term("cat", [a, b]), "cat")
    u.block(a, "fixed")
    u.finish()
    assert [leaf.blocked for leaf in u.tree(x).parts] == [True, False]


def test_why_collects_every_tie_of_a_class():
    u = Unifier()
    a, b, c = u.new(3), u.new(3), u.new(3)
    u.unify(a, b, "first")
    u.unify(c, b, "second")
    assert set(u.why(c)) == {"first", "second"}


def test_a_conflict_records_the_variables_it_blocks():
    """(4 x 3) met (3 x 4): no common refinement; the conflict names the four parts, which
    the refinement the axis keeps is reachable from it (so `infer` can tell the conflict cost
    units of the weights on that axis)."""
    u = Unifier()
    c, g4, r3, g3, r4 = u.new(12), u.new(4), u.new(3), u.new(3), u.new(4)
    u.unify(c, u.term("prod", [g4, r3]), why="conv groups")
    u.unify(c, u.term("prod", [g3, r4]), why="group norm")
    u.finish()
    assert len(u.conflicts) == len(u.conflict_vars) == 1
    assert {u.find(v) for v in u.conflict_vars[0]} == {u.find(v) for v in (g4, r3, g3, r4)}
    assert {u.find(v) for v in (g4, r3)} <= u.reachable([c])  # the refinement kept on the axis
    assert u.find(c) not in u.reachable([g3])
    assert all(u.is_blocked(v) for v in (g4, r3, g3, r4)) and not u.is_blocked(c)
