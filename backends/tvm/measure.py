"""Timing a TVM kernel's candidate configurations on this machine (`llmc.tuning.Measure`).

Each candidate is built alone (all of them at once, on every core) and called on buffers of
the real sizes. Decode (one row) reads its weights cold, as a decode step does after the rest of
the model has passed through the caches: the weights are copied until the copies exceed twice the last-level cache, and calls
rotate through them. Candidates are timed in interleaved rounds, so that a slow stretch of a
noisy machine falls on all of them, and each gets the median of its calls. Every candidate's
output is checked against the first's: a configuration that computes something else is a bug
in its schedule, reported and never chosen.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import linear

log = logging.getLogger(__name__)

ROUNDS = 5
ROUND_SECONDS = 0.02  # calls per round: enough to fill this long, at least one


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs), else 32 MiB."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def linear_inputs(spec: linear.LinearSpec, rows: int, rng) -> dict:
    """Random arguments of a `fused_linear` kernel as the graph holds them (before packing)."""
    k, n = spec.k, spec.n
    a = {"x": rng.standard_normal((rows, k)), "bias": rng.standard_normal(n),
         "residual": rng.standard_normal((rows, spec.out_features)),
         "norm_scale": rng.standard_normal(k), "norm_bias": rng.standard_normal(k)}
    if spec.quant == "w8":
        a.update(w=rng.integers(-127, 128, (n, k)).astype(np.int8), w_scale=rng.random(n) / 64)
    elif spec.quant == "w4":
        groups = k // spec.group_size
        a.update(w=rng.integers(0, 16, (n, k)).astype(np.uint8), w_scale=rng.random((n, groups)) / 8,
                 w_zero=np.full((n, groups), 8.0))
    else:
        a["w"] = rng.standard_normal((n, k)) / np.sqrt(k)
    return {name: (v if v.dtype in (np.int8, np.uint8) else v.astype(spec.dtype))
            for name, v in a.items() if name in spec.arg_names()}


def measure_linear(spec: linear.LinearSpec, target: dict, configs: list, rows: int, deadline: float) -> list:
    """Seconds per call of each configuration at `rows` rows (inf where the deadline came first)."""
    import tvm

    dev = tvm.cpu(0)
    packed = {a: linear.PACKINGS[spec.packing(a)](v) if spec.packing(a) else v
              for a, v in linear_inputs(spec, rows, np.random.default_rng(0)).items()}
    args = {a: tvm.runtime.tensor(v, dev) for a, v in packed.items()}
    weights = [a for a in args if a.startswith(("w", "norm", "bias"))]
    copies = 1
    if rows == 1:
        size = sum(packed[a].nbytes for a in weights)
        copies = max(1, min(64, -(-2 * last_level_cache_bytes() // size)))
    sets = [args] + [{**args, **{a: tvm.runtime.tensor(packed[a], dev) for a in weights}}
                     for _ in range(copies - 1)]
    funcs, outputs = [], []
    y_dtype = str(linear.tensors(spec)[-1].dtype)
    # LLVM's code generation releases the GIL: the candidates build on every core
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        built = list(pool.map(lambda config: linear.build(spec, target, config)["main"], configs))
    for func in built:
        if time.monotonic() >= deadline:
            break
        out = tvm.runtime.tensor(np.zeros((rows, spec.out_features), y_dtype), dev)
        func(*[args[a] for a in spec.arg_names()[:-1]], out)
        outputs.append(out.numpy())
        funcs.append((func, out))
    ok = [_agrees(outputs[0], o) for o in outputs]
    for config, good in zip(configs, ok):
        if not good:
            log.warning("tuning %r: configuration %s computes another result; not used", spec, config)
    times = [[] for _ in funcs]
    turn = 0
    for _ in range(ROUNDS):
        for c, (func, out) in enumerate(funcs):
            if not ok[c]:
                continue
            spent = time.perf_counter()
            while True:
                call = sets[turn % copies]
                turn += 1
                begin = time.perf_counter()
                func(*[call[a] for a in spec.arg_names()[:-1]], out)
                end = time.perf_counter()
                times[c].append(end - begin)
                if end - spent >= ROUND_SECONDS:
                    break
        if time.monotonic() >= deadline:
            break
    return [float(np.median(t)) if t and ok[c] else float("inf") for c, t in enumerate(times)] + \
        [float("inf")] * (len(configs) - len(funcs))


def _agrees(a, b) -> bool:
    return bool(np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max())))
