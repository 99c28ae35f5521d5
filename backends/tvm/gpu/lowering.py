"""GPU kernels from TVM for OpenCL (Android's Adreno and Mali, and here pocl on the CPU) and
Metal (Apple): a scheduled TensorIR function becomes device source and a launch table that a
runtime without TVM follows.

TVM's lowering splits a function into device kernels and a host function that binds the dims,
allocates the intermediates kernels pass on, and launches the kernels
(`call_ffi_kernel(name, *args, *extents)`). The launch table is read off that host code (`Lowered`):
each kernel's arguments (the function's buffers by position, intermediates as scratch, scalars)
and its launch extents, in the order of its launch tags (blockIdx.*, threadIdx.*), with every
size as an expression over the run-time dims (`llmc.runtime.dims`). The runtime launches a grid
of blockIdx work-groups of threadIdx threads.

The GEMMs, attention and the norms have schedules of their own (`gpu.linear`, `gpu.attention`,
`gpu.norm`); the rest take `default_schedule`: TVM's dlight rules where they apply, else one
thread per output element (`thread_per_output`). A kernel group may hold variants of its
function, each run at the dims its condition holds (`group_table`).
"""

from __future__ import annotations

from llmc.runtime.dims import DIMS

METAL_PREAMBLE = "#include <metal_stdlib>\nusing namespace metal;\n\nunion __TVMArgUnion {\n int v_int[2];\n};\n"
TARGETS = {
    "opencl": {"kind": "opencl", "host": {"kind": "llvm"}},
    "metal": {"kind": "metal", "thread_warp_size": 32, "host": {"kind": "llvm", "mtriple": "arm64-apple-macos"}},
}


def target(kind: str):
    import tvm

    return tvm.target.Target(TARGETS[kind])


def named(mod, symbol: str):
    """`mod` (one function) with its function named `symbol`: its kernels are named after it."""
    import tvm

    (func,) = mod.functions.values()
    return tvm.IRModule({symbol: func.with_attr("global_symbol", symbol)})


def default_schedule(func, kind: str, threads: int = 256):
    """`func` scheduled for `kind`'s target, as an IRModule: dlight's GEMV and reduction rules
    where they apply, else `thread_per_output`. Some dlight rules raise on a function they do
    not fit instead of declining it; those take the fallback too."""
    import tvm
    from tvm.s_tir import dlight as dl

    symbol = func.attrs["global_symbol"] if func.attrs and "global_symbol" in func.attrs else "main"
    mod = tvm.IRModule({symbol: func})
    with target(kind):
        try:
            return dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.Fallback())(mod)
        except RuntimeError:  # a ScheduleError, or an InternalError of a primitive a rule tried
            return thread_per_output(mod, threads)


def thread_per_output(mod, threads: int = 256):
    """The simplest GPU schedule of any function (`mod`'s one): stages that only compute elements inlined into
    their readers where they can be, then each remaining stage a kernel of one thread per output
    element (its spatial loops fused and split over work-groups of `threads`), its reduction
    serial in the thread. Correct for every function; fast for none but the elementwise ones."""
    import tvm

    sch = tvm.s_tir.Schedule(mod)
    (symbol,) = [gv.name_hint for gv in mod.functions]
    sch.work_on(symbol)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        if not any(v.iter_type != 0 for v in sch.get(block).iter_vars):
            try:
                sch.compute_inline(block)
            except RuntimeError:  # an output, or read in a way inlining cannot follow
                pass
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        spatial = [l for l, v in zip(loops, sch.get(block).iter_vars) if v.iter_type == 0]
        fused = sch.fuse(*spatial) if spatial else sch.add_unit_loop(block)
        groups, items = sch.split(fused, [None, threads])
        sch.bind(groups, "blockIdx.x")
        sch.bind(items, "threadIdx.x")
    return sch.mod


