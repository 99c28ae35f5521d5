"""`llmc bench`: prefill latency and decode speed of llmc against its peers, in one process.

For a zoo model (or an ONNX decoder with KV cache) it compiles an artifact, then measures in
interleaved rounds, batch 1: the prefill of a prompt and decode over new tokens, for llmc,
onnxruntime (its full graph optimizations) and, for zoo models, PyTorch eager on the same
weights; with `quant`, also llmc's quantized artifacts and onnxruntime's quantized models of the
same file (whose weight bytes are counted as llmc's for the same scheme). It reports medians,
each decode speed as a fraction of the bandwidth roofline (the weight bytes every decode step
reads, at the machine's measured streaming-read bandwidth) and
llmc's runtime overhead per decode step (time outside the kernels) and its time per kernel. llmc's prefill computes the
logits of the last position only, as generation does; its prefill with every position's logits
(the work the peers' graphs do) is reported beside it.
"""

from __future__ import annotations

import collections
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# pause before each system runs: the previous one's worker threads spin-wait for a while after
# their last task (TVM's, onnxruntime's and OpenMP's pools all do) and would steal the cores
SETTLE_S = 0.5
PREFILLS = 3  # prefills per system and round (a prefill is short: the median needs several)


def read_bandwidth() -> float:
    """Streaming read GB/s over 2 GiB with every core (torch's sum; numpy's uses one core)."""
    import torch

    a = torch.ones(1 << 29)
    a.sum()
    best = min(_timed(lambda: a.sum()) for _ in range(8))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class _Llmc:
    def __init__(self, artifact, name="llmc"):
        from llmc import runtime

        self.name = name
        self.model = runtime.load(artifact)

    def prefill(self, prompt, last_only=True):
        self.model.executor.reset(batch=1)
        return _timed(lambda: self.model.forward(np.array([prompt]), 0, last_only=last_only))

    def decode(self, prompt, steps):
        return [_timed(lambda i=i: self.model.forward(np.array([[1]]), len(prompt) + i)) for i in range(steps)]

    def profile(self, prompt, steps) -> dict:
        """Time per kernel (summed over its calls) in a prefill of `prompt` and per decode step
        after it (mean over `steps`), and the fraction of decode time spent outside the kernels.
        The first run of each binds the calls and is not counted."""
        ex = self.model.executor
        kernels = ex.functions
        spent, calls = collections.defaultdict(float), collections.Counter()

        def timing(name, fn):
            def call(*args):
                t = time.perf_counter()
                fn(*args)
                spent[name] += time.perf_counter() - t
                calls[name] += 1
            return call
        ex.set_functions({k: timing(k, f) for k, f in kernels.items()})
        try:
            self.prefill(prompt)
            spent.clear()
            self.prefill(prompt)
            prefill = dict(spent)
            self.model.forward(np.array([[1]]), len(prompt))
            spent.clear()
            calls.clear()
            total = sum(_timed(lambda i=i: self.model.forward(np.array([[1]]), len(prompt) + 1 + i))
                        for i in range(steps))
        finally:
            ex.set_functions(kernels)
        table = [{"kernel": k, "calls_per_step": calls[k] // steps, "prefill_ms": round(prefill.get(k, 0) * 1e3, 3),
                  "decode_ms": round(spent[k] / steps * 1e3, 3)} for k in sorted(spent, key=spent.get, reverse=True)]
        return {"overhead": 1 - sum(spent.values()) / total, "kernels": table}


