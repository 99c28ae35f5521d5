"""Errors users can read: what went wrong, where (file, node, op), and what to do.

The CLI prints an LlmcError's message without a traceback and exits with its `exit_code`.
"""

from __future__ import annotations

from llmc.runtime.errors import ArtifactError, LlmcError  # noqa: F401  (one base for both sides)


class ModelLoadError(LlmcError):
    """A model file that is missing, unreadable, not ONNX, or inconsistent."""


class UnsupportedOpsError(LlmcError):
    """The model uses ONNX ops the frontend has no converter for. Lists all of them at once."""

    def __init__(self, path, opset: int, missing: dict[str, list[str]]):
        self.path, self.opset, self.missing = path, opset, missing
        lines = [f"{path}: {len(missing)} unsupported ONNX op type(s) (opset {opset}):"]
        for op, nodes in sorted(missing.items()):
            shown = ", ".join(nodes[:5]) + (f", ... ({len(nodes)} nodes)" if len(nodes) > 5 else "")
            lines.append(f"  {op}: used by {shown}")
        lines.append("Supported ops are listed by `llmc ops` and in docs/onnx-ops.md.")
        super().__init__("\n".join(lines))


class ConversionError(LlmcError):
    """An ONNX node the frontend supports in general but not in this form."""

    def __init__(self, path, node_name: str, op_type: str, reason: str):
        super().__init__(f"{path}: node {node_name!r} ({op_type}): {reason}")
