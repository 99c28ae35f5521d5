"""Integer dot products for quantized GEMMs: TVM tensor intrinsics, one per instruction set and
weight encoding, all of one shape. A call multiplies four int8 activations (broadcast) by four
weight bytes of LANES output features and adds the sums to LANES int32 accumulators:

    C[i] += sum_c A[c] * B[i, c]                      (w8: the weight + 128 (u8), or the weight (s8))
    C[i] += sum_c A[c] * (B[i, c] & 15) + A[4 + c] * (B[i, c] >> 4)      (w4: two nibbles)

The weights are packed for it at compile time: four consecutive input features of an output
feature in one 32-bit word, output features side by side (`linear.pack_words`). One schedule
(`linear.schedule`) serves every instruction set; only the intrinsic differs:

- avx512vnni: `vpdpbusd` on 16 lanes (zmm). avxvnni: the same on 8 lanes (ymm).
- avx2: `vpmaddubsw` (u8 x s8 -> pairs summed in i16) then `vpmaddwd` by 1 (-> i32). Two
  products of an unsigned weight byte up to 255 and an int8 would overflow i16, so w8 keeps
  its signed weights and goes through the sign trick instead (as llama.cpp does): |a| times
  the weight with a's sign, which stays within 2 x 127 x 127 (`signed_weights`).
- dotprod (aarch64, ARMv8.2+): `sdot` on 4 lanes (a 128-bit NEON register), signed x signed
  into i32: w8 keeps its signed weights; the w4 nibbles (0..15) are signed bytes as they are.

LLVM does not form these instructions from a plain u8 x i8 reduction, hence the intrinsics.
"""

from __future__ import annotations

# instruction set (as LLVM names the feature) -> lanes (output features per call), best first
ISAS = {"avx512vnni": 16, "avxvnni": 8, "avx2": 8, "dotprod": 4}


def choose(target) -> str | None:
    """The best instruction set the target's CPU has for integer dot products, or None."""
    from tvm.target import codegen

    for isa in ISAS:
        if codegen.llvm_cpu_has_features([isa], target):
            return isa
    return None


def signed_weights(isa: str, quant: str) -> bool:
    """Whether the w8 weight bytes are the signed values (for the sign trick on avx2, and for
    sdot, which multiplies signed bytes), else value + 128, unsigned (VNNI, and the plain loops
    of a CPU without these instructions: so that a CPU without VNNI runs and tests the encoding
    VNNI reads)."""
    return quant == "w8" and isa in ("avx2", "dotprod")


def name(isa: str, quant: str) -> str:
    """The registered tensor intrinsic for an instruction set and weight encoding."""
    _register()
    return f"llmc_dot_{isa}_{quant}"


def _desc(lanes: int, quant: str, wdt: str):
    """What a call computes (the module's doc), as TensorIR the schedule's loops must match."""
    from tvm.script import tirx as T

    words = 4 if quant == "w8" else 8

    def product(A, B, i, c):
        if quant == "w8":
            return T.Cast("int32", A[c]) * T.Cast("int32", B[i, c])
        return (T.Cast("int32", A[c]) * T.Cast("int32", T.bitwise_and(B[i, c], T.uint8(15)))
                + T.Cast("int32", A[c + 4]) * T.Cast("int32", T.shift_right(B[i, c], T.uint8(4))))

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((words,), "int8", offset_factor=1), B: T.Buffer((lanes, 4), wdt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:words], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, c in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vc = T.axis.remap("SR", [i, c])
                    C[vi] = C[vi] + product(A, B, vi, vc)
    return desc


def _impl(isa: str, lanes: int, quant: str, wdt: str):
    """The intrinsic's body: one instruction sequence over a whole [lanes, 4] weight tile."""
    from tvm.script import tirx as T

    nbytes, n16 = lanes * 4, lanes * 2
    i8, i16, i32 = f"int8x{nbytes}", f"int16x{n16}", f"int32x{lanes}"
    words = 4 if quant == "w8" else 8

    def intrin(name, *args, dtype):
        return T.call_llvm_pure_intrin(dtype, name, *args)

    def bcast(A, at):  # four activation bytes repeated over every lane's word
        return T.reinterpret(i8, T.broadcast(T.reinterpret("int32", A.vload([at], "int8x4")), lanes))

    def dot(acc, w, a):  # acc + sum of 4 (u8 w) x (s8 a) per lane (sdot: s8 w)
        if isa == "dotprod":
            return intrin("llvm.aarch64.neon.sdot.v4i32.v16i8", acc, w, a, dtype=i32)
        if isa == "avx2":
            pairs = intrin("llvm.x86.avx2.pmadd.ub.sw", w, a, dtype=i16)
            return acc + intrin("llvm.x86.avx2.pmadd.wd", pairs, T.broadcast(T.int16(1), n16), dtype=i32)
        vpdpbusd = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
        return intrin(vpdpbusd, acc, w, a, dtype=i32)  # LLVM 20 takes the bytes as i8 vectors

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((words,), "int8", offset_factor=1), B: T.Buffer((lanes, 4), wdt, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:words], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            raw = B.vload([0, 0], f"{wdt}x{nbytes}")
            acc = C.vload([0], i32)
            if quant == "w8" and isa == "avx2":  # the sign trick (see the module's doc)
                a = bcast(A, 0)
                w = intrin("llvm.x86.avx2.psign.b", raw, a, dtype=i8)
                C[T.ramp(0, 1, lanes)] = dot(acc, intrin("llvm.abs", a, T.bool(False), dtype=i8), w)
            elif quant == "w8":
                C[T.ramp(0, 1, lanes)] = dot(acc, T.reinterpret(i8, raw), bcast(A, 0))
            else:
                low = T.reinterpret(i8, T.bitwise_and(raw, T.broadcast(T.uint8(15), nbytes)))
                high = T.reinterpret(i8, T.bitwise_and(T.shift_right(raw, T.broadcast(T.uint8(4), nbytes)),
                                                       T.broadcast(T.uint8(15), nbytes)))
                if isa == "avx2":  # both nibbles' pairs summed in i16 (4 x 15 x 127 fits), widened once
                    pairs = intrin("llvm.x86.avx2.pmadd.ub.sw", low, bcast(A, 0), dtype=i16) + \
                        intrin("llvm.x86.avx2.pmadd.ub.sw", high, bcast(A, 4), dtype=i16)
                    C[T.ramp(0, 1, lanes)] = acc + intrin("llvm.x86.avx2.pmadd.wd", pairs,
                                                          T.broadcast(T.int16(1), n16), dtype=i32)
                else:
                    C[T.ramp(0, 1, lanes)] = dot(dot(acc, low, bcast(A, 0)), high, bcast(A, 4))
    return impl


_registered = False


def _register():
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin

    for isa, lanes in ISAS.items():
        for quant in ("w8", "w4"):
            wdt = "int8" if signed_weights(isa, quant) else "uint8"
            TensorIntrin.register(f"llmc_dot_{isa}_{quant}", _desc(lanes, quant, wdt), _impl(isa, lanes, quant, wdt))
    _registered = True
