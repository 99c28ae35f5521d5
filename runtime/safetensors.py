"""Read and write safetensors files (numpy only; the format is an 8-byte header length, a JSON
header, and the tensors' bytes, one after another).

The runtime uses an artifact's weights in place, as numpy views on a private memory map of the
file: nothing is copied, the pages are the page cache's (shared by every process that maps the
file) until written, and only the pages a kernel touches are read from disk. TVM's kernels
assume 64-byte aligned tensors, so `save` aligns every tensor's data: the header is padded with
spaces (which JSON ignores) and the gaps between tensors are filled by padding tensors (uint8,
named `__pad_N__`), because the format allows no holes. Any safetensors reader reads the file.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

DTYPES = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    pass


ALIGN = 64
PAD = "__pad_{}__"
_CODES = {np.dtype(t): code for code, t in DTYPES.items()}


def map_file(path: Path, writable: bool = False) -> np.ndarray:
    """The whole file as a uint8 array on a memory map: read-only, or `writable` on a private
    (copy-on-write) map, as DLPack needs to hand a tensor to a kernel, while the file stays as
    it is."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return np.zeros(0, np.uint8)
        access = mmap.ACCESS_COPY if writable else mmap.ACCESS_READ
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=access), dtype=np.uint8)


def entries(data: np.ndarray) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, byte offset in the file, byte length), from a mapped file."""
    try:
        (header_len,) = struct.unpack("<Q", data[:8].tobytes())
        if 8 + header_len > data.size:
            raise ValueError(f"header of {header_len} bytes does not fit in {data.size}")
        header = json.loads(data[8:8 + header_len].tobytes())
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"not a safetensors file ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"tensor {name!r} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        out[name] = (np.dtype(DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + header_len + start, end - start)
    return out


def tensor(data: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], offset: int, length: int | None,
           name: str) -> np.ndarray:
    """One tensor of a mapped file, checked against the file's size."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if length is not None and length != nbytes:
        raise SafetensorsError(f"tensor {name!r} has {length} bytes, but {dtype}{list(shape)} needs {nbytes}")
    if offset + nbytes > data.size:
        raise SafetensorsError(f"tensor {name!r} needs bytes {offset}..{offset + nbytes}, but the file has "
                               f"{data.size} (truncated?)")
    view = data[offset:offset + nbytes]
    if offset % dtype.itemsize:  # unaligned: numpy cannot view it in place
        view = view.copy()
    return view.view(dtype).reshape(shape)


def load(path, writable: bool = False) -> dict[str, np.ndarray]:
    data = map_file(Path(path), writable)
    return {name: tensor(data, *e, name) for name, e in entries(data).items() if not _is_pad(name)}


def _is_pad(name: str) -> bool:
    return name.startswith("__pad_") and name.endswith("__")


def save(path, tensors: dict[str, np.ndarray]) -> None:
    """Write `tensors` with each one's data at a 64-byte aligned offset of the file."""
    header, layout, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.require(tensors[name], requirements="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        if a.dtype not in _CODES:
            raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        gap = -offset % ALIGN
        if gap:
            header[PAD.format(len(layout))] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            layout.append(np.zeros(gap, np.uint8))
            offset += gap
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        layout.append(a)
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for a in layout:
            f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
