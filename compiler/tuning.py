"""Autotuning: each kernel's knobs measured on the machine it is for, the fastest configuration
kept in a persistent table.

A table entry is keyed by the kernel's signature (the backend's description of what it
computes, its shapes included), the machine (`machine`: for a CPU its architecture, LLVM CPU,
model name and cores; for a GPU its architecture) and the llmc version; it holds the chosen
configuration and the times measured. The user's table lives in the cache directory
(`cache_file`), so a second compile of the same model, or of another model with kernels of the
same shapes, measures nothing. Tables can be exported and imported (`llmc tune --export FILE`,
`llmc compile --tuning FILE`), so identical machines tune once; an imported entry for another
machine or llmc version is not used, and the user is told.

The search (`Tuner.config`) goes knob by knob in the order a schedule declares them, each
measured at its own row count (decode or prefill) with the other knobs at their best so far. A
candidate replaces the default only when it is faster by more than `MARGIN`: a tuned kernel
is then never slower than the default beyond noise. The budget is checked before every knob;
what it leaves unmeasured keeps the default (and is not recorded, so a later compile with more
budget measures it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import LlmcError

log = logging.getLogger(__name__)

FORMAT, VERSION = "llmc-tuning", 1
MARGIN = 0.03  # how much faster than the default a candidate must be to replace it

# measure(configs, rows, deadline) -> seconds per call of each config (inf: not measured)
Measure = Callable[[list, int, float], list]


def cache_file() -> Path:
    """The user's tuning table: $LLMC_TUNING_CACHE, else tuning.json in llmc's cache directory
    ($LLMC_CACHE_DIR, else ~/.cache/llmc, as the zoo's exports)."""
    if os.environ.get("LLMC_TUNING_CACHE"):
        return Path(os.environ["LLMC_TUNING_CACHE"])
    return Path(os.environ.get("LLMC_CACHE_DIR", Path.home() / ".cache" / "llmc")) / "tuning.json"


def _key(kernel: str, machine: dict, version: str) -> str:
    return json.dumps([kernel, machine, version], sort_keys=True)


class Table:
    """Tuning entries, {key: {"kernel", "machine", "llmc_version", "config", "seconds"}}."""

    def __init__(self, entries: list | None = None):
        self.entries = {_key(e["kernel"], e["machine"], e["llmc_version"]): e for e in entries or []}

    @staticmethod
    def load(path: Path) -> "Table":
        """The table in `path`; LlmcError naming the file and the field when it is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise LlmcError(f"{path}: cannot read the tuning table ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise LlmcError(f"{path}: not a tuning table (not JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LlmcError(f"{path}: not a tuning table (format is not {FORMAT!r})")
        if data.get("version") != VERSION:
            raise LlmcError(f"{path}: tuning table version {data.get('version')!r}; this llmc reads {VERSION}")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise LlmcError(f"{path}: entries: expected a list")
        for i, e in enumerate(entries):
            problem = _entry_problem(e)
            if problem:
                raise LlmcError(f"{path}: entries[{i}]: {problem}")
        return Table(entries)

    def save(self, path: Path, entries: list | None = None) -> None:
        """Write the table (or only `entries`) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "version": VERSION,
                "entries": sorted(self.entries.values() if entries is None else entries,
                                  key=lambda e: _key(e["kernel"], e["machine"], e["llmc_version"]))}
        staged = path.with_name(path.name + f".{os.getpid()}.tmp")
        staged.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        staged.replace(path)

    def get(self, kernel: str, machine: dict) -> dict | None:
        return self.entries.get(_key(kernel, machine, __version__))

    def put(self, entry: dict) -> None:
        self.entries[_key(entry["kernel"], entry["machine"], entry["llmc_version"])] = entry

    def for_machine(self, machine: dict) -> list:
        return [e for e in self.entries.values() if e["machine"] == machine and e["llmc_version"] == __version__]


def _entry_problem(e) -> str:
    if not isinstance(e, dict):
        return "expected an object"
    for field, kind in (("kernel", str), ("machine", dict), ("llmc_version", str), ("config", dict),
                        ("seconds", dict)):
        if not isinstance(e.get(field), kind):
            return f"{field}: expected {'an object' if kind is dict else 'a string'}"
    bad = [k for k, v in e["config"].items() if type(v) not in (int, float, str, bool)]
    return f"config.{bad[0]}: expected a number or a string" if bad else ""


