"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p,
from a seeded generator."""

from __future__ import annotations

import math

import numpy as np

from .errors import LlmcError


def check_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that have no meaning, before anything runs."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise LlmcError(f"temperature {temperature!r}: must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise LlmcError(f"top-k {top_k!r}: must be an integer >= 1")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise LlmcError(f"top-p {top_p!r}: must be a number in (0, 1]")


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    if top_k:
        order = order[:top_k]
    z = z[order]
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
