"""Kernel launches and bytes of one step of a GPU artifact (--target opencl or metal), counted
from its launch tables: not timed (pocl's times say nothing of a phone's GPU).

    python -m llmc.tools.gpu_launches model.llmc --past 128 [--seq 1]

Prints the launches by plan step kind (GEMMs, attention, rope_cache, small ops), and the bytes of
the intermediates kernels pass through global memory, at the given dims, batch 1.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from llmc.runtime.artifact import open_artifact
from llmc.runtime.dims import atom


def count(manifest: dict, env: dict[str, int]) -> tuple[collections.Counter, int]:
    """(launches by step kind, intermediate bytes) of one forward step at `env`: a kernel whose
    grid is empty there (the variant for the other row counts, an empty past) is not launched."""
    functions = manifest["kernels"]["functions"]
    launches, scratch = collections.Counter(), 0
    for step in manifest["plans"]["forward"]:
        group = functions[step["kernel"]]
        for kernel in group["kernels"]:
            if all(atom(kernel["launch"].get(f"blockIdx.{a}", "1"), env) for a in "xyz"):
                launches[step["kind"]] += 1
        scratch += sum(atom(s["elements"], env) * np.dtype(s["dtype"]).itemsize for s in group["scratch"])
    return launches, scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--past", type=int, default=128, help="cached tokens")
    parser.add_argument("--seq", type=int, default=1, help="new tokens (1: a decode step)")
    args = parser.parse_args()
    manifest = open_artifact(args.artifact).manifest
    env = {"batch": 1, "seq": args.seq, "past": args.past, "total": args.past + args.seq}
    launches, scratch = count(manifest, env)
    layers = max(1, len(manifest["model"]["kv_cache"]["entries"]) // 2)  # a key and a value cache each
    print(f"plan steps: {len(manifest['plans']['forward'])}")
    print(f"launches: {sum(launches.values())} ({sum(launches.values()) / layers:.1f} per layer over {layers})")
    for kind, n in launches.most_common():
        print(f"  {kind}: {n}")
    print(f"intermediates through global memory: {scratch / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
