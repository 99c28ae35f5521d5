"""The weight store: named tensors backed by memory-mapped files, never copied wholesale.

Sources are ONNX files (their inline initializers' bytes, found by `frontends.onnx.wire`), ONNX
external-data files and safetensors files. Each file is mapped once; a tensor is a zero-copy view
into it. Passes that make new tensors (quantized weights) add them with `add`; a tensor made
cheaply from others (a concatenated QKV weight) is added as the function that makes it. Nothing
here unpickles anything.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from llmc.runtime import safetensors

from .errors import ModelLoadError

class WeightStore:
    def __init__(self):
        self._tensors: dict[str, np.ndarray] = {}
        self._maps: dict[Path, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        return tensor() if callable(tensor) else tensor

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def add(self, name: str, array) -> None:
        """`array`: an array, or a function of no arguments making it from tensors of the store (a
        merged weight: the concatenation of mapped ones), called on each read and never kept, so
        that it takes no memory before the artifact is written."""
        if name in self._tensors:
            raise KeyError(f"weight {name!r} is already in the store")
        self._tensors[name] = array

    def discard(self, name: str) -> None:
        """Forget a tensor no graph uses any more (its file mapping stays open)."""
        self._tensors.pop(name, None)

    def release_pages(self) -> None:
        """Hand the mapped files' pages back to the page cache: a tensor read since stays valid
        and is read again when next touched. Streaming writers call this after each weight, so
        that the model file does not become resident as a whole."""
        for data in self._maps.values():
            mapped = getattr(data.base, "obj", None)  # np.frombuffer's memoryview of the mmap
            if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)

    def map_file(self, path: Path) -> np.ndarray:
        """The whole file as a read-only uint8 array, mapped once per store."""
        path = Path(path).resolve()
        if path not in self._maps:
            self._maps[path] = safetensors.map_file(path)
        return self._maps[path]

    def add_from_file(self, name: str, path: Path, offset: int, length: int | None,
                      dtype: np.dtype, shape: tuple[int, ...]) -> None:
        """A tensor stored at `offset` in `path` (ONNX external data, safetensors)."""
        try:
            array = safetensors.tensor(self.map_file(path), np.dtype(dtype), shape, offset, length, name)
        except safetensors.SafetensorsError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        self.add(name, array)

    def add_safetensors(self, path: str | os.PathLike, prefix: str = "") -> list[str]:
        """Map every tensor of a safetensors file; returns the names added."""
        path = Path(path)
        try:
            found = safetensors.entries(self.map_file(path))
        except safetensors.SafetensorsError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        for name, entry in found.items():
            self.add_from_file(prefix + name, path, entry[2], entry[3], entry[0], entry[1])
        return [prefix + name for name in found]
