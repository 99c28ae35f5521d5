#!/usr/bin/env bash
# Create .venv (once) and install llmc with everything its tests and zoo need.
# torch comes first and pinned: this machine kind keeps a CPU build of torch 2.13.0 on disk,
# while an unpinned install would download a CUDA build of several GB. Override with LLMC_TORCH.
set -euo pipefail
cd "$(dirname "$0")/.."
# The arm64 tests run the native runtime under emulation and read the kernels' disassembly:
# Debian's qemu-user, the aarch64 loader and libc, and aarch64 binutils. The GPU schedules'
# tests run their OpenCL kernels on pocl, an OpenCL driver for the CPU, through the ICD loader.
# (As root, where apt is.)
SYSTEM_PACKAGES="qemu-user libc6-arm64-cross binutils-aarch64-linux-gnu pocl-opencl-icd ocl-icd-libopencl1"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! dpkg -s $SYSTEM_PACKAGES >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SYSTEM_PACKAGES >/dev/null
    fi
elif ! command -v qemu-aarch64 >/dev/null || [ ! -d /etc/OpenCL/vendors ]; then
    echo "setup.sh: not root: install $SYSTEM_PACKAGES for the arm64 and OpenCL tests" >&2
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${LLMC_TORCH:-torch==2.13.0}"
# llama-cpp-python (the peers extra) builds llama.cpp: on every core, without libcurl
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_CURL=OFF}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
