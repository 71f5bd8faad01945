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

    def _cost(self, gi: int, perm: list[torch.Tensor]) -> torch.Tensor:
        """``-S_g`` as a float64 CPU matrix (a new copy: it is not kept between visits)."""
        t0 = time.perf_counter()
        c = self.prob.cost(gi, perm, self.hist).to(device="cpu", dtype=torch.float64, copy=True)
        self.hist.product_seconds += time.perf_counter() - t0
        return c

    def _changed(self, groups: list[int]) -> None:
        for g in groups:
            for u in self.prob.users[g]:
                self.dirty[u] = True

    def step(self, gi: int) -> list[int]:
        """Visit group ``gi``; return the groups whose permutation changed."""
        if self.prob.nests[gi]:
            self.dirty[gi] = False
            moved = self._joint_step(gi)
            if moved or self.prob.joint_only[gi]:
                return moved
        cost = self.prepare(gi)
        return self.finish(gi, cost, self._solve(cost))

    def prepare(self, gi: int) -> torch.Tensor:
        """The first half of a plain visit: ``-S_g`` under the current permutations."""
        self.dirty[gi] = False
        return self._cost(gi, self.perm)

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


def sweep(descent: _Descent, order: list[int], pool: ThreadPoolExecutor | None = None, depth: int = 1) -> list[int]:
    """One sweep: visit, in ``order``, every group something it reads changed for since its
    last LAP; return the groups changed.

    With a ``pool``, the LAPs of consecutive visits to groups that share no tensor (up to
    ``depth`` at a time) run in its threads while the next similarity is built (the LAP
    solvers release the GIL): such a visit neither reads nor dirties the other's
    permutation, and the results are taken in visit order, so the sweep is the sequential
    one, step for step."""
    changed: list[int] = []
    if pool is None:
        for gi in order:
            if descent.dirty[gi]:  # else S_g is what it was at g's last LAP
                changed += descent.step(gi)
        return changed
    tensors = descent.prob.tensors_of
    flight: deque[tuple[int, torch.Tensor, Future]] = deque()  # LAPs under way, in visit order

    def land() -> None:  # take the oldest LAP's result
        gi, cost, fut = flight.popleft()
        changed.extend(descent.finish(gi, cost, fut.result()))

    for gi in order:
        while any(tensors[gi] & tensors[h] for h, _, _ in flight):  # gi reads one of them
            land()
        if not descent.dirty[gi]:
            continue
        if descent.prob.nests[gi]:
            while flight:
                land()
            changed += descent.step(gi)
            continue
        cost = descent.prepare(gi)
        if descent.prob.sizes[gi] < POOL_MIN_SIZE:  # solved in less time than a hand-off costs
            while flight:
                land()
            changed += descent.finish(gi, cost, descent._solve(cost))
            continue
        if len(flight) >= depth:
            land()
        flight.append((gi, cost, pool.submit(descent._solve, cost)))
    while flight:
        land()
    return changed


def run(descent: _Descent, spec: Any, *, order: str, seed: int, tol: float, max_iter: int, lap_threads: int = 1,
        bar: Any = None) -> None:
    """Sweep until one changes nothing, or raises the objective by at most ``tol`` times
    what all sweeps so far raised it, or ``max_iter`` sweeps; record each in ``descent.hist``.

    ``order="graph"``: every sweep visits the groups in `graph_order` (each then sees its
    input side already aligned); ``order="random"``: a random order each sweep, drawn from
    ``seed``. ``lap_threads > 1``: LAPs run in that many threads (see `sweep`)."""
    if lap_threads > 1:
        with ThreadPoolExecutor(lap_threads, thread_name_prefix="permgraph-lap") as pool:
            _run(descent, spec, order, seed, tol, max_iter, pool, lap_threads, bar)
    else:
        _run(descent, spec, order, seed, tol, max_iter, None, 1, bar)


def _run(descent: _Descent, spec: Any, order: str, seed: int, tol: float, max_iter: int,
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
        changed = sweep(descent, visit, pool, depth)
        hist.sweeps += 1
        hist.changed.append([spec.groups[gi].name for gi in dict.fromkeys(changed)])
        hist.objective.append(descent.objective)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{descent.objective:.6g}", changed=len(hist.changed[-1]))
        if not changed:
            hist.converged = True
            return
        if tol > 0 and i > 0 and descent.objective - before <= tol * (descent.objective - start):
            hist.stopped_by_tol = True
            return
