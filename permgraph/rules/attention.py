"""Scaled dot-product attention.

``out = softmax(q kᵀ * scale + mask) v`` over ``q [..., Hq, L, E]``, ``k [..., Hk, S, E]``,
``v [..., Hk, S, Ev]``. The head axis and batch dims are element-wise; ``q`` and ``k``
share the summed feature axis E (a joint permutation keeps every dot product); keys and
values share the key axis S (softmax and the weighted sum over keys do not care about its
order unless the mask is causal); the output's features are ``v``'s. With grouped-query
attention each key/value head serves ``Hq / Hk`` consecutive query heads.
"""

from __future__ import annotations

from collections.abc import Iterator

from permgraph.rules import Block, Constraint, Free, Fresh, OpCall, Prod, Tie, rule


@rule("aten.scaled_dot_product_attention")
def _sdpa(op: OpCall) -> Iterator[Constraint]:
    q, k, v, out = op.tensor("query"), op.tensor("key"), op.tensor("value"), op.out
    mask = op.tensor("attn_mask")
    why = "attention"
    yield Tie(q.axis(-1), k.axis(-1), f"{why}: query and key features are summed together")
    yield Tie(k.axis(-2), v.axis(-2), f"{why}: keys and values pair up")
    yield Tie(out.axis(-1), v.axis(-1), f"{why}: output features are value features")
    yield Tie(out.axis(-2), q.axis(-2), f"{why}: one output per query")
    if op.args.get("is_causal"):
        yield Block(q.axis(-2), f"{why}: causal mask orders the queries")
        yield Block(k.axis(-2), f"{why}: causal mask orders the keys")
    for d in range(3, q.ndim + 1):  # batch and head dims, from the right
        qa, oa = q.axis(-d), out.axis(-d)
        yield Tie(qa, oa, f"{why}: batch/head dims")
        for kv in (k, v):
            if kv.ndim < d:
                continue
            a = kv.axis(-d)
            if a.size == qa.size:
                yield Tie(a, qa, f"{why}: batch/head dims")
            elif a.size == 1:
                yield Free(a)
            elif d == 3 and qa.size % a.size == 0:
                rep = qa.size // a.size
                yield Tie(qa, Prod(a, Fresh(rep, "gqa")), f"{why}: each key/value head serves {rep} query heads")
            else:
                yield Block(a, f"{why}: head counts {a.size} and {qa.size} do not match")
    if mask is not None:
        targets = [k.axis(-2), q.axis(-2)] + [q.axis(-d) for d in range(3, q.ndim + 1)]
        for d in range(1, mask.ndim + 1):
            a = mask.axis(-d)
            if d > len(targets):
                yield Block(a, f"{why}: mask has more dims than the scores")
            elif a.size == 1:
                yield Free(a)
            elif a.size == targets[d - 1].size:
                yield Tie(a, targets[d - 1], f"{why}: mask")
            else:
                yield Block(a, f"{why}: mask does not broadcast")
