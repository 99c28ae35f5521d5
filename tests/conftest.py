"""Shared fixtures. Zoo exports are cached on disk (LLMC_CACHE_DIR, default ~/.cache/llmc), so a
model is exported once per machine, not once per test run."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A generator seeded differently in every test, so inputs are fresh per test; the seed is
    shown on failure."""
    seed = np.random.SeedSequence().entropy % 2**32
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Error relative to the reference's norm."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm((got - want).ravel()) / max(np.linalg.norm(want.ravel()), 1e-30))
