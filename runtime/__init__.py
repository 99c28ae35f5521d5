"""The llmc runtime: loads an artifact and runs prefill and the decode loop.

It depends on numpy and the kernel runtime only, never on torch, onnx, onnxruntime or the TVM
compiler, so that an artifact runs where only the runtime is installed.
"""
