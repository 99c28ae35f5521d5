"""The llmc IR: typed graphs with symbolic dims."""

from .dtypes import DType
from .graph import Graph, Node, TensorType, Value
from .symbolic import Dim, Sym
from .verify import VerificationError, verify

__all__ = ["DType", "Dim", "Graph", "Node", "Sym", "TensorType", "Value", "VerificationError",
           "verify"]
