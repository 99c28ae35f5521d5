"""The native runtime (`llmc-run`, C) against the Python runtime on the same artifacts: decode
speed, the native runtime's own share of a decode step (time outside the kernels), prefill, peak
memory (the process's maximum resident set) against weights + KV cache, and the program's size.
Each run is a fresh process doing what a user does (load, prefill, greedy decode); the two
runtimes alternate round by round, and medians are reported.

    python -m llmc.tools.native_runtime [MODEL ...] [--quant fp32 w8 w4] [--prompt-len 128]
                                        [--new-tokens 128] [--repeats 3] [--threads N]

MODEL: zoo names (default llama-0.5b gpt2-124m). Artifacts are compiled with context prompt + new
tokens; w4 is groups of 32. Sizes of each artifact are reported against the parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON_RUN = """
import json, sys, time
import llmc.runtime as r
t0 = time.perf_counter()
m = r.load(sys.argv[1], threads=int(sys.argv[2]))
loaded = time.perf_counter()
prompt = json.loads(sys.argv[3])
stamps = []
tokens = m.generate(prompt, int(sys.argv[4]), on_token=lambda t: stamps.append(time.perf_counter()))
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"tokens": tokens, "load": loaded - t0, "prefill": stamps[0] - loaded,
                  "step": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "rss": peak}))
"""


def _run(cmd, env):
    """(stdout, stderr). Peak memory is the process's own VmHWM: a child's rusage maximum would
    include this process's, which the fork copies."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout, done.stderr


def native_once(program, art, threads, prompt, new, env):
    out, err = _run([str(program), str(art), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
                          str(new), "--threads", str(threads), "--json", "--stats"], env)
    stats = re.search(r"load ([\d.]+) s, prefill \d+ tokens ([\d.]+) s, decode (\d+) steps ([\d.]+) s .*?"
                      r"([\d.]+)% outside kernels.*peak resident (\d+) B", err)
    load, prefill, steps, decode, outside, rss = stats.groups()
    return {"tokens": json.loads(out)["new_token_ids"], "load": float(load), "prefill": float(prefill),
            "step": float(decode) / int(steps), "outside": float(outside), "rss": int(rss)}


def python_once(art, threads, prompt, new, env):
    out, _ = _run([sys.executable, "-c", PYTHON_RUN, str(art), str(threads), json.dumps(prompt), str(new)], env)
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["llama-0.5b", "gpt2-124m"])
    parser.add_argument("--quant", nargs="+", default=["fp32", "w8", "w4"], choices=("fp32", "w8", "w4"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    import numpy as np
    import onnx

    import llmc
    from llmc import toolchain, zoo
    from llmc.runtime import memory, safetensors
    from llmc.runtime.artifact import WEIGHTS, open_artifact
    from llmc.runtime.cpu import arch

    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "LLMC_NUM_THREADS")}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d')}; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"medians of {args.repeats} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        program = toolchain.build_runtime(arch(), Path(tmp) / "llmc-run")
        arm = toolchain.build_runtime("aarch64", Path(tmp) / "llmc-run-arm64")
        print(f"llmc-run: {program.stat().st_size / 1e3:.1f} KB (x86_64), {arm.stat().st_size / 1e3:.1f} KB "
              "(arm64), stripped")
        print("| model (parameters) | weights | artifact MB | bytes/param | decode ms/step native | python | native/python "
              "| native outside kernels | prefill s native | python | peak RSS MB native | python | "
              "weights+KV MB | native over weights+KV |")
        print("|" + " --- |" * 14)
        for name in args.models:
            spec = zoo.get(name)
            path = spec.export(kv_cache=True, exporter="dynamo")
            params = sum(int(np.prod(t.dims)) for t in onnx.load(path, load_external_data=False).graph.initializer)
            rng = np.random.default_rng(0)
            prompt = [int(t) for t in rng.integers(1, 1000, args.prompt_len)]
            for q in args.quant:
                options = {} if q == "fp32" else {"quant": q, **({"group_size": 32} if q == "w4" else {})}
                art = llmc.compile(path, output=Path(tmp) / f"{name}-{q}.llmc",
                                   max_seq_len=args.prompt_len + args.new_tokens, **options)
                size = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
                m = open_artifact(art).manifest
                weights = safetensors.load(art / WEIGHTS)
                need = memory.footprint(m, weights, (art / WEIGHTS).stat().st_size)
                native, python = [], []
                for _ in range(args.repeats):
                    native.append(native_once(program, art, args.threads, prompt, args.new_tokens, env))
                    python.append(python_once(art, args.threads, prompt, args.new_tokens, env))
                assert all(r["tokens"] == python[0]["tokens"] for r in native + python), "the runtimes disagree"

                def med(runs, key):
                    return statistics.median(r[key] for r in runs)
                base = need["weights"] + need["kv_cache"]
                per_param = f"{size / params:.2f}"
                print(f"| {name} ({params / 1e6:.0f}M) | {q} | {size / 1e6:.1f} | {per_param} | {med(native, 'step') * 1e3:.2f} | "
                      f"{med(python, 'step') * 1e3:.2f} | {med(native, 'step') / med(python, 'step'):.3f} | "
                      f"{med(native, 'outside'):.2f}% | {med(native, 'prefill'):.3f} | {med(python, 'prefill'):.3f} | "
                      f"{med(native, 'rss') / 1e6:.1f} | {med(python, 'rss') / 1e6:.1f} | {base / 1e6:.1f} | "
                      f"{(med(native, 'rss') - base) / 1e6:+.1f} MB ({(med(native, 'rss') / base - 1) * 100:+.1f}%) |",
                      flush=True)


if __name__ == "__main__":
    main()
