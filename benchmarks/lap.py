"""Time every installed LAP backend of ``permgraph.lap`` (float64, maximise), and check
that all reach scipy's optimum.

    python benchmarks/lap.py [N ...]        # default sizes 8 .. 2048

Two kinds of matrices: ``random`` (i.i.d. uniform, the hardest case) and ``near-perm``
(a hidden permutation plus 0.1 x Gaussian noise, what aligned models give). Each cell is
the best of a few repeats, in seconds. The ``auto`` thresholds of ``permgraph.lap`` are
read off this table.
"""

from __future__ import annotations

import os
import sys
import time

# this file is called lap.py, like the lapx package's module: keep its folder off the import
# path, or ``import lap`` would find this script instead of lapx
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np  # noqa: E402

from permgraph.lap import AUTO_MIN_SIZE, AUTO_ORDER, available_backends, solve  # noqa: E402


def matrices(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The two test matrices of size ``n``."""
    near = rng.normal(scale=0.1, size=(n, n))
    near[np.arange(n), rng.permutation(n)] += 1.0
    return {"random": rng.random((n, n)), "near-perm": near}


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    backends = available_backends()
    print(f"backends: {', '.join(backends)}; auto: scipy below n={AUTO_MIN_SIZE}, else first of {AUTO_ORDER}")
    header = f"{'matrix':10s} {'n':>6s} " + " ".join(f"{b:>10s}" for b in backends) + f" {'fastest':>8s}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        for kind, m in matrices(n, rng).items():
            repeats = 5 if n <= 512 else 2
            ref = m[np.arange(n), solve(m, backend="scipy").numpy()].sum()
            cells = []
            for b in backends:
                p = solve(m, backend=b).numpy()
                obj = m[np.arange(n), p].sum()
                if not np.isclose(obj, ref, rtol=1e-12, atol=1e-9):
                    raise SystemExit(f"{b} is not exact on {kind} n={n}: {obj} vs scipy {ref}")
                cells.append(best_time(lambda b=b, m=m: solve(m, backend=b), repeats))
            fastest = backends[int(np.argmin(cells))]
            print(f"{kind:10s} {n:6d} " + " ".join(f"{c:10.5f}" for c in cells) + f" {fastest:>8s}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8, 16, 32, 64, 128, 256, 512, 1024, 2048])
