"""A schedule's tunable knob: its name, the values the tuner may try (the hand-chosen default
first) and the row count it is measured at (1: decode; more: prefill)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple  # JSON scalars (a config is recorded in caches and manifests)
    rows: int
