"""Peak resident memory of the runtime, measured as a user gets it: a fresh process that loads
an artifact with the runtime alone and generates. Reports how much the process's peak resident
set (VmHWM) rose over its size before loading (the interpreter, numpy and the kernel runtime
already in), after loading and after generating, beside what `llmc inspect` predicts.

    python -m llmc.tools.peak_memory ARTIFACT [PROMPT_TOKENS NEW_TOKENS]
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = """
import json, sys
import llmc.runtime
from llmc.runtime import kernels
kernels.library()
def status(key):  # bytes
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
before = status("VmRSS:")
m = llmc.runtime.load(sys.argv[1])
loaded = status("VmHWM:")
m.generate([1 + i % 90 for i in range(int(sys.argv[2]))], int(sys.argv[3]))
print(json.dumps({"load": loaded - before, "generate": status("VmHWM:") - before, "predicted": m.memory}))
"""


def measure(artifact, prompt: int = 128, new: int = 128) -> dict:
    """{"load": bytes, "generate": bytes, "predicted": llmc inspect's footprint}."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(artifact), str(prompt), str(new)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return json.loads(out.stdout)


def main() -> None:
    args = sys.argv[1:]
    result = measure(args[0], *map(int, args[1:3]))
    p = result["predicted"]
    mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731
    print(f"predicted: weights {mb(p['weights'])}, KV cache {mb(p['kv_cache'])}, activations {mb(p['activations'])}")
    print(f"measured peak rise: after loading {mb(result['load'])}, while generating {mb(result['generate'])}")
    target = (p["weights"] + p["kv_cache"]) * 1.1 + 50e6
    print(f"target (weights + KV cache + 10% + 50 MB): {mb(target)}: {'met' if result['generate'] <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
