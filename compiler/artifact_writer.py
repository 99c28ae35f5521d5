"""Write a graph's artifact: its parameters as safetensors and a sealed manifest.

The schema and the sealing are the runtime's (`llmc.runtime.artifact`); this module only fills
them in. Kernel libraries and execution plans are added by the backends (later work): until
then `kernels` and `plans` are empty and the runtime has nothing to run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from llmc.runtime import artifact

from . import __version__
from .ir.graph import Graph


def _describe(v) -> dict:
    return {"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in v.shape]}


def write_artifact(graph: Graph, output, target: dict, kernels: list | None = None,
                   plans: dict | None = None) -> Path:
    """Write `output` (a directory; replaced if it exists) and return its path."""
    from safetensors.numpy import save_file

    output = Path(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent if output.parent.exists() else None))
    try:
        weights = {name: np.ascontiguousarray(graph.store[name]) for name in graph.params}
        save_file(weights, tmp / artifact.WEIGHTS)
        artifact.seal(tmp, {
            "llmc_version": __version__,
            "target": target,
            "model": {
                "name": graph.name,
                "inputs": [_describe(v) for v in graph.inputs],
                "outputs": [_describe(v) for v in graph.outputs],
                "max_seq_len": graph.metadata.get("max_seq_len"),
                "kv_cache": graph.metadata.get("kv_cache"),
            },
            "kernels": kernels or [],
            "plans": plans or {},
        })
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
