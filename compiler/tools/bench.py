"""`llmc bench`: prefill latency and decode speed of llmc against its peers.

For a zoo model (or an ONNX decoder with KV cache) it compiles an artifact, then measures in
interleaved rounds, batch 1, the same threads for every system: the prefill of a prompt and
decode over new tokens, for llmc, onnxruntime (its full graph optimizations) and, for zoo
models, PyTorch eager and torch.compile (inductor) on the same weights; with `quant`, also llmc's quantized artifacts and
onnxruntime's quantized models of the same file (what its quantizer changed is reported, and a
model it left unchanged is not labelled as quantized) and, for the zoo's Llama-family models,
llama.cpp's q8_0 and q4_0 of the same weights (Llama and GPT-2: `llama_cpp.py`), in a
process of its own.

llmc runs as a user gets it: each artifact in a process of its own that loads it with the
runtime alone and never imported the compiler (`runtime_worker.py`). The peers run in this
process. The report gives medians; each decode speed as a fraction of the bandwidth roofline
(the weight bytes every decode step reads, at the best streaming-read bandwidth measured before
and after the systems: `bandwidth.py`; a share above 100% is flagged as a measurement
problem); whether each system's greedy tokens agree with onnxruntime's at this size; llmc's
runtime overhead per decode step and its time per kernel. llmc's prefill computes the last
position's logits, as generation does; the like-for-like figure, with every position's logits
as the peers' graphs compute them, is reported beside it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from . import llama_cpp
from .worker import Worker

log = logging.getLogger(__name__)

# pause before each system runs: the previous one's worker threads spin-wait for a while after
# their last task (TVM's, onnxruntime's and OpenMP's pools all do) and would steal the cores
SETTLE_S = 0.5
PREFILLS = 3  # prefills per system and round (a prefill is short: the median needs several)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class _Llmc:
    """An artifact in a runtime worker process; the same calls as the peers."""

    def __init__(self, artifact, threads, name="llmc"):
        self.name = name
        self.worker = Worker("llmc.tools.runtime_worker", artifact, threads, what=artifact)
        self.threads, self.compiler_modules = self.worker.hello["threads"], self.worker.hello["compiler_modules"]
        self.close = self.worker.close

    def prefill(self, prompt, last_only=True):
        return self.worker.ask("prefill", prompt=prompt, last_only=last_only)

    def decode(self, prompt, steps):
        self.prefill(prompt)
        return self.worker.ask("decode", prompt_len=len(prompt), steps=steps)

    def generate(self, prompt, steps):
        return self.worker.ask("generate", prompt=prompt, steps=steps)

    def profile(self, prompt, steps):
        return self.worker.ask("profile", prompt=prompt, steps=steps)


@contextlib.contextmanager
def _own_tuning_table(path: Path):
    """The user's tuning table set aside while the benchmark compiles (`llmc.tuning`)."""
    import os

    before = os.environ.get("LLMC_TUNING_CACHE")
    os.environ["LLMC_TUNING_CACHE"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["LLMC_TUNING_CACHE"]
        else:
            os.environ["LLMC_TUNING_CACHE"] = before


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

    def _present(self, outs):
        return {n.replace("present", "past_key_values"): v for n, v in zip(self.names[1:], outs[1:])}

    def generate(self, prompt, steps):
        outs, tokens = self._run(np.array([prompt]), 0, self._empty()), []
        for i in range(steps):
            tokens.append(int(outs[0][0, -1].argmax()))
            if i + 1 < steps:
                outs = self._run(np.array([tokens[-1:]]), len(prompt) + i, self._present(outs))
        return tokens

    def decode(self, prompt, steps):
        outs = self._run(np.array([prompt]), 0, self._empty())
        times = []
        for i in range(steps):
            past = self._present(outs)
            t = time.perf_counter()
            outs = self._run(np.array([[1]]), len(prompt) + i, past)
            times.append(time.perf_counter() - t)
        return times


class _TorchEager:
    name = "pytorch eager"

    def __init__(self, zoo_model, threads):
        import torch

        torch.set_num_threads(threads)
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

    def generate(self, prompt, steps):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([prompt]), use_cache=True)
            tokens = []
            for i in range(steps):
                tokens.append(int(out.logits[0, -1].argmax()))
                if i + 1 < steps:
                    out = self.model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        return tokens


