"""Element types of IR tensors, with their numpy equivalents."""

from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f64 = "f64"
    i64 = "i64"
    i32 = "i32"
    i8 = "i8"
    u8 = "u8"
    i4 = "i4"  # two per byte, packed; no numpy equivalent
    bool = "bool"

    def __str__(self) -> str:
        return self.value

    @property
    def itemsize(self) -> float:
        return 0.5 if self is DType.i4 else self.numpy().itemsize

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.f64)

    def numpy(self) -> np.dtype:
        if self is DType.bf16:
            import ml_dtypes  # installed with onnx; only bf16 models need it

            return np.dtype(ml_dtypes.bfloat16)
        if self is DType.i4:
            raise TypeError("i4 is packed two per byte and has no numpy dtype")
        return np.dtype(_TO_NUMPY[self])

    @staticmethod
    def from_numpy(dtype) -> "DType":
        dtype = np.dtype(dtype)
        if dtype.name == "bfloat16":
            return DType.bf16
        try:
            return _FROM_NUMPY[dtype]
        except KeyError:
            raise TypeError(f"numpy dtype {dtype} has no IR equivalent") from None


_TO_NUMPY = {
    DType.f32: np.float32, DType.f16: np.float16, DType.f64: np.float64, DType.i64: np.int64,
    DType.i32: np.int32, DType.i8: np.int8, DType.u8: np.uint8, DType.bool: np.bool_,
}
_FROM_NUMPY = {np.dtype(v): k for k, v in _TO_NUMPY.items()}
