"""llmc's side of a benchmark, in a process of its own: `python -m llmc.tools.runtime_worker
ARTIFACT [THREADS]` loads the artifact with the runtime alone (it never imports the compiler,
TVM's compiler, torch or onnx: what a deployed artifact gets) and answers one JSON command per
line on stdin with one JSON line on stdout."""

from __future__ import annotations

import collections
import json
import sys
import time

import numpy as np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prefill(model, prompt, last_only=True):
    model.executor.reset(batch=1)
    return _timed(lambda: model.forward(np.array([prompt]), 0, last_only=last_only))


def decode(model, prompt_len, steps):
    """Steps after a prefill of `prompt_len` tokens (the caller ran it), each feeding token 1."""
    return [_timed(lambda i=i: model.forward(np.array([[1]]), prompt_len + i)) for i in range(steps)]


def generate(model, prompt, steps):
    return model.generate(prompt, steps)


def profile(model, prompt, steps) -> dict:
    """Time per kernel (summed over its calls) in a prefill of `prompt` and per decode step
    after it (mean over `steps`), and the fraction of decode time spent outside the kernels.
    The first run of each binds the calls and is not counted."""
    ex = model.executor
    calls = collections.Counter(step["kernel"] for step in ex.plan)
    prefill(model, prompt)
    ex.timing = {}
    try:
        prefill(model, prompt)
        prefill_s = ex.timing
        model.forward(np.array([[1]]), len(prompt))
        ex.timing = spent = {}
        total = sum(_timed(lambda i=i: model.forward(np.array([[1]]), len(prompt) + 1 + i)) for i in range(steps))
    finally:
        ex.timing = None
    table = [{"kernel": k, "calls_per_step": calls[k], "prefill_ms": round(prefill_s.get(k, 0) * 1e3, 3),
              "decode_ms": round(spent[k] / steps * 1e3, 3)} for k in sorted(spent, key=spent.get, reverse=True)]
    return {"overhead": 1 - sum(spent.values()) / total, "kernels": table}


def compiler_modules() -> list[str]:
    """What this process imported beyond the runtime: nothing, if it measures what users get
    (TVM and tvm_ffi included: a CPU artifact's kernels run on libllmc)."""
    heavy = ("torch", "onnx", "onnxruntime", "tvm", "transformers", "llmc.passes", "llmc.frontends",
             "llmc.backends", "llmc.ir", "llmc.driver")
    return sorted(m for m in sys.modules if m.startswith(heavy))


COMMANDS = {"prefill": prefill, "decode": decode, "generate": generate, "profile": profile}


def main() -> None:
    from llmc import runtime

    model = runtime.load(sys.argv[1], threads=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(json.dumps({"threads": model.threads, "compiler_modules": compiler_modules()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "modules":
            result = compiler_modules()
        else:
            result = COMMANDS[command["op"]](model, **command["args"])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
