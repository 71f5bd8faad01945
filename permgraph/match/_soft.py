"""Soft permutations of a state_dict: one ``(n, n)`` matrix per group applied through the
members' layouts (differentiably), as Sinkhorn re-basin learns them."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from permgraph.errors import SpecMismatchError
from permgraph.layout import at_axis, at_slice
from permgraph.match._common import LayoutInfo, check_spec
from permgraph.spec import PermSpec

__all__ = ["SoftPermuter", "soft_apply"]


class SoftPermuter:
    """Applies one ``(n, n)`` matrix per group to a state_dict through the members' layouts.

    New unit ``u`` of a member is ``Σ_v M[u, v]`` old unit ``v``, so a permutation matrix
    ``M[u, p[u]] = 1`` gives exactly ``spec.apply(p, state)``. Groups sharing an axis act on
    disjoint positions or independent factors, so they are applied one after the other; a
    member with an ``at`` acts on its slice of the tensor only, after the whole-tensor ones.
    """

    def __init__(self, spec: PermSpec) -> None:
        # key -> at -> (axis, group, layout) steps, axis numbered in the slice
        self.plan: dict[str, dict[tuple[tuple[int, int], ...], list[tuple[int, int, LayoutInfo]]]] = {}
        for gi, g in enumerate(spec.groups):
            for m in g.members:
                axis_size = spec.shapes[m.key][m.axis]
                lay = LayoutInfo(m.layout.positions(g.size), axis_size)
                self.plan.setdefault(m.key, {}).setdefault(m.at, []).append((at_axis(m.axis, m.at), gi, lay))
        for slices in self.plan.values():
            for steps in slices.values():
                steps.sort(key=lambda s: s[0])
        self._flat: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def keys(self) -> list[str]:
        return list(self.plan)

    def _index(self, lay: LayoutInfo, device: torch.device) -> torch.Tensor:
        key = (id(lay), device)
        if key not in self._flat:
            self._flat[key] = lay.flat.to(device)
        return self._flat[key]

    def tensor(self, key: str, t: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
        """``t`` (the tensor ``key``) with every group's matrix applied."""
        slices = self.plan[key]
        if () in slices:
            t = self._steps(slices[()], t, mats)
        parts = [(at, steps) for at, steps in slices.items() if at]
        if parts:
            out = t.clone()  # written slice by slice, each slice read from t (kept for backward)
            for at, steps in parts:
                at_slice(out, at).copy_(self._steps(steps, at_slice(t, at), mats))
            t = out
        return t

    def _steps(self, steps: list[tuple[int, int, LayoutInfo]], t: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
        for axis, gi, lay in steps:
            m = mats[gi]
            if lay.whole:
                t = torch.tensordot(m, t, dims=([1], [axis])).movedim(0, axis)
                continue
            moved = t.movedim(axis, 0)
            flat = self._index(lay, t.device)
            rest = moved.shape[1:]
            sel = moved.index_select(0, flat).reshape(*lay.counts, lay.n, lay.block, *rest)
            new = torch.tensordot(m, sel, dims=([1], [len(lay.counts)])).movedim(0, len(lay.counts))
            t = moved.index_copy(0, flat, new.reshape(-1, *rest)).movedim(0, axis)
        return t

    def __call__(self, mats: list[torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(state)
        for key in self.plan:
            out[key] = self.tensor(key, state[key], mats)
        return out


def soft_apply(spec: PermSpec, soft: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Apply one ``(n, n)`` matrix per group to a state_dict (differentiably).

    New unit ``u`` is ``Σ_v soft[g][u, v]`` times old unit ``v`` along every member axis, at
    the member's layout; with permutation matrices (``M[u, p[u]] = 1``) this is exactly
    ``spec.apply(p, state_dict)``.

    Args:
        spec: the PermSpec.
        soft: group name -> ``(n, n)`` matrix (soft permutations from `sinkhorn_matching`).
        state_dict: the state_dict to transform; tensors in no group pass through.

    Returns:
        A new dict; the transformed tensors carry autograd history to ``soft``.

    Raises:
        SpecMismatchError: the state_dict does not match the spec, or a matrix is missing or
            has the wrong shape.

    Examples:
        >>> import torch, permgraph
        >>> from permgraph.match.sinkhorn import soft_apply
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> spec = permgraph.infer(mlp, torch.randn(1, 3))
        >>> p = spec.random_permutation(torch.Generator().manual_seed(0))
        >>> mats = {g: torch.eye(len(v))[v] for g, v in p.items()}
        >>> sd = mlp.state_dict()
        >>> all(torch.equal(soft_apply(spec, mats, sd)[k], spec.apply(p, sd)[k]) for k in sd)
        True
    """
    check_spec(spec)
    spec.check_state_dict(state_dict)
    mats = []
    for g in spec.groups:
        m = soft.get(g.name)
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (g.size, g.size):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise SpecMismatchError(f"soft[{g.name!r}] must be a ({g.size}, {g.size}) matrix, got {got}")
        mats.append(m)
    return SoftPermuter(spec)(mats, state_dict)

