"""llmc: a compiler for Transformer language models.

    graph = llmc.from_onnx("model.onnx")
    outputs = llmc.run_reference(graph, {"input_ids": ids, ...})

Importing llmc is cheap: torch, onnx, onnxruntime, tvm and triton are imported only by the
functions that use them.
"""

from __future__ import annotations

__version__ = "0.1.0"


def from_onnx(path):
    """Load an ONNX model as an IR graph (`llmc.ir.Graph`)."""
    from .frontends.onnx import from_onnx as _from_onnx

    return _from_onnx(path)


def run_reference(graph, feeds, **kwargs):
    """Run `graph` with the numpy reference ops; feeds and results are dicts of numpy arrays
    keyed by the model's input and output names."""
    from llmc.ir.evaluate import run_reference as _run

    return _run(graph, feeds, **kwargs)


def compile(onnx_path, target="cpu", output=None, **options):  # noqa: A001
    """Compile an ONNX decoder (with KV cache) to a .llmc artifact; see `llmc.driver.compile`."""
    from .driver import compile as _compile

    return _compile(onnx_path, target=target, output=output, **options)


__all__ = ["__version__", "compile", "from_onnx", "run_reference"]
