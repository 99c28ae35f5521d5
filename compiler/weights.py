"""The weight store: named tensors backed by memory-mapped files, never copied wholesale.

Sources are ONNX external-data files, safetensors files, and buffers the ONNX protobuf already
holds (inline initializers). Each file is mapped once; a tensor is a zero-copy view into it.
Passes that make new tensors (a concatenated QKV weight, quantized weights) add them with `add`.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ModelLoadError

_SAFETENSORS_DTYPES = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class WeightStore:
    def __init__(self):
        self._tensors: dict[str, np.ndarray] = {}
        self._maps: dict[Path, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._tensors:
            raise KeyError(f"weight {name!r} is already in the store")
        self._tensors[name] = array

    def discard(self, name: str) -> None:
        """Forget a tensor no graph uses any more (its file mapping stays open)."""
        self._tensors.pop(name, None)

    def map_file(self, path: Path) -> np.ndarray:
        """The whole file as a read-only uint8 array, mapped once per store."""
        path = Path(path).resolve()
        if path not in self._maps:
            if path.stat().st_size == 0:
                self._maps[path] = np.zeros(0, np.uint8)
            else:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[path] = np.frombuffer(mm, dtype=np.uint8)
        return self._maps[path]

    def add_from_file(self, name: str, path: Path, offset: int, length: int | None,
                      dtype: np.dtype, shape: tuple[int, ...]) -> None:
        """A tensor stored at `offset` in `path` (ONNX external data, safetensors)."""
        data = self.map_file(path)
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if length is not None and length != nbytes:
            raise ModelLoadError(f"{path}: tensor {name!r} has {length} bytes of external data, "
                                 f"but {dtype}{list(shape)} needs {nbytes}")
        if offset + nbytes > data.size:
            raise ModelLoadError(f"{path}: tensor {name!r} needs bytes {offset}..{offset + nbytes}, "
                                 f"but the file has {data.size} (truncated?)")
        view = data[offset:offset + nbytes]
        if offset % dtype.itemsize:  # unaligned: numpy cannot view it in place
            view = view.copy()
        self.add(name, view.view(dtype).reshape(shape))

    def add_safetensors(self, path: str | os.PathLike, prefix: str = "") -> list[str]:
        """Map every tensor of a safetensors file; returns the names added."""
        path = Path(path)
        data = self.map_file(path)
        try:
            (header_len,) = struct.unpack("<Q", data[:8].tobytes())
            header = json.loads(data[8:8 + header_len].tobytes())
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not a safetensors file ({e})") from None
        names = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            self.add_from_file(prefix + name, path, 8 + header_len + start, end - start,
                               _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
            names.append(prefix + name)
        return names