class Tuner:
    """The tuning of one compile: each kernel's configuration from the imported files, the
    user's cache, or (with `measure`) measured within `budget` seconds. `measurements` counts
    the configurations timed; `chosen` records every kernel's configuration and its source."""

    def __init__(self, machine: dict, measure: bool = False, budget: float | None = None,
                 imports: dict | None = None, cache: Path | None = None):
        """`imports`: {path: Table} of the files given (`--tuning`), loaded by the caller."""
        self.machine, self.measuring = machine, measure
        self.cache_path = cache or cache_file()
        self.cache = Table.load(self.cache_path) if self.cache_path.exists() else Table()
        self.imported = Table()
        for path, table in (imports or {}).items():
            usable = table.for_machine(machine)
            others = len(table.entries) - len(usable)
            if others:
                log.warning("%s: %d of its %d entries are for another machine or llmc version and are not used "
                            "(this machine: %s, llmc %s)", path, others, len(table.entries),
                            _describe(machine), __version__)
            for e in usable:
                self.imported.put(e)
        self.deadline = time.monotonic() + budget if budget is not None else float("inf")
        self.measurements, self.seconds = 0, 0.0
        self.chosen: dict[str, dict] = {}
        self.progress = None

    def config(self, kernel: str, knobs: list, measure: Measure) -> dict:
        """The configuration `kernel` is built with: {knob: value}."""
        default = {k.name: k.values[0] for k in knobs}
        if not knobs:
            return default
        for source, table in (("file", self.imported), ("cache", self.cache)):
            entry = table.get(kernel, self.machine)
            if entry is None:
                continue
            if set(entry["config"]) == set(default) and all(entry["config"][k.name] in k.values for k in knobs):
                return self._chose(kernel, entry["config"], source)
            log.warning("tuning: the %s entry for %s has knobs or values this schedule does not take (%s); not used",
                        source, kernel, _label(entry["config"]))
        if not self.measuring or measure is None:
            return self._chose(kernel, default, "default")
        start = time.monotonic()
        best, seconds, complete = dict(default), {}, True
        for knob in knobs:
            if time.monotonic() >= self.deadline:
                complete = False
                break
            configs = [dict(best, **{knob.name: v}) for v in knob.values]
            times = measure(configs, knob.rows, self.deadline)
            self.measurements += sum(t != float("inf") for t in times)
            complete &= time.monotonic() < self.deadline
            seconds.update({f"{knob.rows} rows: {_label(c)}": t for c, t in zip(configs, times)})
            current = times[knob.values.index(best[knob.name])]
            fastest = min(range(len(times)), key=times.__getitem__)
            if times[fastest] < current * (1 - MARGIN):
                best = configs[fastest]
        self.seconds += time.monotonic() - start
        if self.progress is not None:
            self.progress.update()
        if not complete:
            return self._chose(kernel, best, "partial")
        self.cache.put({"kernel": kernel, "machine": self.machine, "llmc_version": __version__, "config": best,
                        "seconds": seconds})
        return self._chose(kernel, best, "measured")

    def _chose(self, kernel: str, config: dict, source: str) -> dict:
        self.chosen[kernel] = {"kernel": kernel, "config": config, "source": source}
        return config

    def finish(self) -> None:
        """Save what was measured to the user's cache and say what tuning did."""
        counts = {}
        for c in self.chosen.values():
            counts[c["source"]] = counts.get(c["source"], 0) + 1
        if self.measurements:
            self.cache.save(self.cache_path)
            log.info("tuning: %d configurations measured in %.1f s; saved to %s", self.measurements, self.seconds,
                     self.cache_path)
        if counts.get("partial"):
            log.warning("tuning: the budget ran out; %d kernels keep some default knobs (not saved: a later "
                        "--tune measures them)", counts["partial"])
        log.info("tuning: kernel configurations by source: %s",
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")


def _label(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items()))


def _describe(machine: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(machine.items()))
