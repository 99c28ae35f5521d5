"""`llmc quant-report`: what weight quantization costs in quality, against the fp32 model.

On a held-out token sequence, each quantized artifact and the fp32 one run teacher-forced (one
pass over the sequence: every position predicts the next token from the true tokens before it,
through the same KV cache path as decoding). Reported per scheme: the relative error of the
logits (per position ||q - f|| / ||f||: max and mean), the top-1 agreement of the next-token
predictions, and the perplexity of the sequence under each model. The same sequence then runs
token by token through the decode kernels (one row per step: the GEMVs and decode attention,
which are not the prefill's kernels), against the fp32 artifact's decode, and its error and
top-1 agreement are reported too.

The held-out sequence: token ids given by the user, or a text's first tokens (`--text FILE`,
with the tokenizer the model bundles: a real model on real text); for the zoo's trained models, text they never
saw (and their activation-aware scaling calibrates on text they learned from); otherwise a sample
of the fp32 model itself (temperature 1, seeded): random-weight models were trained on nothing,
and a sample is at least text the model finds likely.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from llmc.errors import LlmcError

log = logging.getLogger(__name__)


def _logits(artifact, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every position's logits, teacher-forced: by one prefill, and token by token by decode steps."""
    from llmc import runtime

    model = runtime.load(artifact)
    model.executor.reset(batch=1)
    prefill = np.array(model.forward(np.array([tokens]), past=0)[0], np.float64)
    model.executor.reset(batch=1)
    decode = np.stack([np.array(model.forward(np.array([[t]]), past=i)[0, -1], np.float64)
                       for i, t in enumerate(tokens)])
    return prefill, decode


