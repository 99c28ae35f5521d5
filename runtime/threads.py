"""How many threads the kernels run on: `threads=` on load, else LLMC_NUM_THREADS, else
TVM_NUM_THREADS if the user set it, else every core this process may run on. (TVM's pool, left
to itself, ran one thread on our 2-core machines, where a decode step then took 1.7-1.8x as
long.) The pool (libllmc's, `kernels.py`) starts once per process with the first model's count; a
later model may use fewer threads, not more.
"""

from __future__ import annotations

import os

from .errors import LlmcError


def default_threads() -> int:
    for var in ("LLMC_NUM_THREADS", "TVM_NUM_THREADS"):
        text = os.environ.get(var)
        if text:
            try:
                n = int(text)
            except ValueError:
                raise LlmcError(f"{var}={text!r}: not a number of threads") from None
            if n < 1:
                raise LlmcError(f"{var}={text!r}: the number of threads must be at least 1")
            return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check(threads: int | None) -> int:
    """The kernels' thread count for `threads=` on load (None: `default_threads`)."""
    if threads is not None and (type(threads) is not int or threads < 1):
        raise LlmcError(f"threads={threads!r}: the number of threads must be an integer of at least 1")
    return threads or default_threads()
