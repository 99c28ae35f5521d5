"""The ONNX frontend: `from_onnx(path)` and the table of supported ONNX ops."""

from .converters import CONVERTERS
from .importer import from_onnx


def supported_ops() -> list[str]:
    return sorted(CONVERTERS)


__all__ = ["from_onnx", "supported_ops"]
