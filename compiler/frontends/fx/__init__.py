"""The torch.fx frontend: `from_fx(graph_module)` and the table of supported ATen ops."""

from .converters import CONVERTERS, op_key
from .importer import FxConversionError, from_exported_program, from_fx


def supported_ops() -> list[str]:
    return sorted(CONVERTERS)


__all__ = ["FxConversionError", "from_exported_program", "from_fx", "op_key", "supported_ops"]
