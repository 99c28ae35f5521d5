"""`llmc bench-torch`: decode speed under `torch.compile`, eager vs inductor vs llmc, in one process.

A zoo model (transformers, seeded random weights) generates greedily with the default dynamic
cache, batch 1, its forward run by each system in turn: PyTorch eager, `torch.compile` with
inductor, and `torch.compile` with llmc. Each system first generates once to compile (prefill,
the first decode step and the dynamic-length decode graph). Then, in interleaved rounds, it
generates 1 token (the prefill) and `new_tokens` tokens; the decode speed is the extra tokens
over the extra time, so it excludes the prefill. Medians over the rounds are reported.
"""

from __future__ import annotations

import logging
import statistics
import time

log = logging.getLogger(__name__)

SYSTEMS = ("eager", "inductor", "llmc")
SETTLE_S = 0.5  # the previous system's worker threads spin for a while after their last task


def bench_torch(model: str, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3,
                systems=SYSTEMS) -> dict:
    import numpy as np
    import torch

    from llmc import zoo

    torch.manual_seed(0)
    net = zoo.get(model).build_torch()
    eager = net.forward
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, net.config.vocab_size, (1, prompt_len)))
    forwards = {}
    for name in systems:
        forwards[name] = eager if name == "eager" else torch.compile(eager, backend=name)

    def generate(name, n):
        net.forward = forwards[name]
        with torch.no_grad():
            start = time.perf_counter()
            out = net.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            seconds = time.perf_counter() - start
        net.forward = eager
        return out, seconds

    tokens, compile_s = {}, {}
    for name in systems:
        log.info("%s: compiling (first generation)", name)
        out, compile_s[name] = generate(name, new_tokens)
        tokens[name] = out[0, prompt_len:].tolist()
    times = {name: {"prefill": [], "total": []} for name in systems}
    for r in range(repeats):
        log.info("round %d/%d", r + 1, repeats)
        for name in systems:
            time.sleep(SETTLE_S)
            times[name]["prefill"].append(generate(name, 1)[1])
            times[name]["total"].append(generate(name, new_tokens)[1])
    rows = []
    for name in systems:
        prefill = statistics.median(times[name]["prefill"])
        runs = zip(times[name]["total"], times[name]["prefill"])
        decode = statistics.median((new_tokens - 1) / (t - p) for t, p in runs)
        rows.append({"system": name, "decode_tok_s": round(decode, 2), "prefill_ms": round(prefill * 1e3, 1),
                     "first_generation_s": round(compile_s[name], 1),
                     "same_tokens_as_eager": tokens[name] == tokens[systems[0]]})
    return {"model": model, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "systems": rows}


def format_table(result: dict) -> str:
    base = {r["system"]: r["decode_tok_s"] for r in result["systems"]}
    lines = [f"{result['model']}: prompt {result['prompt_len']}, {result['new_tokens']} new tokens, batch 1, "
             f"{result['threads']} threads, median of {result['repeats']}",
             "| system | decode tok/s | vs eager | vs inductor | prefill ms | first generation s | tokens = eager |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    def ratio(r, peer):
        return f"{r['decode_tok_s'] / base[peer]:.2f}x" if peer in base else "-"

    for r in result["systems"]:
        same = "yes" if r["same_tokens_as_eager"] else "no"
        lines.append(f"| {r['system']} | {r['decode_tok_s']} | {ratio(r, 'eager')} | {ratio(r, 'inductor')} | "
                     f"{r['prefill_ms']} | {r['first_generation_s']} | {same} |")
    return "\n".join(lines)