class _OnnxRuntime:
    def __init__(self, path, cfg, threads, name="onnxruntime"):
        import onnxruntime as ort

        self.name = name
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.kv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                   cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers)

    def _run(self, ids, past_len, past):
        total = past_len + ids.shape[1]
        return self.session.run(None, {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                                       "position_ids": np.arange(past_len, total)[None], **past})

    def _empty(self):
        heads, dim, layers = self.kv
        return {f"past_key_values.{i}.{k}": np.zeros((1, heads, 0, dim), np.float32)
                for i in range(layers) for k in ("key", "value")}

    def prefill(self, prompt):
        return _timed(lambda: self._run(np.array([prompt]), 0, self._empty()))

    def decode(self, prompt, steps):
        outs = self._run(np.array([prompt]), 0, self._empty())
        times = []
        for i in range(steps):
            past = {n.replace("present", "past_key_values"): v for n, v in zip(self.names[1:], outs[1:])}
            t = time.perf_counter()
            outs = self._run(np.array([[1]]), len(prompt) + i, past)
            times.append(time.perf_counter() - t)
        return times


class _TorchEager:
    name = "pytorch eager"

    def __init__(self, zoo_model):
        import torch

        self.torch = torch
        self.model = zoo_model.build_torch()

    def prefill(self, prompt):
        with self.torch.no_grad():
            return _timed(lambda: self.model(self.torch.tensor([prompt]), use_cache=True))

    def decode(self, prompt, steps):
        torch = self.torch
        with torch.no_grad():
            cache = self.model(torch.tensor([prompt]), use_cache=True).past_key_values
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                cache = self.model(torch.tensor([[1]]), past_key_values=cache, use_cache=True).past_key_values
                times.append(time.perf_counter() - t)
        return times


def decode_weight_bytes(graph) -> int:
    """Bytes of weights every decode step reads: the GEMMs' weights, with their scales and
    zeros when quantized (4-bit values pack two per byte; the embedding table is gathered one
    row at a time)."""
    total = 0
    for n in graph.nodes:
        if n.op == "fused_linear":
            w = graph.const_value(n.inputs[1]).nbytes
            total += w // 2 if n.attrs["quant"] == "w4" else w
            total += sum(graph.const_value(v).nbytes for v in n.inputs[6:] if v is not None)
    return int(total)


QUANT_MODES = {"w8": {"quant": "w8"}, "w4": {"quant": "w4", "group_size": 128}}


