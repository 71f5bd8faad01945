"""``permgraph.lap.solve``: every backend reaches scipy's optimum, on hard and degenerate
matrices, and bad input fails with a clear LapError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from permgraph import LapError
from permgraph.lap import AUTO_MIN_SIZE, available_backends, solve

BACKENDS = available_backends()


def _objective(m: np.ndarray, p: torch.Tensor) -> float:
    return float(m[np.arange(len(m)), p.numpy()].sum())


def _matrices() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for n in (1, 2, 3, 7, 31, 64, 200):
        near = rng.normal(scale=0.1, size=(n, n))
        near[np.arange(n), rng.permutation(n)] += 1.0
        out += [
            (f"uniform{n}", rng.random((n, n))),
            (f"near-perm{n}", near),
            (f"ties{n}", rng.integers(0, 3, (n, n)).astype(float)),  # many optimal answers
            (f"zeros{n}", np.zeros((n, n))),
            (f"huge{n}", rng.normal(size=(n, n)) * 1e12),
            (f"tiny-negative{n}", -rng.random((n, n)) * 1e-9),
            (f"low-rank{n}", rng.normal(size=(n, 2)) @ rng.normal(size=(2, n))),
        ]
    return out


def test_scipy_and_auto_are_always_available() -> None:
    assert "scipy" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("maximize", [True, False])
def test_every_backend_reaches_scipys_optimum(backend: str, maximize: bool) -> None:
    for name, m in _matrices():
        ref = _objective(m, solve(m, maximize=maximize, backend="scipy"))
        p = solve(m, maximize=maximize, backend=backend)
        assert p.dtype == torch.int64 and p.shape == (len(m),)
        assert sorted(p.tolist()) == list(range(len(m))), f"{backend} on {name}: not a permutation"
        got = _objective(m, p)
        scale = max(np.abs(m).max() * len(m), 1e-300)
        assert abs(got - ref) <= 1e-12 * scale, f"{backend} on {name}: {got} vs scipy {ref}"
        # and it is optimal: no other permutation of a small matrix does better
        if len(m) <= 3:
            import itertools

            best = (max if maximize else min)(
                sum(m[i, q[i]] for i in range(len(m))) for q in itertools.permutations(range(len(m)))
            )
            assert abs(got - best) <= 1e-12 * scale


def test_maximize_finds_a_hidden_permutation() -> None:
    rng = np.random.default_rng(1)
    n = 300
    hidden = rng.permutation(n)
    m = rng.normal(scale=0.1, size=(n, n))
    m[np.arange(n), hidden] += 1.0
    for backend in BACKENDS:
        assert solve(m, backend=backend).tolist() == hidden.tolist()
        # minimising the negated matrix is the same problem
        assert solve(-m, maximize=False, backend=backend).tolist() == hidden.tolist()


def test_accepts_tensors_of_any_float_dtype_and_leaves_them_alone() -> None:
    m = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 3.0]])
    before = m.clone()
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert solve(m.to(dtype)).tolist() == [1, 0, 2]
    assert torch.equal(m, before)
    assert solve(m.numpy()).tolist() == [1, 0, 2]
    assert solve(m.tolist()).tolist() == [1, 0, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accepts_a_cuda_tensor() -> None:  # pragma: no cover - runs where a GPU is present
    m = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device="cuda")
    assert solve(m).tolist() == [1, 0]


def test_auto_uses_scipy_below_the_measured_size() -> None:
    from permgraph.lap import _pick

    assert _pick(AUTO_MIN_SIZE - 1, "auto") == "scipy"
    assert _pick(AUTO_MIN_SIZE, "auto") in BACKENDS


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.zeros((3, 4)), "square"),
        (np.zeros((4, 3)), "square"),
        (np.zeros(5), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), "non-finite"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), "non-finite"),
        (np.array([[0.0, -np.inf], [1.0, 0.0]]), "non-finite"),
    ],
)
def test_bad_matrices_raise_lap_error(matrix: np.ndarray, message: str) -> None:
    with pytest.raises(LapError, match=message):
        solve(matrix)
    with pytest.raises(LapError, match=message):
        solve(torch.from_numpy(matrix))


def test_non_square_error_gives_the_shape() -> None:
    with pytest.raises(LapError, match=r"\(3, 4\)"):
        solve(torch.zeros(3, 4))


def test_nan_error_gives_the_position() -> None:
    m = np.zeros((3, 3))
    m[1, 2] = np.nan
    with pytest.raises(LapError, match=r"\(1, 2\)"):
        solve(m)


def test_unknown_backend_names_the_installed_ones() -> None:
    with pytest.raises(LapError) as info:
        solve(np.eye(3), backend="hungarian-magic")
    assert "hungarian-magic" in str(info.value)
    for b in BACKENDS:
        assert b in str(info.value)


def test_lap_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        solve(np.zeros((2, 3)))


def test_empty_matrix() -> None:
    assert solve(np.zeros((0, 0))).tolist() == []


def test_a_backend_that_is_not_installed_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import permgraph.lap as lap_module

    monkeypatch.setitem(lap_module._installed, "lapjv", False)
    with pytest.raises(LapError, match="pip install lapjv"):
        solve(np.eye(3), backend="lapjv")
    monkeypatch.setitem(lap_module._installed, "lapx", False)
    assert _is_auto_fallback_scipy_or_other(lap_module)


def _is_auto_fallback_scipy_or_other(lap_module) -> bool:
    """With neither fast backend, auto falls back to scipy and still solves."""
    if lap_module._pick(1000, "auto") != "scipy":
        return False
    return solve(np.eye(100) + 0.0, backend="auto").tolist() == list(range(100))


@pytest.mark.parametrize("backend", BACKENDS)
def test_solve_cost_is_solve_without_checks_and_leaves_the_matrix_alone(backend: str) -> None:
    from permgraph.lap import solve_cost

    m = np.random.default_rng(3).random((150, 150))
    before = m.copy()
    p = solve_cost(m, backend=backend)
    assert np.array_equal(m, before)
    assert _objective(m, p) == pytest.approx(_objective(m, solve(m, maximize=False, backend="scipy")), rel=1e-12)


def test_solve_cost_skips_the_backend_when_every_row_minimum_is_in_its_own_column(monkeypatch: pytest.MonkeyPatch) -> None:
    import permgraph.lap as lap_module
    from permgraph.lap import solve_cost

    rng = np.random.default_rng(4)
    hidden = rng.permutation(200)
    cost = rng.random((200, 200))
    cost[np.arange(200), hidden] -= 2.0  # each row's clear minimum, a permutation
    calls = []

    def spy(c: np.ndarray) -> np.ndarray:
        calls.append(c.shape)
        return lap_module._scipy(c)

    monkeypatch.setitem(lap_module.BACKENDS, "scipy", ("scipy.optimize", spy))
    p = solve_cost(cost, backend="scipy")
    assert p.tolist() == hidden.tolist() and p.dtype == torch.int64 and calls == []
    # two rows sharing their minimum's column: the backend solves it, to the same optimum as scipy
    cost[1, hidden[0]] = cost[0, hidden[0]] - 1.0
    p = solve_cost(cost, backend="scipy")
    assert calls == [(200, 200)]
    assert _objective(cost, p) == pytest.approx(_objective(cost, solve(cost, maximize=False, backend="scipy")), rel=1e-12)
