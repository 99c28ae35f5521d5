"""llmc: a compiler for Transformer language models.

    graph = llmc.from_onnx("model.onnx")
    outputs = llmc.run_reference(graph, {"input_ids": ids, ...})

Importing llmc is cheap: torch, onnx, onnxruntime, tvm and triton are imported only by the
functions that use them.
"""

from __future__ import annotations

__version__ = "0.1.0"


def from_onnx(path):
    """Load an ONNX model as an IR graph (`llmc.ir.Graph`)."""
    from .frontends.onnx import from_onnx as _from_onnx

    return _from_onnx(path)


def run_reference(graph, feeds, **kwargs):
    """Run `graph` with the numpy reference ops; feeds and results are dicts of numpy arrays
    keyed by the model's input and output names."""
    from llmc.ir.evaluate import run_reference as _run

    return _run(graph, feeds, **kwargs)


def compile(onnx_path, target="cpu", output=None, **options):  # noqa: A001
    """Compile the ONNX decoder `onnx_path` to an artifact directory (`output`, by default the
    file's name with .llmc); returns its path. A decoder exported without a KV cache gets one.
    The keywords make a `CompileOptions` (`llmc.options`), as the CLI's flags do.

    The tokenizer and configs beside the file (or in the folder `tokenizer`) are bundled: the
    artifact then takes and gives text, and stops at the end-of-sequence tokens the configs name
    (`eos_token_id` overrides them).

    `quant`: "w8" (int8 weights, one scale per output channel) or "w4" (4-bit weights in groups of
    `group_size` input features, symmetric or with `zero_point`); the LM head is encoded as
    `lm_head` says ("f32", "w8", "w4"; default "w8"), the token embedding as `embedding` says
    ("w8", the default: int8 rows, a scale per row; or "f32"). With `awq`, 4-bit weights are scaled by
    their activations first, measured on `calibration` token ids or on the text of the file
    `calibration_text` (its first tokens, up to `CALIBRATION_TOKENS`), by default on an English
    sample llmc ships (`llmc/data/calibration-en.txt`); a model without a tokenizer calibrates on
    ids drawn from its vocabulary, with a warning. See `llmc.passes.quantize_weights` and
    `llmc.passes.awq`.

    `activations`: "int8" (the quantized GEMMs quantize their input to int8 in blocks of 32 and
    multiply integers; the default on cpu) or "f32" (they dequantize the weights and multiply in
    f32; the only choice on cuda, and the default on a CPU without integer dot products). See
    `llmc.passes.quantize_activations`.

    `kv_cache`: "f32", "f16" (cuda), or "int8" (one scale per head and token, dequantized inside
    attention); default f16 on cuda with --dtype fp16, else f32. `kv_layout`: the caches' axis
    order, "bhsd" ([batch, kv_heads, seq, head_dim]) or "bshd", or "auto": the backend's cost
    model (`llmc.backends.cache_layout.kv_layout`).

    `max_seq_len`: the longest context (prompt and new tokens) the artifact runs.

    `target`, one of `llmc.backends.BACKENDS`: `cpu` (TVM kernels for this machine's CPU),
    `arm64` (TVM kernels for an aarch64 CPU, cross-compiled: see `llmc.toolchain`), `cuda`
    (Triton kernels, compiled to cubins for the architectures in `arch`, by default sm_80 and
    sm_90; no GPU is needed to compile), `opencl` or `metal` (TVM GPU kernels). `dtype`: the GEMM
    weights' precision, "fp32" or "fp16" (GPU targets; default fp16 on cuda, else fp32); sums are
    f32. What each target accepts and defaults to is its backend's (`Backend.resolve`).

    `tune`: measure the knobs of every kernel not yet in the user's tuning cache on this machine,
    within `tune_budget` seconds (`llmc.tuning`); kernels in the cache, or in the tuning tables
    `tuning` (files exported by `llmc tune --export`), are built with their recorded
    configuration in any case.

    `cpu`: with target "cpu", "native" (this machine's CPU: the fastest code, for this kind of CPU
    only; the default), or a portable x86-64 level ("x86-64-v3", "x86-64-v4") for an artifact
    shipped to other machines; with "arm64", "generic" (NEON only; the default) or a CPU whose
    instructions the kernels may use ("cortex-a55", "cortex-a76", "neoverse-v1", "apple-m1", ...:
    `llmc.backends.tvm.target.ARM64_CPUS`)."""
    from .driver import compile as _compile
    from .options import CompileOptions

    return _compile(onnx_path, CompileOptions.of(target=target, **options), output)


def __getattr__(name):  # llmc.CompileOptions without importing the options at `import llmc`
    if name in ("CompileOptions", "QuantSpec"):
        from . import options

        return getattr(options, name)
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")


__all__ = ["CompileOptions", "QuantSpec", "__version__", "compile", "from_onnx", "run_reference"]
