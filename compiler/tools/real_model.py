"""Speed on a real model against llama.cpp on the same weights, each system alone.

    python -m llmc.tools.real_model [--model smollm2-135m-instruct] [--threads 2] [--runs 3]
                                    [--prompt-len 128] [--new-tokens 128] [--background N] [--nice 19]

For fp32, w8 and w4 g32: llmc's artifact (the runtime alone, in a process of its own:
`llmc.tools.runtime_worker`) against llama.cpp's F32, Q8_0 and Q4_0 of the same Hugging Face
folder (its own converter, `convert_hf_to_gguf.py`, and quantizer; run through its library by
llama-cpp-python, in a process of its own: `llmc.tools.llama_cpp`). Each system runs alone,
one after the other, `--runs` times (a fresh process each run); the table gives medians:
decode tokens/s over `--new-tokens` steps after a `--prompt-len` prompt (llama-bench's tg), and
the prompt's prefill in ms (its pp; llmc computes the last position's logits, as generation does,
llama.cpp every position's). `--background N` runs N busy loops (at `--nice`, default 19: the lowest priority) during the
measurements, as a loaded machine would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmc import zoo
from llmc.tools import llama_cpp
from llmc.tools.bench import _Llmc

SCHEMES = {"fp32": ({}, None), "w8": ({"quant": "w8"}, "q8_0"), "w4 g32": ({"quant": "w4", "group_size": 32}, "q4_0")}


@contextlib.contextmanager
def background(n: int, nice: int = 19):
    """n busy loops at priority `nice`, for the block's duration."""
    loops = [subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()


def measure(system, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s) of one run."""
    system.prefill(prompt)  # warm: the first call binds and pages in
    prefill = statistics.median(system.prefill(prompt) for _ in range(3))
    steps = system.decode(prompt, new_tokens)
    return prefill * 1e3, len(steps) / sum(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=zoo.DEFAULT)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--background", type=int, default=0)
    p.add_argument("--nice", type=int, default=19, help="the busy loops' niceness (0: a normal process)")
    args = p.parse_args()
    import llmc

    model = zoo.get(args.model)
    onnx_path, folder = model.export(), model.hf_folder()
    prompt = list(range(1000, 1000 + args.prompt_len))
    work = Path(tempfile.mkdtemp(prefix="llmc-real-bench-"))
    f32 = llama_cpp.convert_hf(folder, work / "f32.gguf", zoo.default_cache_dir())
    ctx = args.prompt_len + args.new_tokens + 8
    rows = []
    for scheme, (options, ftype) in SCHEMES.items():
        artifact = llmc.compile(onnx_path, output=work / f"{scheme.replace(' ', '')}.llmc", max_seq_len=ctx, **options)
        gguf = llama_cpp.quantize(f32, work / f"{ftype}.gguf", ftype, os.cpu_count()) if ftype else f32
        systems = {"llmc": lambda: _Llmc(artifact, args.threads),
                   "llama.cpp": lambda: llama_cpp.LlamaCpp(gguf, args.threads, "llama.cpp", ctx)}
        results = {name: [] for name in systems}
        with background(args.background, args.nice):
            for _ in range(args.runs):
                for name, start in systems.items():
                    system = start()
                    try:
                        results[name].append(measure(system, prompt, args.new_tokens))
                    finally:
                        system.close()
        rows.append((scheme, {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
                              for name, runs in results.items()}))
    print(f"{args.model}, {args.threads} threads, {args.background} nice-{args.nice} busy loops, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}; medians of {args.runs} runs, each system alone in a fresh process")
    print(f"| weights (llmc / llama.cpp) | llmc decode tok/s | llama.cpp decode tok/s | ratio | "
          f"llmc prefill {args.prompt_len} ms | llama.cpp prefill {args.prompt_len} ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scheme, r in rows:
        peer = SCHEMES[scheme][1] or "F32"
        print(f"| {scheme} / {peer.upper()} | {r['llmc'][1]:.1f} | {r['llama.cpp'][1]:.1f} | "
              f"{r['llmc'][1] / r['llama.cpp'][1]:.2f}x | {r['llmc'][0]:.0f} | {r['llama.cpp'][0]:.0f} |")


if __name__ == "__main__":
    main()
