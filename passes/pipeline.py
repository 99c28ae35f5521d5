"""The pass pipeline, in order. Read it top to bottom to know what the compiler does."""

from __future__ import annotations

from .awq import awq
from .canonicalize import canonicalize
from .cse import cse
from .dce import dce
from .fuse_add_norm import fuse_add_norm
from .fuse_attention_io import fuse_attention_io
from .fuse_linear import fuse_linear
from .fuse_qkv import fuse_qkv
from .half_weights import half_weights
from .kv_cache import kv_cache
from .fold_constants import fold_constants
from .fold_shapes import fold_shapes
from .manager import Pass
from .specialize_context import specialize_context
from .synthesize_kv_cache import synthesize_kv_cache
from .recognize_activations import recognize_activations
from .recognize_attention import recognize_attention
from .recognize_norms import recognize_norms
from .quantize_activations import quantize_activations
from .quantize_weights import quantize_weights
from .recognize_rotary import recognize_rotary

# 1. Clean-up: specialize for the context length (when given), fold the shape arithmetic and
#    constants, share what is computed twice, and bring the graph to canonical forms
#    (MatMul+Add -> linear, transposes folded into weights).
CLEANUP: list[Pass] = [specialize_context, fold_shapes, fold_constants, cse, canonicalize, fold_constants, cse, dce]

# 2. Recognition: the primitive spellings of norms, activations, rotary embeddings and attention
#    become single ops.
RECOGNITION: list[Pass] = [recognize_norms, recognize_activations, recognize_rotary,
                           recognize_attention, dce]


# 3. KV cache: a decoder exported without one gets one (when the driver asks); the export's
#    concat(past, new) becomes a write into a runtime-owned cache.
KV_CACHE: list[Pass] = [synthesize_kv_cache, kv_cache]

# 4. Fusion: sibling GEMMs merge (QKV, gate/up); rotary + cache write and the head split/merge
#    fuse around attention; norms become GEMM prologues, bias/activation/gate/residual their
#    epilogues; residual adds left over fuse with the norm that follows.
FUSION: list[Pass] = [fuse_qkv, fuse_attention_io, fuse_linear, fuse_add_norm, dce]


# 5. Lowering: with the `quant` option, GEMM weights are quantized (w8, w4); with `awq` too,
#    4-bit weights are first scaled by their activations' size. With `activations` int8 (the
#    cpu target's default), the quantized GEMMs take int8 activations and multiply integers;
#    else the kernels dequantize the weights to f32. With `dtype` fp16 (GPUs), the weights left
#    in f32 go to f16.
LOWERING: list[Pass] = [awq, quantize_weights, quantize_activations, half_weights, dce]


def default_pipeline() -> list[Pass]:
    """Every target's passes: what differs between targets comes in as options (`activations`,
    `dtype`), chosen by the driver for its target."""
    return CLEANUP + RECOGNITION + KV_CACHE + FUSION + LOWERING
