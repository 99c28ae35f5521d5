"""GPU tests (`scripts/gpu-check.sh` runs them on a machine with an NVIDIA GPU; the default test
run never collects this folder). They share the CPU tests' helpers."""

import os
import sys
from pathlib import Path

# the interpreter's results are the reference: on before triton is imported (compiling to cubins
# happens in worker processes without it)
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from conftest import rng  # noqa: E402,F401  (the seeded generator fixture)
