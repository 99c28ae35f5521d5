"""C toolchains: linking the kernel libraries of a target that is not this machine, and building
the native runtime (`runtime/native/`) for a target.

The compiler comes from the package registries, as the rest of the project does: PyPI's
`ziglang` (`zig cc -target aarch64-linux-gnu.2.17`: clang with every target's libc headers and
link stubs, no root needed; the `cross` extra). For this machine's own architecture the system's
`cc` serves when there is one, as it does for TVM's x86 libraries; Debian's cross gcc
(`aarch64-linux-gnu-gcc`) is used when zig is not installed. `LLMC_CC` overrides the choice,
e.g. with an Android NDK's clang (`.../bin/aarch64-linux-android24-clang`).

Programs and libraries link against glibc 2.17 symbols at most (zig picks the version), so they
run on any Linux of the last decade.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import LlmcError

log = logging.getLogger(__name__)

# llmc's name for an architecture -> the GNU triple
TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
ALIASES = {"x86_64": "x86_64", "x86-64": "x86_64", "amd64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
GLIBC = "2.17"


def arch_of(name: str) -> str:
    if name not in ALIASES:
        raise LlmcError(f"architecture {name!r} is not supported; supported: x86_64, arm64")
    return ALIASES[name]


def compiler(arch: str) -> list[str]:
    """The C compiler command for `arch` ("x86_64" or "aarch64")."""
    override = os.environ.get("LLMC_CC")
    if override:
        return shlex.split(override)
    from llmc.runtime.cpu import arch as host_arch

    if arch == host_arch() and shutil.which("cc"):
        return ["cc"]
    if importlib.util.find_spec("ziglang"):
        return [sys.executable, "-m", "ziglang", "cc", "-target", f"{TRIPLES[arch]}.{GLIBC}"]
    cross = f"{TRIPLES[arch]}-gcc"
    if shutil.which(cross):
        return [cross]
    raise LlmcError(f"no C compiler for {arch}: install the cross toolchain (pip install 'llmc[cross]', which "
                    f"brings zig), or Debian's gcc-{TRIPLES[arch].replace('_', '-')}, or set LLMC_CC")


def run(command: list[str], what: str) -> None:
    log.debug("%s", shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise LlmcError(f"{what} failed ({shlex.join(command[:6])} ...):\n{tail}")


def shared_library_linker(arch: str):
    """An `fcompile` for TVM's `export_library`: links the kernels' object files into a shared
    library for `arch`."""
    def fcompile(output, objects, options=None):
        run(compiler(arch) + ["-shared", "-fPIC", "-o", str(output), *map(str, objects), *(options or []), "-lm"],
            f"linking the {arch} kernel library")
    fcompile.output_format = "so"
    return fcompile


def build_runtime(arch: str, output, shared: bool = False) -> Path:
    """Build `llmc-run` (or, `shared`, the library `libllmc.so` with the C API of llmc.h) for
    `arch` from the native runtime's sources; returns the output path."""
    import llmc.runtime

    native = Path(llmc.runtime.__file__).parent / "native"
    output = Path(output)
    if not output.parent.is_dir():
        raise LlmcError(f"{output}: the folder {output.parent} does not exist")
    sources = sorted(str(p) for p in native.glob("*.c") if shared is False or p.name != "main.c")
    if not sources:
        raise LlmcError(f"{native}: the native runtime's sources are missing from this installation")
    flags = ["-std=c11", "-O2", "-D_GNU_SOURCE", "-fvisibility=hidden", "-ffunction-sections", "-fdata-sections",
             "-Wl,--gc-sections", "-s"]
    # TVMFFIErrorSetRaisedFromCStrParts: the kernel libraries call it in the loading program
    flags += ["-shared", "-fPIC"] if shared else ["-rdynamic"]
    run(compiler(arch) + flags + ["-o", str(output), *sources, "-ldl", "-lm", "-lpthread"],
        f"building the native runtime for {arch}")
    return output
