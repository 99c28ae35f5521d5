"""The reference backend: runs a graph with the ops' numpy definitions."""

from .executor import FeedError, run_reference

__all__ = ["FeedError", "run_reference"]
