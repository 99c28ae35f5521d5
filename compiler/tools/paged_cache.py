"""A paged KV cache against contiguous ones on a batch of prompts of different lengths: the KV
cache's memory (the paged pool at its largest against what contiguous caches reserve for the
batch at the artifact's context) and the time to generate (the paged artifact decodes the batch
together; the contiguous one runs the prompts one after another, as llmc does without paging).
Each run is a fresh process doing what a user does (load, `generate` over the list); the two
artifacts alternate round by round and medians are reported. Both give the same tokens (checked).

    python -m llmc.tools.paged_cache [MODEL] [--context 1024] [--lengths 20 100 300 600]
                                     [--new-tokens 64] [--page 16] [--repeats 3] [--threads N]
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

RUN = """
import json, sys, time
import numpy as np
import llmc.runtime as r
from llmc.runtime import memory
m = r.load(sys.argv[1], threads=int(sys.argv[2]))
rng = np.random.default_rng(0)
prompts = [rng.integers(0, m.index_bounds[m.manifest["model"]["roles"]["tokens"]], n).tolist()
           for n in json.loads(sys.argv[3])]
t0 = time.perf_counter()
outs = m.generate(prompts, int(sys.argv[4]))
seconds = time.perf_counter() - t0
pages = m.executor.pages
kv = memory.cache_bytes(m.manifest, 1, pages.capacity) if pages else memory.cache_bytes(m.manifest, 1)
held = memory.cache_bytes(m.manifest, 1, pages.peak) if pages else kv
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"tokens": outs, "seconds": seconds, "kv_bytes": kv, "kv_held": held, "rss": peak,
                  "contiguous_batch_kv": memory.cache_bytes(m.manifest, len(prompts))
                  if not pages else None}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="gpt2-124m")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--lengths", type=int, nargs="+", default=[20, 100, 300, 600])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()

    import llmc
    from llmc import zoo

    source = zoo.get(args.model).export(exporter="dynamo", kv_cache=True)
    work = Path(tempfile.mkdtemp(prefix="llmc-paged-"))
    arts = {layout: llmc.compile(source, output=work / f"{layout.replace(':', '')}.llmc", max_seq_len=args.context,
                                 kv_layout=layout) for layout in ("bhsd", f"paged:{args.page}")}
    runs: dict[str, list[dict]] = {layout: [] for layout in arts}
    for _ in range(args.repeats):
        for layout, art in arts.items():
            done = subprocess.run([sys.executable, "-c", RUN, str(art), str(args.threads), json.dumps(args.lengths),
                                   str(args.new_tokens)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{layout}: {done.stderr[-2000:]}")
            runs[layout].append(json.loads(done.stdout))
    contiguous, paged = runs["bhsd"], runs[f"paged:{args.page}"]
    assert contiguous[0]["tokens"] == paged[0]["tokens"], "the paged artifact gave other tokens"
    new = sum(len(t) for t in paged[0]["tokens"])
    mib = 2 ** 20

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    print(f"{args.model}, context {args.context}, prompts of {args.lengths} tokens + {args.new_tokens} new, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}")
    print(f"KV cache: contiguous, batch of {len(args.lengths)} at the context: "
          f"{contiguous[0]['contiguous_batch_kv'] / mib:.1f} MiB; one sequence at a time: "
          f"{contiguous[0]['kv_bytes'] / mib:.1f} MiB")
    print(f"KV cache: paged ({args.page} tokens a block): pool {paged[0]['kv_bytes'] / mib:.1f} MiB, "
          f"at most {paged[0]['kv_held'] / mib:.1f} MiB held")
    for name, rs in (("contiguous, prompt by prompt", contiguous), ("paged, decoded together", paged)):
        s = med(rs, "seconds")
        print(f"{name}: {s:.2f} s, {new / s:.1f} new tokens/s, peak RSS {med(rs, 'rss') / mib:.0f} MiB")


if __name__ == "__main__":
    main()