class _TorchCompiled(_TorchEager):
    """The same model with its forward under `torch.compile` (inductor, default options),
    compiled before it is timed: a prefill and decode steps at two lengths, so the decode
    graph is the dynamic-length one."""

    name = "torch.compile"

    def __init__(self, zoo_model, threads, prompt_len):
        super().__init__(zoo_model, threads)
        self.model.forward = self.torch.compile(self.model.forward)
        log.info("compiling the model with torch.compile")
        self.decode(list(range(1, prompt_len + 1)), 3)


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


QUANTIZED_OPS = {"MatMulInteger": "int8 weights, int8 activations quantized per tensor at run time",
                 "DynamicQuantizeMatMul": "int8 weights, int8 activations quantized per tensor at run time",
                 "MatMulNBits": "4-bit weights in blocks of 128; activations quantized to int8 per block "
                                "inside the op (accuracy level 4)"}


def describe_quantization(path: Path) -> dict:
    """What onnxruntime's quantizer changed: its quantized ops by kind, with what they do, and
    the float GEMMs it left (MatMul and Gemm with a constant weight)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {i.name for i in graph.initializer}
    ops = collections.Counter(n.op_type for n in graph.node)
    left = sum(1 for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts)
    return {"quantized": {op: {"count": ops[op], "what": what} for op, what in QUANTIZED_OPS.items() if ops[op]},
            "float_gemms_left": left}


def _llama_cpp_peer(zoo_model, quant, notes: list) -> bool:
    """Whether llama.cpp runs as a quantized peer: a Llama-family zoo model, with --quant, and
    llama.cpp installed (else a note says why not)."""
    if not quant:
        return False
    why = llama_cpp.available()
    if why is None and (zoo_model is None or zoo_model.family not in llama_cpp.LAYOUTS):
        why = (f"llama.cpp runs on the zoo's {' and '.join(llama_cpp.LAYOUTS)} models (written as GGUF by "
               "llmc.tools.llama_cpp)")
    if why:
        notes.append(f"llama.cpp not measured: {why}")
    return why is None


def bench(model: str, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 3,
          threads: int | None = None, quant: tuple[str, ...] = (), tuned: bool = False) -> dict:
    """With `quant` (modes of QUANT_MODES), llmc's quantized artifacts and onnxruntime's
    quantized models of the same file run too, as "llmc w8", "onnxruntime w8", ...; with
    `tuned`, every llmc artifact also compiled with `--tune`, as "llmc tuned", "llmc w8 tuned",
    ... The tuning table is the run's own: the default artifacts are the defaults, and the
    tuning time is what tuning from nothing costs."""
    import os

    import llmc
    from llmc import zoo
    from llmc.passes.manager import PassContext, run_passes
    from llmc.options import CompileOptions
    from llmc.passes.pipeline import default_pipeline

    from .bandwidth import read_bandwidth

    threads = threads or len(os.sched_getaffinity(0))
    zoo_model = zoo.ZOO.get(model)
    path = zoo_model.export() if zoo_model else Path(model)
    cfg = zoo_model.config() if zoo_model else None
    max_seq = prompt_len + new_tokens + 1
    notes, quantization = [], {}
    tuning_s = {}
    with tempfile.TemporaryDirectory() as tmp, _own_tuning_table(Path(tmp) / "tuning.json"):
        def artifacts(mode: str, options: dict) -> list:
            """llmc's systems for one weight encoding: the default artifact, and the tuned one."""
            suffix = f" {mode}" if mode else ""
            log.info("compiling %s%s", path, suffix)
            out = [_Llmc(llmc.compile(path, output=Path(tmp) / f"model{mode}.llmc", max_seq_len=max_seq, **options),
                         threads, f"llmc{suffix}")]
            if tuned:
                log.info("compiling %s%s with --tune", path, suffix)
                start = time.perf_counter()
                art = llmc.compile(path, output=Path(tmp) / f"model{mode}-tuned.llmc", max_seq_len=max_seq,
                                   tune=True, **options)
                tuning_s[f"llmc{suffix} tuned"] = round(time.perf_counter() - start, 1)
                out.append(_Llmc(art, threads, f"llmc{suffix} tuned"))
            return out

        graph = run_passes(llmc.from_onnx(path), default_pipeline(), PassContext(options=CompileOptions(max_seq_len=max_seq)))
        weight_bytes = {"": decode_weight_bytes(graph)}
        systems = artifacts("", {})
        if cfg is not None:
            systems.append(_OnnxRuntime(path, cfg, threads))
            eager = _TorchEager(zoo_model, threads)
            systems += [eager, _TorchCompiled(zoo_model, threads, prompt_len)]
        peer_cpp = _llama_cpp_peer(zoo_model, quant, notes)
        if peer_cpp:
            gguf_f32 = llama_cpp.write_gguf(eager.model, Path(tmp) / "model-f32.gguf")
        for q in quant:
            options = QUANT_MODES[q]
            passed = run_passes(llmc.from_onnx(path), default_pipeline(),
                                PassContext(options=CompileOptions.of(max_seq_len=max_seq, **options)))
            weight_bytes[q] = decode_weight_bytes(passed)
            systems += artifacts(q, options)
            if peer_cpp:
                ftype = llama_cpp.FOR_QUANT[q]
                log.info("quantizing %s with llama.cpp (%s)", path, ftype)
                quantized = llama_cpp.quantize(gguf_f32, Path(tmp) / f"model-{ftype}.gguf", ftype, threads)
                weight_bytes[f"llama.cpp {ftype}"] = llama_cpp.decode_weight_bytes(quantized)
                systems.append(llama_cpp.LlamaCpp(quantized, threads, f"llama.cpp {ftype}", max_seq))
            if cfg is not None:
                log.info("quantizing %s with onnxruntime (%s)", path, q)
                onnx_q = quantized_onnx(path, q, Path(tmp) / f"ort-{q}.onnx")
                quantization[f"onnxruntime {q}"] = described = describe_quantization(onnx_q)
                if not described["quantized"]:
                    notes.append(f"onnxruntime's {q} quantizer changed no op of this model "
                                 f"({described['float_gemms_left']} float GEMMs left): not measured as quantized")
                    continue
                systems.append(_OnnxRuntime(onnx_q, cfg, threads, f"onnxruntime {q}"))
        bandwidth = {"before": read_bandwidth()}
        prompt = [int(t) for t in np.random.default_rng(0).integers(1, 100, prompt_len)]
        results = {s.name: {"prefill_s": [], "decode_step_s": []} for s in systems}
        # llmc's f32 prefills computing every position's logits, as the peers do
        all_logits = {s.name: [] for s in systems if isinstance(s, _Llmc) and s.name in ("llmc", "llmc tuned")}
        for round_ in range(repeats):
            for s in systems:
                log.info("round %d: %s", round_ + 1, s.name)
                time.sleep(SETTLE_S)
                results[s.name]["prefill_s"] += [s.prefill(prompt) for _ in range(PREFILLS)]
                results[s.name]["decode_step_s"] += s.decode(prompt, new_tokens)
            time.sleep(SETTLE_S)
            for s in systems:
                if s.name in all_logits:
                    all_logits[s.name] += [s.prefill(prompt, last_only=False) for _ in range(PREFILLS)]
        time.sleep(SETTLE_S)
        profile = systems[0].profile(prompt, min(16, new_tokens - 1))
        tokens = {s.name: s.generate(prompt, new_tokens) for s in systems}
        bandwidth["after"] = read_bandwidth()
        for s in systems:
            if hasattr(s, "close"):
                s.close()
    best = max(bandwidth["before"]["best"], bandwidth["after"]["best"])
    reference = tokens.get("onnxruntime")
    out = {"model": model, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
           "threads": threads, "read_bandwidth_gbs": best, "bandwidth_methods": bandwidth,
           "decode_weight_mb": round(weight_bytes[""] / 1e6, 1), "llmc_runtime": {
               "process": "its own, the runtime alone", "threads": systems[0].threads,
               "compiler_modules_imported": systems[0].compiler_modules},
           "onnxruntime_quantization": quantization, "tuning_s": tuning_s, "notes": notes, "systems": {}}
    for name, r in results.items():
        step = statistics.median(r["decode_step_s"])
        mode = name if name in weight_bytes else next((w for w in name.split(" ") if w in QUANT_MODES), "")
        share = weight_bytes[mode] / step / 1e9 / best
        out["systems"][name] = {
            "prefill_ms": round(statistics.median(r["prefill_s"]) * 1e3, 2),
            "decode_tok_s": round(1 / step, 2),
            "decode_weight_mb": round(weight_bytes[mode] / 1e6, 3),
            "decode_roofline": float(f"{share:.3g}"),
        }
        if share > 1:
            out["notes"].append(f"{name} read {share:.0%} of the measured bandwidth: the bandwidth was undermeasured "
                                "(or the weights stayed in cache); its roofline share is not meaningful")
        if reference is not None:
            agree = [a == b for a, b in zip(tokens[name], reference)]
            out["systems"][name]["tokens_as_onnxruntime"] = f"{sum(agree)}/{len(agree)}"
            out["systems"][name]["first_difference"] = agree.index(False) if False in agree else None
    out["systems"]["llmc"]["runtime_overhead"] = round(profile["overhead"], 3)
    out["llmc_kernels"] = profile["kernels"]
    for name, times in all_logits.items():
        out["systems"][name]["prefill_all_logits_ms"] = round(statistics.median(times) * 1e3, 2)
    return out