def _nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood of each next token (positions 0 .. n-2 predict 1 .. n-1)."""
    z = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(tokens) - 1), tokens[1:]]


def compare(fp32: np.ndarray, quant: np.ndarray, tokens: list[int]) -> dict:
    err = np.linalg.norm(quant - fp32, axis=-1) / np.linalg.norm(fp32, axis=-1)
    ppl32, pplq = (float(np.exp(_nll(x, tokens).mean())) for x in (fp32, quant))
    return {"max_rel_err": round(float(err.max()), 5), "mean_rel_err": round(float(err.mean()), 5),
            "top1_agreement": round(float((quant.argmax(-1) == fp32.argmax(-1)).mean()), 4),
            "perplexity_fp32": round(ppl32, 3), "perplexity": round(pplq, 3),
            "perplexity_delta": round(pplq - ppl32, 4)}


def _onnxruntime_logits(path: Path, quant: str, tokens: list[int], tmp: Path) -> np.ndarray:
    """The same teacher-forced pass through onnxruntime's own quantized model of the file (the
    models `llmc bench --quant` measures: dynamic int8, or MatMulNBits 4-bit), and what its
    quantizer changed; no logits when it changed nothing."""
    import onnx

    from .bench import _OnnxRuntime, describe_quantization, quantized_onnx

    class _Config:  # what the session needs to shape an empty past
        def __init__(self, graph):
            past = [i for i in graph.input if i.name.startswith("past_key_values.")]
            dims = past[0].type.tensor_type.shape.dim
            self.num_key_value_heads = self.num_attention_heads = dims[1].dim_value
            self.hidden_size = dims[1].dim_value * dims[3].dim_value
            self.num_hidden_layers = len(past) // 2

    cfg = _Config(onnx.load(str(path), load_external_data=False).graph)
    quantized = quantized_onnx(path, quant, tmp / f"ort-{quant}.onnx")
    described = describe_quantization(quantized)
    if not described["quantized"]:
        return None, described
    session = _OnnxRuntime(quantized, cfg, threads=0)
    return np.array(session._run(np.array([tokens]), 0, session._empty())[0][0], np.float64), described


ONNXRUNTIME_SCHEMES = {"w8": "onnxruntime int8 (dynamic, per channel)", "w4": "onnxruntime 4-bit (MatMulNBits, g128)"}


def report(model: str, schemes: list[dict], tokens: int = 256, token_ids: list[int] | None = None,
           seed: int = 0, onnxruntime: bool = False, text: str | None = None) -> dict:
    """`schemes`: compile options per scheme, e.g. {"quant": "w4", "group_size": 128}. With
    `onnxruntime`, onnxruntime's own quantized models of the same schemes are measured too: what
    another engine's quantization costs on the same sequence. `text`: the held-out sequence is
    its first `tokens` tokens (a model that bundles a tokenizer: a real model on real text)."""
    import llmc
    from llmc import runtime, zoo
    from llmc.passes import awq

    zoo_model = zoo.ZOO.get(model)
    path = zoo_model.export() if zoo_model else Path(model)
    if zoo_model and not token_ids and text is None:
        token_ids = zoo_model.text("held-out", tokens)
        calibration = zoo_model.text("train", awq.CALIBRATION_TOKENS)
        if calibration:
            schemes = [dict(s, calibration=calibration) if s.get("awq") and not s.get("calibration") else s
                       for s in schemes]
    n = len(token_ids) if token_ids else tokens
    with tempfile.TemporaryDirectory() as tmp:
        log.info("compiling %s (fp32)", path)
        base = llmc.compile(path, output=Path(tmp) / "fp32.llmc", max_seq_len=n + 1)
        if text is not None:
            token_ids = runtime.load(base).text.encode(text)[:n]
            if len(token_ids) < 2:
                raise LlmcError(f"--text: {len(token_ids)} tokens; at least 2 are needed")
        if not token_ids:
            rng = np.random.default_rng(seed)
            first = [int(t) for t in rng.integers(1, 100, 4)]
            token_ids = first + runtime.load(base).generate(first, n - len(first), temperature=1.0, seed=seed)
        reference, reference_decode = _logits(base, token_ids)
        rows, notes = [], []
        for i, options in enumerate(schemes):
            log.info("compiling %s (%s)", path, scheme_name(options))
            art = llmc.compile(path, output=Path(tmp) / f"q{i}.llmc", max_seq_len=n + 1, **options)
            prefill, decode = _logits(art, token_ids)
            rows.append({"scheme": scheme_name(options), **compare(reference, prefill, token_ids),
                         "decode": compare(reference_decode, decode, token_ids)})
        for quant in sorted({s["quant"] for s in schemes}, reverse=True) if onnxruntime else []:
            log.info("onnxruntime's %s model of %s", quant, path)
            logits, described = _onnxruntime_logits(path, quant, token_ids, Path(tmp))
            changed = ", ".join(f"{v['count']} {op}" for op, v in described["quantized"].items())
            left = f"{described['float_gemms_left']} float GEMMs left"
            if logits is None:
                notes.append(f"{ONNXRUNTIME_SCHEMES[quant]}: its quantizer changed nothing ({left}); not reported")
                continue
            rows.append({"scheme": f"{ONNXRUNTIME_SCHEMES[quant]}: {changed}, {left}",
                         **compare(reference, logits, token_ids)})
    return {"model": model, "tokens": len(token_ids), "seed": seed, "schemes": rows, "notes": notes}


def scheme_name(options: dict) -> str:
    name = options["quant"]
    if name == "w4":
        name += f" g{options.get('group_size', 128)}" + (" zero-point" if options.get("zero_point") else "")
        name += " AWQ" if options.get("awq") else ""
    if options.get("lm_head"):
        name += f", LM head {options['lm_head']}"
    if options.get("embedding") == "w8":
        name += ", embedding w8"
    if options.get("kv_cache") == "int8":
        name += ", int8 KV"
    if options.get("activations") == "f32":
        name += ", f32 activations"
    return name


def format_table(result: dict) -> str:
    lines = [f"{result['model']}: {result['tokens']} held-out tokens, teacher-forced, against fp32",
             "(prefill: one pass; decode: token by token, against the fp32 artifact's decode)",
             "| scheme | max rel. logits error | mean rel. logits error | top-1 agreement | perplexity (fp32 -> q) "
             "| decode: mean rel. error | decode: top-1 agreement |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["schemes"]:
        decode = r.get("decode")
        lines.append(f"| {r['scheme']} | {r['max_rel_err']:.4f} | {r['mean_rel_err']:.4f} | "
                     f"{r['top1_agreement']:.1%} | {r['perplexity_fp32']} -> {r['perplexity']} "
                     f"({r['perplexity_delta']:+.3f}) | " +
                     (f"{decode['mean_rel_err']:.4f} | {decode['top1_agreement']:.1%} |" if decode else "- | - |"))
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)
