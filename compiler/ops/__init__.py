"""The IR's op set. Importing this package registers every op."""

from . import elementwise, nn, shape, transformer  # noqa: F401  (registration side effects)
from .registry import REQUIRED, OpDef, all_ops, get_op, register

__all__ = ["OpDef", "REQUIRED", "all_ops", "get_op", "register"]