def format_table(result: dict) -> str:
    bw = result["bandwidth_methods"]
    lines = [f"{result['model']}: prompt {result['prompt_len']}, {result['new_tokens']} new tokens, batch 1, "
             f"{result['threads']} threads for every system; read bandwidth {result['read_bandwidth_gbs']} GB/s (best of "
             f"{', '.join(f'{k} {v}' for k, v in bw['before'].items() if k != 'best')} before the systems, best "
             f"{bw['after']['best']} after); {result['decode_weight_mb']} MB of weights per decode step",
             f"llmc runs in a process of its own with the runtime alone ({result['llmc_runtime']['threads']} kernel "
             f"threads; compiler modules imported: {', '.join(result['llmc_runtime']['compiler_modules_imported']) or 'none'})",
             "| system | prefill ms | decode tok/s | weights read per step | % of roofline | greedy tokens as onnxruntime's |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in result["systems"].items():
        agree = r.get("tokens_as_onnxruntime", "-")
        if r.get("first_difference") is not None:
            agree += f" (first difference at token {r['first_difference']})"
        lines.append(f"| {name} | {r['prefill_ms']} | {r['decode_tok_s']} | {r['decode_weight_mb']} MB | "
                     f"{r['decode_roofline']:.0%} | {agree} |")
    llmc = result["systems"]["llmc"]
    every = ", ".join(f"{name} {r['prefill_all_logits_ms']} ms" for name, r in result["systems"].items()
                      if "prefill_all_logits_ms" in r)
    lines.append(f"llmc prefill computes the last position's logits (what generation reads); like for like, with every "
                 f"position's logits as the peers' graphs compute them: {every}")
    lines.append(f"llmc runtime overhead per decode step: {llmc['runtime_overhead']:.1%}")
    for name, q in result["onnxruntime_quantization"].items():
        ops = "; ".join(f"{v['count']} {op} ({v['what']})" for op, v in q["quantized"].items()) or "nothing"
        lines.append(f"{name}: its quantizer made {ops}; {q['float_gemms_left']} float GEMMs left as they were")
    lines += [f"{name}: tuning took {s} s (compile included), from an empty table"
              for name, s in result.get("tuning_s", {}).items()]
    lines += [f"note: {n}" for n in result["notes"]]
    lines += ["", "llmc, time per kernel (all its calls):", "| kernel | calls per step | prefill ms | decode ms per step |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {k['kernel']} | {k['calls_per_step']} | {k['prefill_ms']} | {k['decode_ms']} |"
              for k in result["llmc_kernels"][:12]]
    return "\n".join(lines)
