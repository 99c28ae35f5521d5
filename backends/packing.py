"""4-bit weights packed for the GPU kernels: two input features a byte."""

from __future__ import annotations

NIBBLES = ".nibbles2"  # a 4-bit weight's copy packed two input features a byte (`pair_nibbles`)


def pair_nibbles(q):
    """4-bit values (uint8 0..15) with the input features on axis 1 ([n, k], or the CPU
    kernel's packed [n / 64, k, 64]) -> bytes, k / 2 on that axis: input features 2i and 2i + 1
    in the low and high nibble of one byte (the GPU kernels' w4 layout)."""
    import numpy as np

    return np.require(q[:, 0::2] | (q[:, 1::2] << 4), requirements="C")