def quantized_onnx(path: Path, quant: str, out: Path) -> Path:
    """onnxruntime's own quantized model of the same file: dynamic int8 (per channel) for w8,
    MatMulNBits 4-bit (symmetric, blocks of 128, int8 compute: accuracy level 4, its fastest)
    for w4."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if quant == "w8":
        quantize_dynamic(path, out, per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True)
    else:
        q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=128, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=True)
    return out


def bench(model: str, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 3,
          threads: int | None = None, quant: tuple[str, ...] = ()) -> dict:
    """With `quant` (modes of QUANT_MODES), llmc's quantized artifacts and onnxruntime's
    quantized models of the same file run too, as "llmc w8", "onnxruntime w8", ..."""
    import os

    import llmc
    from llmc import zoo
    from llmc.passes.manager import PassContext, run_passes
    from llmc.passes.pipeline import default_pipeline

    threads = threads or os.cpu_count()
    zoo_model = zoo.ZOO.get(model)
    path = zoo_model.export() if zoo_model else Path(model)
    cfg = zoo_model.config() if zoo_model else None
    max_seq = prompt_len + new_tokens + 1
    with tempfile.TemporaryDirectory() as tmp:
        log.info("compiling %s", path)
        artifact = llmc.compile(path, output=Path(tmp) / "model.llmc", max_seq_len=max_seq)
        graph = run_passes(llmc.from_onnx(path), default_pipeline(), PassContext(options={"max_seq_len": max_seq}))
        weight_bytes = {"": decode_weight_bytes(graph)}
        systems = [_Llmc(artifact)]
        if cfg is not None:
            systems.append(_OnnxRuntime(path, cfg, threads))
            systems.append(_TorchEager(zoo_model))
        for q in quant:
            options = QUANT_MODES[q]
            log.info("compiling %s (%s)", path, q)
            art = llmc.compile(path, output=Path(tmp) / f"model-{q}.llmc", max_seq_len=max_seq, **options)
            passed = run_passes(llmc.from_onnx(path), default_pipeline(),
                                PassContext(options={"max_seq_len": max_seq, **options}))
            weight_bytes[q] = decode_weight_bytes(passed)
            systems.append(_Llmc(art, f"llmc {q}"))
            if cfg is not None:
                log.info("quantizing %s with onnxruntime (%s)", path, q)
                onnx_q = quantized_onnx(path, q, Path(tmp) / f"ort-{q}.onnx")
                systems.append(_OnnxRuntime(onnx_q, cfg, threads, f"onnxruntime {q}"))
        prompt = list(np.random.default_rng(0).integers(1, 100, prompt_len))
        results = {s.name: {"prefill_s": [], "decode_step_s": []} for s in systems}
        all_logits = []  # llmc's prefill computing every position's logits, as the peers do
        for round_ in range(repeats):
            for s in systems:
                log.info("round %d: %s", round_ + 1, s.name)
                time.sleep(SETTLE_S)
                results[s.name]["prefill_s"] += [s.prefill(prompt) for _ in range(PREFILLS)]
                results[s.name]["decode_step_s"] += s.decode(prompt, new_tokens)
            time.sleep(SETTLE_S)
            all_logits += [systems[0].prefill(prompt, last_only=False) for _ in range(PREFILLS)]
        time.sleep(SETTLE_S)
        profile = systems[0].profile(prompt, min(16, new_tokens - 1))
        bandwidth = read_bandwidth()
    out = {"model": model, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
           "threads": threads, "read_bandwidth_gbs": round(bandwidth, 1),
           "decode_weight_mb": round(weight_bytes[""] / 1e6, 1), "systems": {}}
    for name, r in results.items():
        step = statistics.median(r["decode_step_s"])
        mode = name.split(" ")[-1] if name.split(" ")[-1] in QUANT_MODES else ""
        out["systems"][name] = {
            "prefill_ms": round(statistics.median(r["prefill_s"]) * 1e3, 2),
            "decode_tok_s": round(1 / step, 2),
            "decode_weight_mb": round(weight_bytes[mode] / 1e6, 3),
            "decode_roofline": float(f"{weight_bytes[mode] / step / 1e9 / bandwidth:.3g}"),
        }
    out["systems"]["llmc"]["runtime_overhead"] = round(profile["overhead"], 3)
    out["llmc_kernels"] = profile["kernels"]
    out["systems"]["llmc"]["prefill_all_logits_ms"] = round(statistics.median(all_logits) * 1e3, 2)
    return out


def format_table(result: dict) -> str:
    lines = [f"{result['model']}: prompt {result['prompt_len']}, {result['new_tokens']} new tokens, batch 1, "
             f"{result['threads']} threads; read bandwidth {result['read_bandwidth_gbs']} GB/s; "
             f"{result['decode_weight_mb']} MB of weights per decode step",
             "| system | prefill ms | decode tok/s | weights read per step | % of roofline |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in result["systems"].items():
        lines.append(f"| {name} | {r['prefill_ms']} | {r['decode_tok_s']} | {r['decode_weight_mb']} MB | "
                     f"{r['decode_roofline']:.0%} |")
    llmc = result["systems"]["llmc"]
    lines.append(f"llmc prefill computes the last position's logits (what generation reads); with every "
                 f"position's, as the peers' graphs do: {llmc['prefill_all_logits_ms']} ms")
    lines.append(f"llmc runtime overhead per decode step: {llmc['runtime_overhead']:.1%}")
    lines += ["", "llmc, time per kernel (all its calls):", "| kernel | calls per step | prefill ms | decode ms per step |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {k['kernel']} | {k['calls_per_step']} | {k['prefill_ms']} | {k['decode_ms']} |"
              for k in result["llmc_kernels"][:12]]
    return "\n".join(lines)
