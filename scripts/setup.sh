#!/usr/bin/env bash
# Create .venv (once) and install llmc with everything its tests and zoo need.
# torch comes first and pinned: this machine kind keeps a CPU build of torch 2.13.0 on disk,
# while an unpinned install would download a CUDA build of several GB. Override with LLMC_TORCH.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${LLMC_TORCH:-torch==2.13.0}"
# llama-cpp-python (the peers extra) builds llama.cpp: on every core, without libcurl
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_CURL=OFF}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
