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


def read_file(path: Path) -> np.ndarray:
    """The whole file read into anonymous memory, in 2 MiB pages where the kernel offers them
    (transparent huge pages). A decode step streams every weight; through a file map's 4 KiB
    pages that is a TLB miss every 4 KiB (SmolLM2 fp32 decodes 8-10% faster from huge pages).
    And a file rewritten or truncated under a running model (a recompile to the same path) no
    longer changes its weights or kills it with SIGBUS."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size == 0:
            return np.zeros(0, np.uint8)
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buf.madvise(mmap.MADV_HUGEPAGE)
        with memoryview(buf) as view:
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise SafetensorsError(f"{path}: the file shrank while being read")
                done += n
    return np.frombuffer(buf, dtype=np.uint8)


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
    # an unaligned view (an ONNX file's inline tensor) is valid numpy; `save` aligns what it writes
    return data[offset:offset + nbytes].view(dtype).reshape(shape)


def load(path, writable: bool = False, read: bool = False) -> dict[str, np.ndarray]:
    """The file's tensors, on a memory map of it (`map_file`), or with `read` in memory
    (`read_file`: writable)."""
    data = read_file(Path(path)) if read else map_file(Path(path), writable)
    return {name: tensor(data, *e, name) for name, e in entries(data).items() if not _is_pad(name)}


def _is_pad(name: str) -> bool:
    return name.startswith("__pad_") and name.endswith("__")


def save(path, tensors: dict, after_each=None) -> dict[str, tuple[str, list[int]]]:
    """Write `tensors` with each one's data at a 64-byte aligned offset of the file; returns
    {name: (numpy dtype name, shape)} as written.

    A value is an array, or a function of no arguments that makes it: those are made one at a
    time, written and dropped (then `after_each()` is called), so a file larger than memory can
    be written. The header's room is reserved first (from the names: an upper bound on each
    entry), and filled in with spaces, which JSON ignores, once the shapes are known."""
    names = sorted(tensors)
    # each entry (and the padding before it): the name, the keys, up to 8 dims and 2 offsets of 20 digits
    entry = len('"":{"dtype":"BOOL","shape":[],"data_offsets":[]},') + 10 * 21
    room = sum(len(json.dumps(n)) + entry + len(PAD.format(2 * len(names))) + entry for n in names) + 2
    start = 8 + room + (-(8 + room) % ALIGN)
    header, written, offset = {}, {}, 0
    with open(path, "wb") as f:
        f.seek(start)
        for name in names:
            value = tensors[name]
            a = np.require(value() if callable(value) else value, requirements="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if a.dtype not in _CODES:
                raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
            if a.ndim > 8:
                raise SafetensorsError(f"tensor {name!r}: {a.ndim} dims, at most 8 are written")
            gap = -offset % ALIGN
            if gap:
                header[PAD.format(len(header))] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
                f.write(bytes(gap))
                offset += gap
            header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
            written[name] = (a.dtype.name, list(a.shape))
            f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
            offset += a.nbytes
            del a
            if after_each is not None and callable(value):
                after_each()
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= start - 8, "the header outgrew its reserved room"
        f.seek(0)
        f.write(struct.pack("<Q", start - 8) + text + b" " * (start - 8 - len(text)))
    return written