def split_exactly(k: int, threads: int, vector: int) -> tuple[int, int]:
    """(threads, vector) that divide a reduction over k exactly: `threads`, or the largest power
    of two below it that divides k; `vector`, or the largest value down to 1 that divides what
    is left. (TVM drops a split's tail predicate when a reduction is moved under another loop:
    inexact splits would read past the row.)"""
    while k % threads:
        threads //= 2
    while (k // threads) % vector:
        vector -= 1
    return threads, vector


def rfactor(sch, block, threads: int, vector: int = 1):
    """`block`'s reduction (its last loop) split for `threads` threads each summing `vector`
    consecutive elements per step; returns the block of the per-thread partial sums (the
    original then sums those, across the threads)."""
    red = sch.get_loops(block)[-1]
    outer, lane, inner = sch.split(red, [None, threads, vector])
    sch.reorder(lane, outer, inner)
    return sch.rfactor(lane, 0)


def bind_reduction(sch, block, partial, depth: int, scope: str = "local"):
    """The partial sums in registers, their loop over the threads (at `depth`) on threadIdx.x,
    and the sum across the threads a cross-thread reduction, its result in `scope`."""
    loops = sch.get_loops(partial)
    sch.bind(loops[depth], "threadIdx.x")
    sch.unroll(loops[-1])
    sch.set_scope(partial, 0, "local")
    loops = sch.get_loops(block)
    sch.reorder(*loops[depth + 1:], loops[depth])  # TVM reduces across threads innermost
    sch.bind(loops[depth], "threadIdx.x")
    sch.set_scope(block, 0, scope)


BINARY = ("Add", "+"), ("Sub", "-"), ("Mul", "*"), ("FloorDiv", "//")


def expression(e, lets: dict, bindings: dict[str, str]) -> str:
    """A launch extent or scalar argument (a TIR integer expression) as `llmc.runtime.dims`
    parses it: over the run-time dims, a variable of the function through `bindings` (its value
    as such an expression: the kernel's rows, a cache's length), a host variable through the
    host's `lets`. The host's variables are substituted first and the whole simplified knowing
    that every dim is >= 0, which removes the conditionals the lowering leaves."""
    import tvm
    import tvm.sym
    from tvm import tirx

    free = {}

    def resolve(e):
        if isinstance(e, tvm.ir.Var):
            if e in lets and e.name not in bindings and e.name not in DIMS:
                return resolve(lets[e])
            free[e.name] = e
            return e
        if isinstance(e, tirx.Cast):
            return tirx.Cast(e.ty, resolve(e.value))
        for kind in (tirx.Add, tirx.Sub, tirx.Mul, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max, tirx.LT,
                     tirx.LE, tirx.GT, tirx.GE, tirx.EQ, tirx.NE, tirx.And, tirx.Or):
            if isinstance(e, kind):
                return kind(resolve(e.a), resolve(e.b))
        if isinstance(e, tirx.Not):
            return tirx.Not(resolve(e.a))
        if isinstance(e, tirx.Select):
            return tirx.Select(resolve(e.condition), resolve(e.true_value), resolve(e.false_value))
        return e

    resolved = resolve(e)
    analyzer = tvm.sym.Analyzer()
    for var in free.values():
        analyzer.bind(var, tvm.ir.Range(0, 1 << 40))
    simple = analyzer.simplify(resolved)

    def text(e):
        if isinstance(e, tirx.IntImm):
            return str(int(e.value))
        if isinstance(e, tvm.ir.Var):
            if e.name in bindings:
                return f"({bindings[e.name]})"
            if e.name in DIMS:
                return e.name
            raise NotImplementedError(f"a launch value the runtime cannot evaluate: {e.name}")
        if isinstance(e, tirx.Cast):
            return text(e.value)
        for kind, op in BINARY:
            if isinstance(e, getattr(tirx, kind)):
                return f"({text(e.a)} {op} {text(e.b)})"
        for kind, name in ((tirx.Min, "min"), (tirx.Max, "max")):
            if isinstance(e, kind):
                return f"{name}({text(e.a)}, {text(e.b)})"
        raise NotImplementedError(f"a launch value the runtime cannot evaluate: {e}")
    return text(simple)


def _host_calls(host_mod) -> tuple[dict[str, list], dict, dict]:
    """({kernel name: the host's launch call's arguments}, in the order the host launches them;
    the host's let-bound variables and their values; the buffers it allocates between kernels,
    by name)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    calls, lets, scratch = {}, {}, {}

    def call(node):
        if getattr(node.op, "name", "") == "tirx.call_ffi_kernel":
            calls[node.args[0].value] = list(node.args[1:])

    def let(node):
        lets[node.var] = node.value

    def alloc(node):
        scratch[node.buffer.name] = node.buffer
    for func in host_mod.functions.values():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(func.body, [(tvm.ir.Call, call), ((tirx.Bind, tirx.LetStmt, tirx.Let), let),
                                                (tirx.AllocBuffer, alloc)], order="pre")
    return calls, lets, scratch


class Lowered:
    """One scheduled function lowered for a GPU target: its launch table (`table`), and its host
    and device code, which `source` turns into device source together with other functions'."""

    def __init__(self, mod, kind: str, bindings: dict[str, str] | None = None):
        """`mod`: a scheduled IRModule of one function; `bindings`: the function's variables
        that are not run-time dims, as expressions over them."""
        import tvm
        from tvm.tirx.build import split_host_device_mods

        self.kind, bindings = kind, bindings or {}
        tgt = target(kind)
        (main,) = mod.functions.values()
        buffers = {p.name: i for i, p in enumerate(main.params) if "Buffer" in type(p.ty).__name__}
        lowered = tvm.tirx.transform.BindTarget(tgt.with_host(tgt.host))(mod)
        pipeline, self.finalize_host, self.finalize_device = tvm.tirx.get_default_tir_pipeline(tgt)
        self.host, device_mods = split_host_device_mods(pipeline(lowered))
        self.devices = {gv: f for d in device_mods.values() for gv, f in d.functions.items()}
        by_name = {gv.name_hint: f for gv, f in self.devices.items()}
        kernels, scratch = [], []
        calls, lets, allocated = _host_calls(self.host)
        for name, call in calls.items():
            func = by_name[name]
            tags = list(func.attrs["tirx.kernel_launch_params"])
            if not all(t.startswith(("blockIdx.", "threadIdx.")) for t in tags):
                raise NotImplementedError(f"{name}: launch parameters {tags} (dynamic shared memory?)")
            args = []
            for p, value in zip(func.params, call):
                buffer = p.name.removesuffix("_ptr")
                if buffer in buffers:
                    args.append(buffers[buffer])
                elif buffer in allocated:  # an intermediate in global memory, between two kernels
                    names = [s["name"] for s in scratch]
                    if buffer not in names:
                        b = allocated[buffer]
                        elements = " * ".join(f"({expression(d, lets, bindings)})" for d in b.shape) or "1"
                        scratch.append({"name": buffer, "dtype": str(b.dtype), "elements": elements})
                        names.append(buffer)
                    args.append({"scratch": names.index(buffer)})
                elif "Pointer" in type(p.ty).__name__:
                    raise NotImplementedError(f"{name}: parameter {p.name} is no buffer the runtime can give")
                else:  # a scalar the host computes from the dims
                    args.append([expression(value, lets, bindings), str(p.ty)])
            launch = {t: expression(e, lets, bindings) for t, e in zip(tags, call[len(func.params):])}
            kernels.append({"name": name, "args": args, "launch": launch})
        self.table = {"kernels": kernels, "scratch": scratch}


def source(lowered: list[Lowered]) -> str:
    """The device source of every kernel of `lowered` (one target kind, distinct names), from one
    code generation: one preamble, every kernel once."""
    import tvm
    from tvm.tirx.build import tir_to_runtime

    first = lowered[0]
    tgt = target(first.kind)
    host = tvm.IRModule({gv: f for low in lowered for gv, f in low.host.functions.items()})
    device = tvm.IRModule({gv: f for low in lowered for gv, f in low.devices.items()})
    device_target = next(iter(first.devices.values())).attrs["target"]
    runtime_mod = tir_to_runtime(first.finalize_host()(host), {device_target: first.finalize_device()(device)},
                                 tgt.host)
    text = runtime_mod.imports[0].inspect_source()
    # TVM's Metal code generation writes each kernel as a library of its own, each with this
    # preamble: kept once, the kernels are one library
    start = text.find(METAL_PREAMBLE) + len(METAL_PREAMBLE)
    return text[:start] + text[start:].replace(METAL_PREAMBLE, "") if first.kind == "metal" else text


def group_table(variants: list[tuple[Lowered, str | None]]) -> dict:
    """One kernel group's launch table (`Lowered.table`) from the variants of its function
    (`(lowered, condition)`): every variant's kernels in turn, each kernel's grid multiplied by
    its variant's condition (an expression that is 1 where the variant runs, else 0; None:
    always), and the variants' scratch side by side. The runtimes skip an empty grid, so each
    step runs the variants whose condition holds at its dims."""
    kernels, scratch = [], []
    for low, condition in variants:
        base = len(scratch)
        scratch += low.table["scratch"]
        for kernel in low.table["kernels"]:
            args = [{"scratch": a["scratch"] + base} if isinstance(a, dict) else a for a in kernel["args"]]
            launch = dict(kernel["launch"])
            if condition:
                launch["blockIdx.x"] = f"{launch.get('blockIdx.x', '1')} * {condition}"
            kernels.append({**kernel, "args": args, "launch": launch})
    return {"kernels": kernels, "scratch": scratch}


def build(variants: list[tuple], kind: str) -> dict:
    """One kernel group built alone: its variants' (scheduled module, bindings, condition)
    lowered, their launch table (`group_table`) and their device source ("source"). The table:
    {"kernels": [{"name", "args", "launch": {"blockIdx.x": extent, ...}}] in the order the host
    launches them, "scratch": [{"name", "dtype", "elements"}]}. An argument is an int (the
    function's buffer parameter of that position), {"scratch": i} (an intermediate in global
    memory that kernels pass on, of `elements` items) or [expression, dtype] (a scalar)."""
    lowered = [(Lowered(mod, kind, bindings), condition) for mod, bindings, condition in variants]
    return {**group_table(lowered), "source": source([low for low, _ in lowered])}
