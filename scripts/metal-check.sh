#!/usr/bin/env bash
# The Metal check, for a Mac with Apple silicon (macOS 13+, Python 3.10+, network for pip): makes
# a virtual environment in .venv-metal, installs llmc with the zoo (torch, transformers,
# onnxruntime) and PyObjC's Metal bindings, and runs gpu_tests/test_metal.py: every zoo decoder
# family compiled with --target metal and run on the Mac's GPU against onnxruntime. The log goes
# to ${OUT:-metal-check-out}/tests.log. Until this has passed on a Mac, the metal target is
# untested on hardware (README, docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" != Darwin ]; then
    echo "metal-check.sh: run this on a Mac (the metal target needs an Apple GPU)" >&2
    exit 2
fi
OUT=${OUT:-metal-check-out}
mkdir -p "$OUT"
python3 -m venv .venv-metal
.venv-metal/bin/python -m pip install --quiet --disable-pip-version-check -e '.[zoo,metal]' pytest
{ sw_vers; sysctl -n machdep.cpu.brand_string; } | tee "$OUT/machine.txt"
.venv-metal/bin/python -m pytest -q -p no:cacheprovider gpu_tests/test_metal.py 2>&1 | tee "$OUT/tests.log"
exit "${PIPESTATUS[0]}"
