"""Quantized `fused_linear` kernels, f32 activations (dequantize and multiply in f32) against
int8 activations (integer dot products, `backends/tvm/int_dot.py`), at the zoo's benchmark
shapes: decode (1 row, weights cold: several copies rotate, more bytes than the last-level
cache holds) as GB/s of weight bytes read and a share of this machine's read bandwidth, and
prefill (128 rows) in ms.

    python -m llmc.tools.quantized_gemv [--repeats 5] [--rows 128]
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
from .gemv_bandwidth import COLD_BYTES, time_cold

SHAPES = {  # (out_features, in_features)
    "llama-0.5b gate_up": (8192, 1536), "llama-0.5b down": (1536, 4096), "llama-0.5b lm_head": (32000, 1536),
    "gpt2-124m c_fc": (3072, 768),
}
SCHEMES = [("w8", 0), ("w4", 32), ("w4", 128)]
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=128, help="rows of the prefill GEMM")
    args = parser.parse_args()

    from llmc.backends.tvm import int_dot
    from llmc.backends.tvm.linear import PACKINGS, LinearSpec, build  # sets TVM_NUM_THREADS before tvm starts
    from llmc.passes.quantize_weights import quantize

    import tvm
    from llmc.backends.tvm.target import host
    from llmc.tools.bandwidth import read_bandwidth

    bw = read_bandwidth()["best"]
    target = host()
    isa = int_dot.choose(tvm.target.Target(target))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, mcpu={target['mcpu']}, "
          f"integer dot products: {isa}, streaming read {bw:.1f} GB/s")
    print(f"| weights | scheme | MB | decode GB/s f32 act | decode GB/s int8 act | int8/f32 | "
          f"prefill {args.rows} rows ms f32 act | int8 act | f32/int8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    for name, (n, k) in SHAPES.items():
        w = rng.standard_normal((n, k), dtype=np.float32) / 8
        for quant, group in SCHEMES:
            q, scale, zero = quantize(w, quant, group or 128, False)
            arrays = {"w": q, "w_scale": scale, "w_zero": zero}
            nbytes = q.nbytes // (2 if quant == "w4" else 1) + scale.nbytes + (zero.nbytes if quant == "w4" else 0)
            times = {}
            for act in (0, 32):
                spec = LinearSpec(n, k, quant=quant, group_size=group, act_block=act, isa=isa if act else "")
                kernel = build(spec, target)["main"]
                packed = [tvm.runtime.tensor(PACKINGS[spec.packing(a)](arrays[a]) if spec.packing(a) else arrays[a], dev)
                          for a in spec.arg_names()[1:-1]]
                copies = [packed] + [[tvm.runtime.tensor(t.numpy(), dev) for t in packed]
                                     for _ in range(max(1, COLD_BYTES // nbytes) - 1)]
                for rows in (1, args.rows):
                    x = tvm.runtime.tensor(rng.standard_normal((rows, k), dtype=np.float32), dev)
                    y = tvm.runtime.tensor(np.zeros((rows, n), np.float32), dev)
                    sets = [(c,) for c in (copies if rows == 1 else copies[:1])]
                    times[act, rows] = time_cold(lambda c: kernel(x, *c, y), sets, args.repeats)
            gb = lambda t: nbytes / t / 1e9  # noqa: E731
            d0, d1 = gb(times[0, 1]), gb(times[32, 1])
            p0, p1 = times[0, args.rows] * 1e3, times[32, args.rows] * 1e3
            print(f"| {name} [{n}x{k}] | {quant}{f' g{group}' if group else ''} | {nbytes / 1e6:.1f} | "
                  f"{d0:.1f} ({d0 / bw:.0%}) | {d1:.1f} ({d1 / bw:.0%}) | {d1 / d0:.2f}x | {p0:.1f} | {p1:.1f} | "
                  f"{p0 / p1:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
