"""`llmc bench --target cuda`: decode and prefill on an NVIDIA GPU, llmc against PyTorch eager
and torch.compile ("reduce-overhead", "max-autotune"), and onnxruntime's CUDA provider where it
is installed; all in fp16 on the same weights, batch 1, greedy.

llmc runs as a user gets it: the artifact loaded by the runtime alone in a process of its own
(`runtime_worker.py`), its decode step a CUDA graph replayed per token. The peers run
transformers' `generate` in this process; their decode speed is (N - 1) / (time of N new tokens
- time of 1), which leaves the prefill out. The roofline is the weight bytes a decode step reads
(every GEMM weight, one embedding row) over the device-to-device copy bandwidth measured here
(bytes read plus written). Medians of `rounds`.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy of 2 GiB moves (read + written), best of 5."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * x.numel() * 2 / (start.elapsed_time(end) / 1e3))
    return best


def decode_bytes(artifact: Path) -> int:
    """The weight bytes one decode step reads: every weight a GEMM reads, one row of the others
    (the embedding's gather)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    values = manifest["plans"]["values"]
    weights = set(manifest["plans"]["weights"])

    def size(name, rows=False):
        """Its bytes; with `rows`, one row's (a table read one row a step)."""
        shape = values[name]["shape"]
        n = math.prod(shape[1:] if rows and len(shape) > 1 else shape)
        return n * np.dtype(values[name]["dtype"]).itemsize
    gemm = {a for s in manifest["plans"]["forward"] if s["kind"] == "linear" for a in s["args"] if a in weights}
    return sum(size(n) for n in gemm) + sum(size(n, rows=True) for n in weights - gemm)


def _llmc(artifact: Path, prompt: list[int], steps: int, rounds: int) -> dict:
    worker = subprocess.Popen([sys.executable, "-m", "llmc.tools.runtime_worker", str(artifact)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(op, **args):
        worker.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())
    try:
        json.loads(worker.stdout.readline())
        ask("prefill", prompt=prompt)  # warm-up: binds, captures nothing yet
        prefills, steps_s, tokens = [], [], None
        for _ in range(rounds):
            prefills.append(ask("prefill", prompt=prompt))
            steps_s += ask("decode", prompt_len=len(prompt), steps=steps)[1:]  # the first captures the graph
        tokens = ask("generate", prompt=prompt, steps=32)
    finally:
        worker.stdin.close()
        worker.wait()
    return {"prefill_ms": statistics.median(prefills) * 1e3, "decode_tok_s": 1 / statistics.median(steps_s),
            "tokens": tokens}


def _torch(name: str, mode: str | None, prompt: list[int], steps: int, rounds: int) -> dict:
    import torch

    from llmc import zoo

    model = zoo.get(name).build_torch("f16").cuda()
    ids = torch.tensor([prompt], device="cuda")
    if mode:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out[0, len(prompt):].tolist()
    started = time.perf_counter()
    run(steps)  # compiles (torch.compile) and warms up
    run(1)
    compile_s = time.perf_counter() - started
    ones, fulls = [], []
    for _ in range(rounds):
        ones.append(run(1)[0])
        fulls.append(run(steps)[0])
    tokens = run(32)[1]
    return {"prefill_ms": statistics.median(ones) * 1e3,
            "decode_tok_s": (steps - 1) / (statistics.median(fulls) - statistics.median(ones)),
            "tokens": tokens, "warmup_s": round(compile_s, 1)}


def bench_cuda(name: str = "llama-1b", prompt_len: int = 512, steps: int = 128, rounds: int = 3,
               peers: tuple = ("eager", "reduce-overhead", "max-autotune"), output: Path | None = None) -> dict:
    import torch

    import llmc
    from llmc import zoo

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    path = zoo.get(name).export(external_data=True)
    prompt = np.random.default_rng(0).integers(0, zoo.get(name).config().vocab_size, prompt_len).tolist()
    bandwidth = copy_bandwidth()
    result = {"model": name, "gpu": torch.cuda.get_device_name(), "arch": arch, "prompt_len": prompt_len,
              "steps": steps, "copy_bandwidth_gb_s": round(bandwidth / 1e9), "systems": {}}
    folder = Path(tempfile.mkdtemp(prefix="llmc-cuda-bench-"))
    for label, options in (("llmc fp16", {}), ("llmc w4 g128", {"quant": "w4", "group_size": 128})):
        t = time.perf_counter()
        art = llmc.compile(path, target="cuda", arch=arch, output=folder / f"{label.replace(' ', '-')}.llmc",
                           max_seq_len=prompt_len + steps + 40, **options)
        row = _llmc(art, prompt, steps, rounds)
        row["compile_s"] = round(time.perf_counter() - t, 1)
        row["bytes_per_token"] = decode_bytes(art)
        row["roofline_share"] = row["decode_tok_s"] * row["bytes_per_token"] / bandwidth
        result["systems"][label] = row
        log.info("%s: %s", label, row)
    for mode in peers:
        try:
            result["systems"][f"torch {mode}"] = _torch(name, None if mode == "eager" else mode, prompt, steps, rounds)
        except Exception as e:  # a peer that fails is reported, not fatal
            result["systems"][f"torch {mode}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        torch.cuda.empty_cache()
    if output:
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['gpu']} ({result['arch']}), prompt {result['prompt_len']}, "
             f"{result['steps']} new tokens, copy bandwidth {result['copy_bandwidth_gb_s']} GB/s",
             "| system | decode tok/s | share of roofline | prefill ms | first 32 tokens = eager's |",
             "| --- | --- | --- | --- | --- |"]
    eager = result["systems"].get("torch eager", {}).get("tokens")
    for label, row in result["systems"].items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} | | | |")
            continue
        share = f"{row['roofline_share']:.0%}" if "roofline_share" in row else ""
        same = "" if eager is None else sum(a == b for a, b in zip(row["tokens"], eager))
        lines.append(f"| {label} | {row['decode_tok_s']:.1f} | {share} | {row['prefill_ms']:.1f} | {same}/32 |")
    return "\n".join(lines)
