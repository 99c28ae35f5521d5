"""The pass pipeline, in order. Read it top to bottom to know what the compiler does."""

from __future__ import annotations

from .canonicalize import canonicalize
from .cse import cse
from .dce import dce
from .fold_constants import fold_constants
from .fold_shapes import fold_shapes
from .manager import Pass
from .recognize_activations import recognize_activations
from .recognize_attention import recognize_attention
from .recognize_norms import recognize_norms
from .recognize_rotary import recognize_rotary

# 1. Clean-up: fold the shape arithmetic and constants, share what is computed twice, and bring
#    the graph to canonical forms (MatMul+Add -> linear, transposes folded into weights).
CLEANUP: list[Pass] = [fold_shapes, fold_constants, cse, canonicalize, fold_constants, cse, dce]

# 2. Recognition: the primitive spellings of norms, activations, rotary embeddings and attention
#    become single ops.
RECOGNITION: list[Pass] = [recognize_norms, recognize_activations, recognize_rotary,
                           recognize_attention, dce]


def default_pipeline(target: str = "reference") -> list[Pass]:
    return CLEANUP + RECOGNITION
