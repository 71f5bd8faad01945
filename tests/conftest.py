"""Test configuration: deterministic weights for every test, and a small thread count (the
models are tiny, and the suite shares the machine)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# one intra-op thread per worker under pytest-xdist (``pytest -n auto``: one worker per core),
# else two at most
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

# Property tests: the default profile is derandomized (the same examples every run, so CI is
# reproducible); the long one draws new random examples each run and ten times as many
# (run it with HYPOTHESIS_PROFILE=long pytest tests/test_properties.py).
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=250, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


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
