"""Decode GEMV (batch 1) of the TVM fused_linear kernel against numpy and PyTorch, at the weight
shapes of the zoo's benchmark models, as GB/s of weights read and as a fraction of this
machine's streaming read bandwidth. Weights are cold: several copies rotate, more bytes than
the last-level cache holds.

    python -m llmc.tools.gemv_bandwidth [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

SHAPES = {  # (out_features, in_features)
    "llama-0.5b qkv": (2560, 1536), "llama-0.5b gate_up": (8192, 1536), "llama-0.5b down": (1536, 4096),
    "llama-0.5b lm_head": (32000, 1536), "gpt2-124m c_fc": (3072, 768), "gpt2-124m lm_head": (50257, 768),
}
COLD_BYTES = 512 << 20  # more than any L3 of the machines we run on


def time_cold(fn, sets, repeats):
    """Median over repeats of the mean time per call, rotating through the weight copies."""
    fn(*sets[0])
    results = []
    for _ in range(repeats):
        t = time.perf_counter()
        for s in sets:
            fn(*s)
        results.append((time.perf_counter() - t) / len(sets))
    return statistics.median(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from llmc.backends.tvm.linear import LinearSpec, build, pack  # sets TVM_NUM_THREADS before tvm starts

    import tvm
    from llmc.backends.tvm.target import host
    from llmc.tools.bandwidth import read_bandwidth

    torch.set_num_threads(os.cpu_count())
    bw = read_bandwidth()["best"]
    target = host()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, target mcpu={target['mcpu']}, "
          f"streaming read {bw:.1f} GB/s (best of llmc.tools.bandwidth's methods)")
    print("| weights | MB | llmc TVM GB/s (% of read bw) | numpy GB/s | torch GB/s |")
    print("| --- | --- | --- | --- | --- |")
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 4
        copies = max(2, COLD_BYTES // nbytes)
        ws = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies)]
        x = rng.standard_normal((1, k), dtype=np.float32)
        kernel = build(LinearSpec(n, k), target)["main"]
        y = tvm.runtime.tensor(np.zeros((1, n), np.float32), dev)
        tx = tvm.runtime.tensor(x, dev)
        t_tvm = time_cold(lambda w: kernel(tx, w, y), [(tvm.runtime.tensor(pack(w), dev),) for w in ws], args.repeats)
        t_np = time_cold(lambda w: w @ x[0], [(w,) for w in ws], args.repeats)
        xt = torch.from_numpy(x[0])
        t_torch = time_cold(lambda w: torch.mv(w, xt), [(torch.from_numpy(w),) for w in ws], args.repeats)
        gb = lambda t: nbytes / t / 1e9  # noqa: E731
        print(f"| {name} [{n}x{k}] | {nbytes / 1e6:.1f} | {gb(t_tvm):.1f} ({gb(t_tvm) / bw:.0%}) | "
              f"{gb(t_np):.1f} | {gb(t_torch):.1f} |")


if __name__ == "__main__":
    main()
