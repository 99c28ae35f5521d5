"""`llmc bench-torch`: decode speed under `torch.compile`: eager, inductor, inductor with
freezing, and llmc; and llmc's artifact runtime on the same model, the speed the llmc backend
aims at.

A zoo model (transformers, seeded random weights) generates greedily, batch 1, with
transformers' dynamic cache (or, with `cache="static"`, its StaticCache, written in place), in
one of two loops: `loop="generate"`, the usual `model.generate`, or `loop="forward"`, a plain
greedy loop that calls the model's forward once per token (as a serving loop or gpt-fast does:
what is left is the forward itself, which the compiler controls; `generate` adds some
milliseconds of Python per token, stopping criteria and input preparation). The forward is run
by each system: PyTorch eager, `torch.compile` with
inductor, with inductor and freezing (weights folded as constants, as llmc folds them), and with
llmc. `llmc-runtime` is the model's ONNX export compiled by `llmc compile` (before the
measurement, in the parent process) and run by `llmc.runtime` alone. Each system runs in a process of its
own: in one process the thread pools of the systems measured before (TVM's, OpenMP's) kept
spinning into the next system's time, and an earlier version of this harness measured eager
GPT-2 at a third of `llmc bench`'s eager figure. A system first generates once to compile
(prefill, the first decode step and the dynamic-length decode graph); then, `repeats` times, it
generates 1 token (the prefill) and `new_tokens` tokens; the decode speed is the extra tokens
over the extra time, so it excludes the prefill. Medians are reported, and whether each system's
greedy tokens are eager's.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time

log = logging.getLogger(__name__)

SYSTEMS = ("eager", "inductor", "inductor-freezing", "llmc", "llmc-runtime")
CACHES = ("dynamic", "static")
LOOPS = ("generate", "forward")


def _forward(name, eager):
    import torch

    if name == "eager":
        return eager
    if name == "inductor-freezing":
        return torch.compile(eager, backend="inductor", options={"freezing": True})
    return torch.compile(eager, backend=name)


def _cache(net, cache: str, length: int):
    from transformers import DynamicCache, StaticCache

    return StaticCache(config=net.config, max_cache_len=length) if cache == "static" else DynamicCache()


def _greedy(net, ids, n: int, past):
    """`n` greedy tokens after `ids`, one forward call each; the ids with them appended."""
    import torch

    positions = torch.arange(ids.shape[1])
    tokens = [ids]
    for _ in range(n):
        out = net(input_ids=tokens[-1], past_key_values=past, cache_position=positions, use_cache=True)
        tokens.append(out.logits[:, -1:].argmax(-1))
        positions = positions[-1:] + 1
    return torch.cat(tokens, dim=1)


def measure(name: str, model: str, prompt_len: int, new_tokens: int, repeats: int, cache: str = "dynamic",
            loop: str = "generate", artifact: str = "") -> dict:
    """One system, in this process."""
    import numpy as np
    import torch

    from llmc import zoo

    torch.manual_seed(0)
    net = zoo.get(model).build_torch()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, net.config.vocab_size, (1, prompt_len)))
    if name == "llmc-runtime":
        from llmc import runtime

        runner = runtime.load(artifact)

        def generate(n):
            start = time.perf_counter()
            out = runner.generate(ids[0].tolist(), n)
            return torch.tensor([ids[0].tolist() + out]), time.perf_counter() - start
    else:
        eager = net.forward
        net.forward = _forward(name, eager)

        def generate(n):
            with torch.no_grad():
                start = time.perf_counter()
                # a static cache of one size for every generation: its shapes are the graphs'
                past = _cache(net, cache, prompt_len + new_tokens)
                if loop == "forward":
                    return _greedy(net, ids, n, past), time.perf_counter() - start
                out = net.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                   past_key_values=past)
                return out, time.perf_counter() - start

    out, first = generate(new_tokens)
    prefills, totals = [], []
    for _ in range(repeats):
        prefills.append(generate(1)[1])
        totals.append(generate(new_tokens)[1])
    decode = statistics.median((new_tokens - 1) / (t - p) for t, p in zip(totals, prefills))
    return {"system": name, "decode_tok_s": round(decode, 2), "prefill_ms": round(statistics.median(prefills) * 1e3, 1),
            "first_generation_s": round(first, 1), "tokens": out[0, prompt_len:].tolist(),
            "threads": torch.get_num_threads()}


def bench_torch(model: str, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3,
                systems=SYSTEMS, cache: str = "dynamic", loop: str = "generate") -> dict:
    import tempfile
    from pathlib import Path

    rows = []
    with tempfile.TemporaryDirectory(prefix="llmc-bench-torch-") as work:
        artifact = ""
        if "llmc-runtime" in systems:
            import llmc
            from llmc import zoo

            log.info("llmc-runtime: compiling the model's ONNX export")
            artifact = str(llmc.compile(zoo.get(model).export(exporter="dynamo", kv_cache=True),
                                        output=Path(work) / "model.llmc", max_seq_len=prompt_len + new_tokens))
        for name in systems:
            log.info("%s: measuring in a process of its own", name)
            done = subprocess.run([sys.executable, "-m", "llmc.tools.torch_bench", name, model, str(prompt_len),
                                   str(new_tokens), str(repeats), cache, loop, artifact],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"bench-torch {name}: {done.stderr.strip().splitlines()[-1:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = rows[0]["tokens"]  # eager's, unless the caller left eager out
    for r in rows:
        r["same_tokens_as_eager"] = r["tokens"] == first
    for r in rows:
        del r["tokens"]
    return {"model": model, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "threads": rows[0]["threads"], "cache": cache, "loop": loop,
            # torch's OpenMP threads spin after its parallel ops unless PASSIVE (docs/torch-compile.md)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "systems": rows}


def format_table(result: dict) -> str:
    base = {r["system"]: r["decode_tok_s"] for r in result["systems"]}
    loop = "transformers' generate" if result["loop"] == "generate" else "a greedy loop over the forward"
    lines = [f"{result['model']}: prompt {result['prompt_len']}, {result['new_tokens']} new tokens, batch 1, "
             f"{result['threads']} threads, median of {result['repeats']}; {loop} with transformers' "
             f"{result['cache']} cache (llmc-runtime: the artifact runtime's own loop); each system in a process of "
             f"its own; OMP_WAIT_POLICY {result['omp_wait_policy']}",
             "| system | decode tok/s | vs eager | vs inductor | vs inductor-freezing | vs llmc-runtime | prefill ms "
             "| first generation s | tokens = eager |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def ratio(r, peer):
        return f"{r['decode_tok_s'] / base[peer]:.2f}x" if peer in base else "-"

    for r in result["systems"]:
        same = "yes" if r["same_tokens_as_eager"] else "no"
        lines.append(f"| {r['system']} | {r['decode_tok_s']} | {ratio(r, 'eager')} | {ratio(r, 'inductor')} | "
                     f"{ratio(r, 'inductor-freezing')} | {ratio(r, 'llmc-runtime')} | {r['prefill_ms']} | "
                     f"{r['first_generation_s']} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), *sys.argv[6:9])))
