"""The compile driver behind `llmc.compile`: ONNX file in, artifact out (import, pass pipeline,
kernels, plan, artifact)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import model_files
from .errors import LlmcError
from .options import CompileOptions

log = logging.getLogger(__name__)

def compile(onnx_path, options: CompileOptions, output=None) -> Path:  # noqa: A001
    """Compile the ONNX decoder `onnx_path` as `options` ask (`llmc.compile` documents them) to
    an artifact directory, `output` or the file's name with .llmc; returns its path."""
    from llmc.backends.plan import UnsupportedGraph, encode_dim
    from llmc.passes.manager import PassContext, run_passes
    from llmc.passes.pipeline import default_pipeline

    from .artifact_writer import write_artifact
    from .frontends.onnx import from_onnx
    from .tuning import Table, Tuner

    options = options.resolved()
    backend = options.backend()
    if options.tune and backend.can_measure(options):
        raise LlmcError(f"--tune: {backend.can_measure(options)}")
    tables = {path: Table.load(path) for path in options.tuning}  # a bad file is refused before any work
    tuner = Tuner(backend.machine(options), measure=options.tune, budget=options.tune_budget, imports=tables)
    onnx_path = Path(onnx_path)
    output = Path(output) if output else onnx_path.with_suffix(".llmc")
    if not output.parent.is_dir():
        raise LlmcError(f"{output}: the folder {output.parent} does not exist")
    files = model_files.find(Path(options.tokenizer) if options.tokenizer else onnx_path.parent)
    if options.tokenizer and model_files.TOKENIZER not in files:
        raise LlmcError(f"{options.tokenizer}: no {model_files.TOKENIZER} there")
    if model_files.TOKENIZER in files:
        model_files.check_tokenizer(files[model_files.TOKENIZER])
    eos = [options.eos_token_id] if options.eos_token_id is not None else model_files.eos_token_ids(files)
    if options.quant and options.quant.awq and not options.quant.calibration:
        ids = _calibration_ids(options.quant.calibration_text, files.get(model_files.TOKENIZER), options.max_seq_len)
        options = options.with_quant(calibration=tuple(ids) if ids else None, calibration_text=None)
    from .progress import bar

    stages = []
    start = time.perf_counter()
    shown = bar(total=4, desc=f"compiling {onnx_path.name}: import")
    graph = from_onnx(onnx_path, decoder=True)
    stages.append(("import", time.perf_counter() - start))
    shown.update()
    shown.set_description(f"compiling {onnx_path.name}: passes")
    try:  # a decoder exported without a cache gets one (passes/synthesize_kv_cache.py)
        graph = run_passes(graph, default_pipeline(),
                           PassContext(options=options, synthesize_kv_cache=not graph.metadata["kv_pairs"]))
    except LlmcError as e:
        raise LlmcError(f"{onnx_path}: {e}") from None
    stages.append(("passes", time.perf_counter() - start - sum(t for _, t in stages)))
    shown.update()
    shown.set_description(f"compiling {onnx_path.name}: kernels ({backend.name})")
    if options.tune:
        tuner.progress = bar(desc="tuning kernels")
    try:
        build = backend.build(graph, options, tuner)
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
