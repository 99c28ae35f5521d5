"""A schedule's tunable knobs, and the choice of every kernel's configuration during a build.

A knob has a name, the values the tuner may try (the default, hand-chosen or from a cost model,
first) and the row count it is measured at (1: decode; more: prefill)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple  # JSON scalars (a config is recorded in caches and manifests)
    rows: int


class Chooser:
    """The configuration each kernel with knobs is built with: its knobs' defaults, or what the
    tuner (`llmc.tuning.Tuner`) has recorded or measures. `configs` records them by kernel
    name, as the manifest does."""

    def __init__(self, tuner=None):
        self.tuner, self.configs = tuner, {}

    def __call__(self, name: str, key: str, knobs: list, measure=None) -> dict:
        """`measure(configs, rows, deadline)`: seconds per call of each configuration, or None
        where the backend cannot time its kernels."""
        if not knobs:
            return {}
        if self.tuner is None:
            self.configs[name] = {"kernel": key, "config": {k.name: k.values[0] for k in knobs}, "source": "default"}
        else:
            self.tuner.config(key, knobs, measure)
            self.configs[name] = self.tuner.chosen[key]
        return self.configs[name]["config"]
