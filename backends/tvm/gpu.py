"""GPU kernels from TVM for OpenCL (Android's Adreno and Mali, and here pocl on the CPU) and
Metal (Apple): a scheduled TensorIR function becomes device source and a launch table that a
runtime without TVM follows.

TVM's lowering splits a function into device kernels and a host function that binds the dims
and launches them (`call_ffi_kernel(name, *args, *extents)`). The launch table is read off
that call: each kernel's arguments (the function's buffers by position, its dims by name) and
its launch extents, in the order of its launch tags (blockIdx.*, threadIdx.*), as expressions
over the run-time dims (`llmc.runtime.dims`). The runtime sizes the work from them: an NDRange
of extents.blockIdx * extents.threadIdx global items in work-groups of threadIdx.

Schedules: TVM's dlight rules (GEMV, reductions, a fallback that binds every loop nest to
threads), until an op family gets its own.
"""

from __future__ import annotations

from llmc.runtime.dims import DIMS

TARGETS = {
    "opencl": {"kind": "opencl", "host": {"kind": "llvm"}},
    "metal": {"kind": "metal", "thread_warp_size": 32, "host": {"kind": "llvm", "mtriple": "arm64-apple-macos"}},
}


def target(kind: str):
    import tvm

    return tvm.target.Target(TARGETS[kind])


def default_schedule(func, kind: str):
    """`func` scheduled by dlight's GPU rules for `kind`'s target, as an IRModule."""
    import tvm
    from tvm.s_tir import dlight as dl

    with target(kind):
        return dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.Fallback())(
            tvm.IRModule({"main": func}))


def expression(e, lets: dict) -> str:
    """A launch extent or scalar argument (a TIR integer expression over the dims, through the
    host's `lets`) as `llmc.runtime.dims` parses it."""
    import tvm
    from tvm import tirx

    if isinstance(e, tirx.IntImm):
        return str(int(e.value))
    if isinstance(e, tvm.ir.Var):
        if e.name in DIMS:
            return e.name
        if e in lets:
            return expression(lets[e], lets)
        raise NotImplementedError(f"a launch value the runtime cannot evaluate: {e.name}")
    if isinstance(e, tirx.Cast):
        return expression(e.value, lets)
    ops = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*", tirx.FloorDiv: "//"}
    for kind, op in ops.items():
        if isinstance(e, kind):
            return f"({expression(e.a, lets)} {op} {expression(e.b, lets)})"
    for kind, name in ((tirx.Min, "min"), (tirx.Max, "max")):
        if isinstance(e, kind):
            return f"{name}({expression(e.a, lets)}, {expression(e.b, lets)})"
    raise NotImplementedError(f"a launch value the runtime cannot evaluate: {e}")


def _host_calls(host_mod) -> tuple[dict[str, list], dict]:
    """({kernel name: the host's launch call's arguments}, in the order the host launches them;
    the host's let-bound variables and their values)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    calls, lets = {}, {}

    def call(node):
        if getattr(node.op, "name", "") == "tirx.call_ffi_kernel":
            calls[node.args[0].value] = list(node.args[1:])

    def let(node):
        lets[node.var] = node.value
    for func in host_mod.functions.values():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(func.body, [(tvm.ir.Call, call), ((tirx.Bind, tirx.LetStmt, tirx.Let), let)],
                                    order="pre")
    return calls, lets


def build(mod, kind: str) -> dict:
    """Device source and launch table of a scheduled IRModule with one function `main`:
    {"source", "kernels": [{"name", "args": [int (main's buffer parameter) | [expression, dtype]],
    "launch": {"blockIdx.x": extent, ...}}]} in the order the host launches them."""
    import tvm
    from tvm.tirx.build import split_host_device_mods, tir_to_runtime

    tgt = target(kind)
    main = mod["main"]
    buffers = {p.name: i for i, p in enumerate(main.params) if "Buffer" in type(p.ty).__name__}
    lowered = tvm.tirx.transform.BindTarget(tgt.with_host(tgt.host))(mod)
    pipeline, finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(tgt)
    host_mod, device_mods = split_host_device_mods(pipeline(lowered))
    devices = {gv.name_hint: f for d in device_mods.values() for gv, f in d.functions.items()}
    kernels = []
    calls, lets = _host_calls(host_mod)
    for name, call in calls.items():
        func = devices[name]
        tags = list(func.attrs["tirx.kernel_launch_params"])
        if not all(t.startswith(("blockIdx.", "threadIdx.")) for t in tags):
            raise NotImplementedError(f"{name}: launch parameters {tags} (dynamic shared memory?)")
        args = []
        for p, value in zip(func.params, call):
            buffer = p.name.removesuffix("_ptr")
            if buffer in buffers:
                args.append(buffers[buffer])
            elif "Pointer" in type(p.ty).__name__:
                raise NotImplementedError(f"{name}: {p.name} is an intermediate in global memory, not a buffer "
                                          "of the function (a stage the schedule did not inline)")
            else:  # a scalar the host computes from the dims
                args.append([expression(value, lets), str(p.ty)])
        kernels.append({"name": name, "args": args,
                        "launch": {t: expression(e, lets) for t, e in zip(tags, call[len(func.params):])}})
    runtime_mod = tir_to_runtime(finalize_host()(host_mod), {t: finalize_device()(d) for t, d in device_mods.items()},
                                 tgt.host)
    return {"source": runtime_mod.imports[0].inspect_source(), "kernels": kernels}
