"""Compile Triton kernels ahead of time to cubins, with no GPU: `triton.compile` on an
ASTSource for a GPUTarget, in worker processes (one per core; Triton must not be in interpreter
mode there, and compiling is CPU-bound). Each cubin's entry point takes two more pointer
arguments after the kernel's own (Triton's global and profile scratch); the launch metadata
records their sizes, which the CUDA executor checks.

Run as `python -m llmc.backends.triton.aot JOBS OUT`: JOBS is a JSON list of jobs ({name,
module, function, constexprs, signature, num_warps, num_stages, arch}); for each, the cubin is
written to OUT/<arch>/<name>.cubin and one JSON line of metadata to stdout."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from llmc.errors import LlmcError

log = logging.getLogger(__name__)

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


def _compile_jobs(jobs: list[dict], folder: Path, out: Path) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmc.runtime.interpret import load_package

    modules = load_package(folder, sorted({j["module"] for j in jobs}))
    for job in jobs:
        fn = getattr(modules[job["module"]], job["function"])
        params = [p for p in fn.arg_names if p not in job["constexprs"]]
        signature = dict(zip(params, job["signature"]))
        signature.update({name: "constexpr" for name in job["constexprs"]})
        # every buffer the runtimes pass is aligned to 64 bytes or more: loads may vectorize
        attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p, t in signature.items() if t.startswith("*")}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=job["constexprs"], attrs=attrs),
                                      target=GPUTarget("cuda", ARCHS[job["arch"]], 32),
                                      options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        except Exception as e:  # the parent reports the last line of stderr
            cause = f" ({e.__cause__})" if e.__cause__ else ""  # Triton's own reason, behind the source line
            message = " ".join(f"{e}{cause}".split())
            print(f"kernel {job['name']} ({job['module']}.{job['function']}, {job['arch']}): {message}", file=sys.stderr)
            sys.exit(1)
        path = out / job["arch"] / f"{job['name']}.cubin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(compiled.asm["cubin"])
        meta = compiled.metadata
        # the scratch pointers Triton appends to the kernel's parameters: global (3.3 on), profile (3.5 on)
        scratch = [a for a in ("global_scratch_size", "profile_scratch_size") if hasattr(meta, a)]
        print(json.dumps({"name": job["name"], "arch": job["arch"], "symbol": meta.name, "shared": meta.shared,
                          "num_warps": meta.num_warps, "scratch_args": len(scratch),
                          **{a: getattr(meta, a, 0) for a in ("global_scratch_size", "profile_scratch_size")}}),
              flush=True)


def compile_all(jobs: list[dict], folder: Path, out: Path, progress=None, workers: int | None = None) -> list[dict]:
    """Compile `jobs` (the kernel sources in `folder`) into `out`, in parallel worker processes;
    returns their metadata. `progress` is called once per kernel compiled."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs, results, errors = [], [], []
    out.mkdir(parents=True, exist_ok=True)
    for w in range(workers):
        part = jobs[w::workers]
        spec = out / f"jobs{w}.json"
        spec.write_text(json.dumps(part))
        procs.append(subprocess.Popen([sys.executable, "-m", "llmc.backends.triton.aot", str(spec), str(out),
                                       str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env))

    def read(proc):
        for line in proc.stdout:
            results.append(json.loads(line))
            if progress:
                progress()
        errors.append(proc.stderr.read())
    threads = [threading.Thread(target=read, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    for t, p in zip(threads, procs):
        t.join()
        p.wait()
    for w, p in enumerate(procs):
        (out / f"jobs{w}.json").unlink()
        if p.returncode:
            detail = "\n".join(e.strip() for e in errors if e.strip())
            raise LlmcError(f"Triton could not compile a kernel: {detail.splitlines()[-1] if detail else p.returncode}")
    return results


def main(argv: list[str]) -> None:
    jobs, out, folder = json.loads(Path(argv[0]).read_text()), Path(argv[1]), Path(argv[2])
    _compile_jobs(jobs, folder, out)


if __name__ == "__main__":
    main(sys.argv[1:])
