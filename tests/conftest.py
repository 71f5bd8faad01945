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
