"""The error every llmc failure a user can act on derives from. It lives in the runtime, which
the compiler may import and which must not import the compiler."""

from __future__ import annotations


class LlmcError(Exception):
    exit_code = 2


class ArtifactError(LlmcError):
    """An artifact that is missing, foreign, of another format version, truncated or altered."""
