"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p,
from a seeded generator.

Both runtimes sample the same way, to the bit (the native runtime's `sample.c`): a seeded run
gives the same tokens from the Python runtime and from `llmc-run`. So the generator is one
whose definition is short and public, xoshiro256** seeded through splitmix64 (numpy's
generators seed through SeedSequence, whose hashing a C runtime would have to copy), and every
sum is sequential in float64 (numpy's `sum` adds pairwise; `cumsum` adds in order, as C does).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import LlmcError

_MASK = (1 << 64) - 1


class Rng:
    """xoshiro256** (Blackman and Vigna), its state from splitmix64 of the seed."""

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        if type(seed) is not int or not 0 <= seed <= _MASK:
            raise LlmcError(f"seed {seed!r}: must be an integer from 0 to 2**64 - 1")
        self.s = []
        for _ in range(4):
            seed = (seed + 0x9E3779B97F4A7C15) & _MASK
            z = seed
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
            self.s.append(z ^ (z >> 31))

    def uniform(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        s = self.s
        out = (_rotl((s[1] * 5) & _MASK, 7) * 9) & _MASK
        t = (s[1] << 17) & _MASK
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return (out >> 11) * 2.0 ** -53


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & _MASK


def check_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that have no meaning, before anything runs."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise LlmcError(f"temperature {temperature!r}: must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise LlmcError(f"top-k {top_k!r}: must be an integer >= 1")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise LlmcError(f"top-p {top_p!r}: must be a number in (0, 1]")


def sample(logits: np.ndarray, rng: Rng, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")  # descending, ties by index
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    if top_p is not None and top_p < 1.0:  # the fewest tokens whose probability reaches top_p
        keep = int(np.searchsorted(np.cumsum(p / np.cumsum(p)[-1]), top_p)) + 1
        p = p[:keep]
    c = np.cumsum(p)
    i = int(np.searchsorted(c, rng.uniform() * c[-1], side="right"))
    return int(order[min(i, len(c) - 1)])
