"""How a batch of sequences decodes against one: decode tokens/s of N sequences sharing a paged
KV cache (one step for all) against one sequence, on a real model.

    python -m llmc.tools.batch_decode [--model smollm2-135m-instruct] [--batch 8] [--prompt-len 8]
                                      [--new-tokens 64] [--quant fp32 w4] [--runs 3] [--threads N]
                                      [--background N] [--nice 19]

Each run is a fresh process (`llmc.runtime` alone): it generates greedily for one prompt, then
for `--batch` prompts of `--prompt-len` tokens together, and reports each one's decode tokens/s:
the tokens after each prompt's first (every prompt is prefilled before the first decode step)
over the time from the first decode step to the last. The table gives medians over `--runs`
and the ratio: a batch that costs what one sequence costs decodes `--batch` x the tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llmc import zoo
from llmc.tools.real_model import background

RUN = """
import json, sys, time
import numpy as np
import llmc.runtime as r
m = r.load(sys.argv[1], threads=int(sys.argv[2]))
batch, prompt_len, new = (int(a) for a in sys.argv[3:6])
rng = np.random.default_rng(0)
vocab = m.index_bounds[m.manifest["model"]["roles"]["tokens"]]
def rate(n):
    prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(n)]
    seen = []
    def on_token(i, token):
        seen.append(time.perf_counter())
    m.generate(prompts, new, on_token=on_token)  # warm: binds this batch's calls
    seen.clear()
    outs = m.generate(prompts, new, on_token=on_token)
    steps = sum(len(o) for o in outs) - n  # the first token of each comes from its prefill
    return steps / (seen[-1] - seen[n - 1])
print(json.dumps({"one": rate(1), "batch": rate(batch)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=zoo.DEFAULT)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quant", nargs="+", default=["fp32", "w4"], choices=["fp32", "w8", "w4"])
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--background", type=int, default=0)
    p.add_argument("--nice", type=int, default=19)
    args = p.parse_args()
    import llmc

    source = zoo.get(args.model).export()
    work = Path(tempfile.mkdtemp(prefix="llmc-batch-bench-"))
    context = -(-(args.prompt_len + args.new_tokens) // args.page) * args.page
    print(f"{args.model}, {args.batch} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens each, "
          f"paged cache (blocks of {args.page}), {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{args.background} background loops at nice {args.nice}")
    print(f"| weights | 1 sequence tok/s | {args.batch} sequences tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    for quant in args.quant:
        options = {} if quant == "fp32" else {"quant": quant, **({"group_size": 32} if quant == "w4" else {})}
        artifact = llmc.compile(source, output=work / f"{quant}.llmc", max_seq_len=context,
                                kv_layout=f"paged:{args.page}", **options)
        runs = []
        with background(args.background, args.nice):
            for _ in range(args.runs):
                done = subprocess.run([sys.executable, "-c", RUN, str(artifact), str(args.threads), str(args.batch),
                                       str(args.prompt_len), str(args.new_tokens)],
                                      check=True, capture_output=True, text=True)
                runs.append(json.loads(done.stdout.splitlines()[-1]))
        one = statistics.median(r["one"] for r in runs)
        many = statistics.median(r["batch"] for r in runs)
        print(f"| {quant} | {one:.1f} | {many:.1f} | {many / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
