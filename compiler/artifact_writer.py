"""Write a graph's artifact: its parameters as safetensors and a sealed manifest.

The schema and the sealing are the runtime's (`llmc.runtime.artifact`); this module only fills
them in, with the kernel library and the plan the backend built (`llmc.compile`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from llmc.runtime import artifact, safetensors

from . import __version__
from .ir.graph import Graph
from .model_files import FOLDER, TOKENIZER


def _describe(v) -> dict:
    return {"name": v.name, "dtype": str(v.dtype), "shape": [str(d) for d in v.shape]}


def write_artifact(graph: Graph, output, build, plans: dict, eos_token_ids: list[int], model_files: dict) -> Path:
    """Write `output` (a directory; replaced if it exists) and return its path: the tensors the
    plan reads, the backend's files and target (`llmc.backends.Build`), the plans (whose
    "values" get the weights' dtypes and shapes as written), and the tokenizer and configs to
    bundle under model/ (`model_files`: `llmc.model_files`).

    The weights are made and written one at a time, and the model file's pages are handed back
    after each, so that writing needs memory for the largest weight, not for the model."""
    output = Path(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent if output.parent.exists() else None))
    try:
        graph.store.release_pages()
        written = safetensors.save(tmp / artifact.WEIGHTS, build.weights, after_each=graph.store.release_pages)
        plans["values"].update({name: {"dtype": dtype, "shape": shape} for name, (dtype, shape) in written.items()})
        for name, write in build.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / name)
        if model_files:
            (tmp / FOLDER).mkdir()
        for name, path in model_files.items():
            shutil.copyfile(path, tmp / FOLDER / name)
        artifact.seal(tmp, {
            "llmc_version": __version__,
            "target": build.target,
            "cpu": build.cpu,
            "model": {
                "name": graph.name,
                "inputs": [_describe(v) for v in graph.inputs],
                "outputs": [_describe(v) for v in graph.outputs],
                "max_seq_len": graph.metadata.get("max_seq_len"),
                "index_bounds": graph.index_bounds(),
                "roles": graph.metadata["roles"],
                "kv_cache": graph.metadata.get("kv_cache"),
                "quant": graph.metadata.get("quant"),
                "eos_token_ids": eos_token_ids,
                "tokenizer": f"{FOLDER}/{TOKENIZER}" if TOKENIZER in model_files else None,
            },
            "kernels": build.kernels,
            "plans": plans,
        })
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
