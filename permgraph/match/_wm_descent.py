"""The coordinate descent of weight matching: the permutations, what is stale, one step per
group (see `permgraph.match.weight` for the method)."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from permgraph import lap as _lap
from permgraph.match._wm_problem import _Problem

#: A step is kept when it raises the objective by more than this, relative.
RTOL = 1e-12


#: LAPs of groups smaller than this are solved inline, not in a thread (``lap_threads``).
POOL_MIN_SIZE = 1024


def _improves(old: float, new: float) -> bool:
    return new - old > RTOL * max(abs(old), abs(new), 1e-300)


class _Descent:
    """The coordinate descent: the permutations, what is stale, and one step per group."""

    def __init__(self, prob: _Problem, perm: list[torch.Tensor], lap: str, hist: Any) -> None:
        self.prob = prob
        self.perm = perm
        self.lap = lap
        self.hist = hist
        self.ar = [torch.arange(n) for n in prob.sizes]
        # dirty[g]: a group that g reads changed since g last solved its LAP
        self.dirty = [True] * len(prob.sizes)
        self.objectives = {k: prob.tensor_objective(k, perm) for k in prob.keys}
        self.objective = sum(self.objectives.values())

    def _solve(self, cost: torch.Tensor) -> torch.Tensor:
        """The LAP of a float64 CPU cost matrix (finite: the weights were checked)."""
        t0 = time.perf_counter()
        p = _lap.solve_cost(cost.numpy(), backend=self.lap)
        self.hist.lap_seconds += time.perf_counter() - t0
        self.hist.laps += 1
        return p

    def _cost(self, gi: int, perm: list[torch.Tensor], ready: set[int] | None = None) -> torch.Tensor:
        """``-S_g`` as a float64 CPU matrix (a new copy: it is not kept between visits); with
        ``ready``, of the members read through those groups only (`forward_pass`)."""
        t0 = time.perf_counter()
        c = self.prob.cost(gi, perm, self.hist, ready=ready).to(device="cpu", dtype=torch.float64, copy=True)
        self.hist.product_seconds += time.perf_counter() - t0
        return c

    def forward_pass(self, order: list[int], pool: ThreadPoolExecutor | None = None, depth: int = 1) -> list[int]:
        """One sweep in ``order`` (`graph_order`) in which each group reads only what is aligned
        already: its LAP takes the members whose other groups were visited before it (the
        input side), not those read through groups still at their start, which are added at
        the group's next visit. Kept when it raises ``J`` (measured in full after it).
        Returns the groups changed."""
        start, before = list(self.perm), self.objective
        changed = sweep(self, order, pool, depth, ready=set())
        after = sum(self.prob.tensor_objective(k, self.perm) for k in self.prob.keys)
        if _improves(before, after):
            self.objective = after
            return changed
        self.perm[:], self.objective = start, before  # (the pass added partial gains to it)
        self.dirty = [True] * len(self.prob.sizes)
        return []

    def _changed(self, groups: list[int]) -> None:
        for g in groups:
            for u in self.prob.users[g]:
                self.dirty[u] = True

    def step(self, gi: int, ready: set[int] | None = None) -> list[int]:
        """Visit group ``gi``; return the groups whose permutation changed."""
        if self.prob.nests[gi]:  # (the joint move reads every member, also in a forward pass)
            self.dirty[gi] = False
            moved = self._joint_step(gi)
            if moved or self.prob.joint_only[gi]:
                return moved
        cost = self.prepare(gi, ready)
        return self.finish(gi, cost, self._solve(cost))

    def prepare(self, gi: int, ready: set[int] | None = None) -> torch.Tensor:
        """The first half of a plain visit: ``-S_g`` under the current permutations (read
        through the ``ready`` groups only, if given: the visit is then left to be redone)."""
        self.dirty[gi] = ready is not None and any(not ready.issuperset(m.deps) for m in self.prob.members[gi])
        return self._cost(gi, self.perm, ready)

    def finish(self, gi: int, cost: torch.Tensor, p_new: torch.Tensor) -> list[int]:
        """The second half: take ``p_new`` (the LAP of ``cost``) when it raises ``J``."""
        old = -float(cost[self.ar[gi], self.perm[gi]].sum())
        new = -float(cost[self.ar[gi], p_new].sum())
        if not _improves(old, new):
            return []
        if self.prob.quadratic[gi]:  # the gain read off S is not exact there: measure it
            keys = self.prob.tensors_of[gi]
            before = sum(self.prob.tensor_objective(k, self.perm) for k in keys)
            self.perm[gi] = p_new
            self.objective += sum(self.prob.tensor_objective(k, self.perm) for k in keys) - before
        else:
            self.perm[gi] = p_new
            self.objective += new - old
        self._changed([gi])
        return [gi]

    def _joint_step(self, gi: int) -> list[int]:
        """The joint move of an outer group and its nested inner groups (see the module
        docstring); returns the groups changed, or [] when the move does not raise ``J``."""
        prob, hist = self.prob, self.hist
        t0 = time.perf_counter()
        s = prob.optimistic_similarity(gi, self.perm, hist, self.lap)
        hist.product_seconds += time.perf_counter() - t0
        p_new = self._solve(s.neg_())
        if torch.equal(p_new, self.perm[gi]):
            return []
        trial = list(self.perm)
        trial[gi] = p_new
        for d in prob.partners[gi]:
            trial[d] = self._solve(self._cost(d, trial))
        keys = set(prob.tensors_of[gi]).union(*(prob.tensors_of[d] for d in prob.partners[gi]))
        before = [prob.tensor_objective(k, self.perm) for k in keys]
        after = [prob.tensor_objective(k, trial) for k in keys]
        if not _improves(sum(before), sum(after)):
            return []
        moved = [g for g in [gi, *prob.partners[gi]] if not torch.equal(trial[g], self.perm[g])]
        self.perm[:] = trial
        self.objective += sum(after) - sum(before)
        hist.joint_moves += 1
        self._changed(moved)
        for d in prob.partners[gi]:  # they just took their best response to this state
            self.dirty[d] = False
        return moved


def graph_order(spec: Any) -> list[int]:
    """The groups in the order their first member tensor appears in the spec (the state_dict's
    order, which follows the model's modules: input side first), ties in spec order."""
    rank = {k: i for i, k in enumerate(spec.shapes)}
    first = [min(rank.get(m.key, len(rank)) for m in g.members) for g in spec.groups]
    return sorted(range(len(spec.groups)), key=lambda g: first[g])


def sweep(descent: _Descent, order: list[int], pool: ThreadPoolExecutor | None = None, depth: int = 1,
          ready: set[int] | None = None) -> list[int]:
    """One sweep: visit, in ``order``, every group something it reads changed for since its
    last LAP; return the groups changed. With ``ready`` (`_Descent.forward_pass`), each
    group reads only through the groups in it, and joins it once visited.

    With a ``pool``, the LAP of a group of `POOL_MIN_SIZE` units or more runs in its threads
    (up to ``depth`` at a time; the LAP solvers release the GIL) while the next groups that
    share no tensor with it (nor do their partners, for an outer group) are visited: such a
    visit neither reads nor dirties its permutation, so the sweep is the sequential one, step
    for step (the objective's sum taken in another order)."""
    changed: list[int] = []
    done = ready.add if ready is not None else (lambda gi: None)
    if pool is None:
        for gi in order:
            if descent.dirty[gi]:  # else S_g is what it was at g's last LAP
                changed += descent.step(gi, ready)
            done(gi)
        return changed
    prob = descent.prob
    flight: deque[tuple[int, torch.Tensor, Future]] = deque()  # LAPs under way, in visit order

    def land() -> None:  # take the oldest LAP's result
        gi, cost, fut = flight.popleft()
        changed.extend(descent.finish(gi, cost, fut.result()))

    for gi in order:
        reads = prob.tensors_of[gi].union(*(prob.tensors_of[d] for d in prob.partners[gi]))
        while any(reads & prob.tensors_of[h] for h, _, _ in flight):  # gi reads one of them
            land()
        if not descent.dirty[gi]:
            done(gi)
            continue
        if prob.nests[gi]:  # solved here, beside the LAPs in flight
            changed += descent.step(gi, ready)
            done(gi)
            continue
        cost = descent.prepare(gi, ready)
        done(gi)  # (a group that reads gi shares a tensor with it: it waits for gi's LAP)
        if prob.sizes[gi] < POOL_MIN_SIZE:  # solved in less time than a hand-off costs
            changed += descent.finish(gi, cost, descent._solve(cost))
            continue
        if len(flight) >= depth:
            land()
        flight.append((gi, cost, pool.submit(descent._solve, cost)))
    while flight:
        land()
    return changed


def run(descent: _Descent, spec: Any, *, order: str, seed: int, tol: float, max_iter: int, lap_threads: int = 1,
        first_pass: str = "sweep", bar: Any = None) -> None:
    """Sweep until one changes nothing, or raises the objective by at most ``tol`` times
    what all sweeps so far raised it, or ``max_iter`` sweeps; record each in ``descent.hist``.

    ``order="graph"``: every sweep visits the groups in `graph_order` (each then sees its
    input side already aligned); ``order="random"``: a random order each sweep, drawn from
    ``seed``. ``first_pass="forward"``: the first sweep is `_Descent.forward_pass`.
    ``lap_threads > 1``: LAPs run in that many threads (see `sweep`)."""
    if lap_threads > 1:
        with ThreadPoolExecutor(lap_threads, thread_name_prefix="permgraph-lap") as pool:
            _run(descent, spec, order, seed, tol, max_iter, first_pass, pool, lap_threads, bar)
    else:
        _run(descent, spec, order, seed, tol, max_iter, first_pass, None, 1, bar)


def _run(descent: _Descent, spec: Any, order: str, seed: int, tol: float, max_iter: int, first_pass: str,
         pool: ThreadPoolExecutor | None, depth: int, bar: Any) -> None:
    hist = descent.hist
    gen = torch.Generator().manual_seed(seed)
    forward = graph_order(spec)
    start = descent.objective
    for i in range(max_iter):
        if order == "random":
            visit = torch.randperm(len(spec.groups), generator=gen).tolist()
        else:
            visit = forward
        before = descent.objective
        partial = i == 0 and first_pass == "forward"  # it left members out: no fixed point yet
        changed = descent.forward_pass(forward, pool, depth) if partial else sweep(descent, visit, pool, depth)
        hist.sweeps += 1
        hist.changed.append([spec.groups[gi].name for gi in sorted(set(changed))])
        hist.objective.append(descent.objective)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{descent.objective:.6g}", changed=len(hist.changed[-1]))
        if not changed and not partial:
            hist.converged = True
            return
        if tol > 0 and i > 0 and descent.objective - before <= tol * (descent.objective - start):
            hist.stopped_by_tol = True
            return
