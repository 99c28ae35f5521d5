"""Where a plan's values live, and what an artifact needs in memory.

The activations share one arena, planned by lifetime: a value is alive from the step that writes
it (the feeds: from before the first step) to the last step that reads it (the logits: to the
end, the caller reads them), and two values share bytes only if their lifetimes do not overlap.
A step's outputs never share with its own inputs: both are alive at that step. Offsets are
assigned greedily, largest value first, at the lowest 64-byte aligned offset that is free for
its lifetime (the "greedy by size" planner of TFLite's arena allocator). Sizes are the values'
largest, at the artifact's longest context: one arena serves every step.

Weights are not counted here: the runtime uses them in place from the artifact's memory map.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .dims import evaluate
from .schema import KV_BLOCKS, KV_LENGTHS

ALIGN = 64


def nbytes(info: dict, env: dict[str, int]) -> int:
    return math.prod(evaluate(d, env) for d in info["shape"]) * np.dtype(info["dtype"]).itemsize


def lifetimes(plan: list[dict], names, feeds, results) -> dict[str, tuple[int, int]]:
    """(first step, last step) each of `names` is alive; `feeds` are written before step 0,
    `results` read after the last step."""
    names = set(names)
    lives: dict[str, list[int]] = {n: [len(plan), -1] for n in names}
    for i, step in enumerate(plan):
        for a in step["args"]:
            if a in lives:
                life = lives[a]
                life[0], life[1] = min(life[0], i), max(life[1], i)
    for n in names & set(feeds):
        lives[n][0] = -1
    for n in names & set(results):
        lives[n][1] = len(plan)
    return {n: (a, b) for n, (a, b) in lives.items()}


def assign(sizes: dict[str, int], lives: dict[str, tuple[int, int]], align: int = ALIGN) -> tuple[dict[str, int], int]:
    """Byte offsets (multiples of `align`) for values of `sizes` alive over `lives`, and the
    arena's size."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    offsets = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], lives[n], n)):
        size, (first, last) = -(-sizes[name] // align) * align, lives[name]
        offset = 0
        for start, end, a, b in sorted(p for p in placed if p[2] <= last and first <= p[3]):
            if start - offset >= size:
                break
            offset = max(offset, end)
        offsets[name] = offset
        placed.append((offset, offset + size, first, last))
    return offsets, max((end for _, end, _, _ in placed), default=0)


def cache_bytes(manifest: dict, batch: int, blocks: int | None = None) -> int:
    """The KV caches' bytes for `batch` sequences at the artifact's context; a paged cache's for a
    pool of `blocks` blocks (default: as many as `batch` sequences at the whole context hold)."""
    values, longest = manifest["plans"]["values"], manifest["model"]["max_seq_len"]
    page = manifest["model"]["kv_cache"]["layout"]["page_tokens"]
    if blocks is None:
        blocks = batch * -(-longest // page) if page else 0
    env = {"batch": batch, "past": longest, "blocks": blocks}
    return sum(nbytes(values[e["past"]], env) for e in manifest["model"]["kv_cache"]["entries"])


def arena_names(manifest: dict, weights) -> list[str]:
    caches = {e["past"] for e in manifest["model"]["kv_cache"]["entries"]}
    return [n for n in manifest["plans"]["values"] if n not in caches and n not in weights]


def arena_sizes(manifest: dict, weights, batch: int, last_logits: bool = False) -> dict[str, int]:
    """Each activation's largest size for `batch` sequences: at the artifact's longest context
    for all of them; with a paged cache, whose batch prefills one sequence at a time and decodes
    one token per sequence (`Executor.run`), the larger of one sequence's prefill at the longest
    context and the batch's decode step. With `last_logits`, the logits are one position's (an
    executor that writes every position's to an array of the caller's)."""
    values, longest = manifest["plans"]["values"], manifest["model"]["max_seq_len"]
    envs = [{"batch": batch, "seq": longest, "past": longest, "total": longest}]
    if manifest["model"]["kv_cache"]["layout"]["page_tokens"]:
        envs = [{"batch": 1, "seq": longest, "past": longest, "total": longest},
                {"batch": batch, "seq": 1, "past": longest, "total": longest}]
    logits = manifest["model"]["roles"]["logits"]
    return {n: max(nbytes(values[n], dict(env, seq=1) if last_logits and n == logits else env) for env in envs)
            for n in arena_names(manifest, weights)}


def logits_by_gemm(manifest: dict) -> bool:
    """Whether a GEMM writes the logits, so that one position's can be computed alone (not when
    the export already keeps the last position only, or computes them some other way)."""
    logits = manifest["model"]["roles"]["logits"]
    return any(s["args"][-1] == logits and s["kind"] == "linear" for s in manifest["plans"]["forward"])


def arena_plan(manifest: dict, weights, batch: int, align: int = ALIGN,
               last_logits: bool = False) -> tuple[dict[str, int], dict[str, int], int]:
    """Offsets and sizes of the activations in the arena, and its size, for `batch` sequences;
    offsets are multiples of `align` bytes."""
    sizes = arena_sizes(manifest, weights, batch, last_logits)
    feeds = [t["name"] for t in manifest["model"]["inputs"]] + [KV_BLOCKS, KV_LENGTHS]  # written before step 0
    lives = lifetimes(manifest["plans"]["forward"], sizes, feeds, [manifest["model"]["outputs"][0]["name"]])
    offsets, size = assign(sizes, lives, align)
    return offsets, sizes, size


def footprint(manifest: dict, weights, weight_bytes: int, batch: int = 1) -> dict[str, int]:
    """What running the artifact holds in memory: the weights (`weights`: their names; read or mapped,
    `weight_bytes` in all), the KV caches and the activations."""
    kv = cache_bytes(manifest, batch)
    cpu = manifest["target"]["kind"] == "llvm"  # the CPU executor's arena
    _, _, arena = arena_plan(manifest, weights, batch, last_logits=cpu and logits_by_gemm(manifest))
    return {"weights": weight_bytes, "kv_cache": kv, "activations": arena, "total": weight_bytes + kv + arena}


def available() -> int | None:
    """Memory this machine can still give (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
