"""The compile driver behind `llmc.compile`: ONNX file in, artifact out (import, pass pipeline,
kernels, plan, artifact)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import model_files
from .errors import LlmcError

log = logging.getLogger(__name__)

def compile(onnx_path, target: str = "cpu", output=None, max_seq_len: int = 1024,
            eos_token_id: int | None = None, quant: str | None = None, group_size: int = 128,
            zero_point: bool = False, lm_head: str | None = None, embedding: str | None = None, awq: bool = False,
            calibration: list[int] | None = None, calibration_text=None, kv_cache: str | None = None,
            cpu: str | None = None,
            tokenizer=None, dtype: str | None = None, arch: str = "sm_80,sm_90",
            activations: str | None = None, tune: bool = False, tune_budget: float | None = None,
            tuning: list | tuple = (), kv_layout: str = "auto") -> Path:  # noqa: A001
    """Compile an ONNX decoder to an artifact directory; returns its path. A decoder exported
    without a KV cache gets one.

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
    model (`llmc.backends.plan.kv_layout`).

    `target`: "cpu" (TVM kernels for this machine's CPU), "arm64" (TVM kernels for an aarch64
    CPU, cross-compiled: see `llmc.toolchain`) or "cuda" (Triton kernels, compiled to cubins for the
    architectures in `arch`, e.g. "sm_80,sm_90"; no GPU is needed to compile). `dtype`: the GEMM
    weights' precision, "fp32" or "fp16" (cuda only; default fp16 there, fp32 on cpu); sums are f32.

    `tune`: measure the knobs of every kernel not yet in the user's tuning cache on this machine,
    within `tune_budget` seconds (`llmc.tuning`); kernels in the cache, or in the tuning tables
    `tuning` (files exported by `llmc tune --export`), are built with their recorded
    configuration in any case.

    `cpu`: with target "cpu", "native" (this machine's CPU: the fastest code, for this kind of CPU
    only; the default), or a portable x86-64 level ("x86-64-v3", "x86-64-v4") for an artifact
    shipped to other machines; with "arm64", "generic" (NEON only; the default) or a CPU whose
    instructions the kernels may use ("cortex-a55", "cortex-a76", "neoverse-v1", "apple-m1", ...:
    `llmc.backends.tvm.target.ARM64_CPUS`)."""
    from llmc import backends
    from llmc.backends.plan import UnsupportedGraph, encode_dim
    from llmc.passes.manager import PassContext, run_passes
    from llmc.passes.pipeline import default_pipeline

    from .artifact_writer import write_artifact
    from .frontends.onnx import from_onnx

    if target not in backends.BACKENDS:
        raise LlmcError(f"target {target!r} is not supported yet; supported: {', '.join(backends.BACKENDS)}")
    dtype = dtype or ("fp16" if target == "cuda" else "fp32")
    kv_cache = kv_cache or ("f16" if dtype == "fp16" and target == "cuda" else "f32")  # as documented above
    backend = backends.for_target(target)
    backend_options = {"cpu": cpu or getattr(backend, "default_cpu", None), "dtype": dtype, "kv_cache": kv_cache, "arch": arch, "activations": activations, "kv_layout": kv_layout}
    backend.check(backend_options)
    if tune and backend.can_measure(backend_options):
        raise LlmcError(f"--tune: {backend.can_measure(backend_options)}")
    if tune_budget is not None and tune_budget <= 0:
        raise LlmcError(f"--tune-budget {tune_budget}: the budget must be a positive number of seconds")
    from .tuning import Table, Tuner

    tables = {path: Table.load(path) for path in tuning}  # a bad file is refused before any work
    activations = backend_options["activations"] = activations or backend.default_activations(backend_options)
    tuner = backend_options["tuner"] = Tuner(backend.machine(backend_options), measure=tune, budget=tune_budget,
                                             imports=tables)
    options = {"max_seq_len": max_seq_len, "dtype": dtype, "activations": activations}
    if quant:
        from llmc.ops.transformer import QUANT_SCHEMES

        if quant not in QUANT_SCHEMES:
            raise LlmcError(f"quantization {quant!r} is not supported; supported: {', '.join(QUANT_SCHEMES)}")
        if group_size not in (32, 64, 128):
            raise LlmcError(f"group size {group_size} is not supported; supported: 32, 64, 128")
        if lm_head not in (None, "f32", *QUANT_SCHEMES):
            raise LlmcError(f"LM head encoding {lm_head!r} is not supported; supported: f32, {', '.join(QUANT_SCHEMES)}")
        embedding = embedding or "w8"
        if embedding not in ("f32", "w8"):
            raise LlmcError(f"embedding encoding {embedding!r} is not supported; supported: f32, w8")
        options.update(quant=quant, group_size=group_size, zero_point=zero_point, lm_head=lm_head,
                       embedding=embedding, awq=awq)
    elif lm_head or zero_point or calibration or calibration_text or embedding not in (None, "f32"):
        raise LlmcError("--lm-head, --embedding, --zero-point, --calibration-ids and --calibration-text apply with "
                        "--quant")
    if (awq or calibration or calibration_text) and quant != "w4":
        raise LlmcError("--awq, --calibration-ids and --calibration-text apply to --quant w4")
    if (calibration or calibration_text) and not awq:
        raise LlmcError("--calibration-ids and --calibration-text calibrate --awq: add it")
    if calibration and calibration_text:
        raise LlmcError("give --calibration-ids or --calibration-text, not both")
    onnx_path = Path(onnx_path)
    output = Path(output) if output else onnx_path.with_suffix(".llmc")
    if not output.parent.is_dir():
        raise LlmcError(f"{output}: the folder {output.parent} does not exist")
    files = model_files.find(Path(tokenizer) if tokenizer else onnx_path.parent)
    if tokenizer and model_files.TOKENIZER not in files:
        raise LlmcError(f"{tokenizer}: no {model_files.TOKENIZER} there")
    if model_files.TOKENIZER in files:
        model_files.check_tokenizer(files[model_files.TOKENIZER])
    eos = [eos_token_id] if eos_token_id is not None else model_files.eos_token_ids(files)
    if awq:
        options["calibration"] = calibration or _calibration_ids(calibration_text, files.get(model_files.TOKENIZER),
                                                                 max_seq_len)
    from .progress import bar

    stages = []
    start = time.perf_counter()
    shown = bar(total=4, desc=f"compiling {onnx_path.name}: import")
    graph = from_onnx(onnx_path, decoder=True)
    stages.append(("import", time.perf_counter() - start))
    shown.update()
    shown.set_description(f"compiling {onnx_path.name}: passes")
    # a decoder exported without a cache gets one (passes/synthesize_kv_cache.py)
    options["synthesize_kv_cache"] = not graph.metadata["kv_pairs"]
    try:
        graph = run_passes(graph, default_pipeline(), PassContext(options=options))
    except LlmcError as e:
        raise LlmcError(f"{onnx_path}: {e}") from None
    stages.append(("passes", time.perf_counter() - start - sum(t for _, t in stages)))
    shown.update()
    shown.set_description(f"compiling {onnx_path.name}: kernels ({backend.name})")
    if tune:
        tuner.progress = bar(desc="tuning kernels")
    try:
        build = backend.build(graph, backend_options)
    except UnsupportedGraph as e:
        raise LlmcError(f"{onnx_path}: {e}") from None
    finally:
        if tuner.progress is not None:
            tuner.progress.close()
    tuner.finish()
    stages.append(("kernels", time.perf_counter() - start - sum(t for _, t in stages)))
    shown.update()
    shown.set_description(f"compiling {onnx_path.name}: artifact")
    by_name = {v.name: v for v in graph.values()}
    presents = {e["present"] for e in graph.metadata["kv_cache"]["entries"]}
    names = {a for step in build.plan for a in step.args if a} - set(build.values) - presents
    try:
        values = {n: {"dtype": by_name[n].dtype.numpy().name, "shape": [encode_dim(d, n) for d in by_name[n].shape]}
                  for n in sorted(names - set(build.weights))}  # the weights': as written (write_artifact)
        values.update({n: {"dtype": dt, "shape": [encode_dim(d, n) for d in shape]}
                       for n, (dt, shape) in build.values.items()})
    except UnsupportedGraph as e:
        raise LlmcError(f"{onnx_path}: {e}") from None
    write_artifact(graph, output, build, plans={"forward": [s.to_json() for s in build.plan], "values": values,
                                                "weights": sorted(build.weights)},
                   eos_token_ids=eos, model_files=files)
    stages.append(("artifact", time.perf_counter() - start - sum(t for _, t in stages)))
    shown.update()
    shown.close()
    for name, seconds in stages:
        log.info("%-8s %.1f s", name, seconds)
    return output


CALIBRATION_TOKENS = 512
MIN_CALIBRATION_TOKENS = 64
DEFAULT_CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration-en.txt"


def _calibration_ids(text_path, tokenizer: Path | None, max_seq_len: int) -> list[int] | None:
    """AWQ's calibration tokens: the first tokens of `text_path` (default: the English sample),
    or None (ids drawn from the vocabulary) for a model without a tokenizer."""
    if tokenizer is None:
        if text_path:
            raise LlmcError("--calibration-text needs the model's tokenizer (tokenizer.json beside the model, or "
                            "--tokenizer DIR); or give --calibration-ids")
        log.warning("--awq: the model has no tokenizer, so AWQ calibrates on token ids drawn from the vocabulary, "
                    "not on text; give --calibration-ids (or --tokenizer DIR) for a sound calibration")
        return None
    path = Path(text_path or DEFAULT_CALIBRATION_TEXT)
    text = model_files.read_text(path, "--calibration-text")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer)).encode(text).ids
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise LlmcError(f"--calibration-text {path}: {len(ids)} tokens, too few for calibration (at least "
                        f"{MIN_CALIBRATION_TOKENS})")
    return ids[:min(CALIBRATION_TOKENS, max_seq_len)]
