"""Straight-through estimator matching on MLPs trained on scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch

import permgraph
from permgraph.errors import SpecMismatchError
from permgraph.match._common import MatchError
from permgraph.match.ste import STEHistory, ste_matching
from permgraph.match.weight import weight_matching
from tests.test_merge_many import digits, evaluate, mlp, trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    ma, mb = trained(0), trained(1)
    data = digits()
    spec = permgraph.infer(ma, data.x_train[:2])
    batches = [(data.x_train[i : i + 256], data.y_train[i : i + 256]) for i in range(0, len(data.x_train), 256)]
    return spec, ma, mb, batches


def test_ste_midpoint_loss_far_below_naive(pair):
    spec, ma, mb, batches = pair
    a, b = ma.state_dict(), mb.state_dict()
    before = {k: v.clone() for k, v in b.items()}
    perm, hist = ste_matching(spec, ma, mb, batches, steps=60, lr=1e-2, seed=0, return_history=True)
    assert isinstance(hist, STEHistory) and len(hist.loss) == 60
    spec.check_permutation(perm)
    assert all(torch.equal(before[k], mb.state_dict()[k]) for k in b)  # B untouched

    def mid(p, split="train"):
        aligned = spec.apply(p, b)
        return evaluate(ma, {k: 0.5 * (a[k] + aligned[k]) for k in a}, split)

    naive = mid(spec.identity())[0]
    ste_train, (ste_test, ste_acc) = mid(perm)[0], mid(perm, "test")
    wm = mid(weight_matching(spec, a, b))[0]
    ends = max(evaluate(ma, a, "train")[0], evaluate(ma, b, "train")[0])
    print(f"\ndigits midpoint loss (train): naive {naive:.3f}, weight matching {wm:.3f}, STE {ste_train:.3f} "
          f"(test {ste_test:.3f}, acc {ste_acc:.3f}); endpoints <= {ends:.3f}; candidates {hist.scores}")
    margin = ends + 0.25 * (naive - ends)
    assert naive > margin  # the identity fails the criterion
    assert ste_train < margin
    # the proxy moved the projection away from plain weight matching, and the result is
    # the best candidate scored (the start, weight matching, is one of them)
    assert sum(hist.changed) > 0 and len(hist.scores) > 1
    assert hist.scores[0][1] == pytest.approx(wm, rel=1e-4)
    assert min(v for _, v in hist.scores) == pytest.approx(ste_train, rel=1e-4)
    assert ste_train <= wm + 1e-6


def test_ste_is_deterministic_and_shows_progress(pair):
    spec, ma, mb, batches = pair
    p1 = ste_matching(spec, ma, mb, batches[:2], steps=6, lr=1e-2, seed=1)
    p2 = ste_matching(spec, ma, mb, batches[:2], steps=6, lr=1e-2, seed=1, progress=True)
    assert all(torch.equal(p1[g], p2[g]) for g in p1)


def test_ste_accepts_a_loss_function_and_tuple_inputs(pair):
    spec, ma, mb, batches = pair
    calls = []

    def loss_fn(out, target):
        calls.append(out.shape)
        return torch.nn.functional.cross_entropy(out, target)

    tupled = [((x,), y) for x, y in batches[:2]]
    ste_matching(spec, ma, mb, tupled, loss_fn=loss_fn, steps=3)
    assert calls and all(s[1] == 10 for s in calls)


def test_ste_bad_input(pair):
    spec, ma, mb, batches = pair
    with pytest.raises(MatchError, match="empty"):
        ste_matching(spec, ma, mb, [], steps=2)
    with pytest.raises(MatchError, match="re-iterable"):
        ste_matching(spec, ma, mb, None, steps=2)
    with pytest.raises(MatchError, match=r"\(inputs, targets\) pair"):
        ste_matching(spec, ma, mb, [digits().x_train[:8]], steps=2)
    with pytest.raises(SpecMismatchError, match="model_b"):
        ste_matching(spec, ma, mlp(16), batches, steps=2)
    with pytest.raises(MatchError, match="nn.Module"):
        ste_matching(spec, ma, mb.state_dict(), batches, steps=2)
    with pytest.raises(MatchError, match="steps"):
        ste_matching(spec, ma, mb, batches, steps=0)
    with pytest.raises(MatchError, match="lr"):
        ste_matching(spec, ma, mb, batches, lr=-1.0)
    once = iter(batches[:1])  # a one-shot iterator cannot be read a second time
    with pytest.raises(MatchError, match="could not be iterated again"):
        ste_matching(spec, ma, mb, once, steps=3)


def test_ste_serves_per_head_groups():
    """STE with one group per head (``heads="independent"``): B is A under a hidden
    permutation, so weight matching (STE's start) recovers it and the start's score is A's
    own loss; every candidate STE scores is a valid permutation, evaluated as ``apply``
    composes per-head groups (a score off A's loss for the start would show a mismatch)."""
    from tests.helpers import tiny_gpt2

    model_a, inputs, spec = tiny_gpt2(0, heads="independent")
    assert any(g.name.endswith(".h1") for g in spec.groups)
    model_b, _, _ = tiny_gpt2(0)
    hidden = spec.random_permutation(torch.Generator().manual_seed(3))
    model_b.load_state_dict(spec.apply(hidden, model_a.state_dict()))
    ids = inputs["input_ids"]
    batches = [({"input_ids": ids, "use_cache": False}, ids[0, 1:])]

    def loss_fn(out, targets):
        return torch.nn.functional.cross_entropy(out.logits[0, :-1], targets)

    perm, hist = ste_matching(spec, model_a, model_b, batches, loss_fn=loss_fn, steps=4, lr=1e-2,
                              return_history=True)
    spec.check_permutation(perm)
    with torch.no_grad():
        own = float(loss_fn(model_a(**batches[0][0]), batches[0][1]))
    assert hist.scores[0][1] == pytest.approx(own, rel=1e-5)
    assert min(v for _, v in hist.scores) <= own + 1e-6
    recovered = spec.apply(perm, model_b.state_dict())
    # the candidate kept is scored like the others: its midpoint with A has the recorded loss
    mid = {k: 0.5 * (v + recovered[k]) if v.is_floating_point() else v for k, v in model_a.state_dict().items()}
    with torch.no_grad():
        got = float(loss_fn(torch.func.functional_call(model_a, mid, (), batches[0][0], tie_weights=False), batches[0][1]))
    assert got == pytest.approx(min(v for _, v in hist.scores), rel=1e-5)
