"""Test configuration: deterministic weights for every test, and a small thread count (the
models are tiny, and the suite shares the machine)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test builds its modules from the same random state."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small models and matrices: the machine is shared,
    and with two threads every small op can wait on a descheduled peer (measured: 5-10x
    slower under load). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
