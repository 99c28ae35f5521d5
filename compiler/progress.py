"""Progress of long work on a terminal: compiling (its stages and the passes), AWQ's search per
GEMM. Bars go to stderr, and only when stderr is a terminal; elsewhere (a pipe, a log, CI)
nothing is drawn and the `-v` log says the same. tqdm draws them."""

from __future__ import annotations

import shutil
import sys


def bar(iterable=None, total: int | None = None, desc: str = ""):
    """A tqdm bar over `iterable`, silent when stderr is not a terminal."""
    from tqdm import tqdm

    # a terminal that reports no size (a bare pty) gets 80x24: tqdm draws nothing in 0 rows
    size = shutil.get_terminal_size((80, 24))
    return tqdm(iterable, total=total, desc=desc, unit="", leave=False, file=sys.stderr,
                ncols=size.columns or 80, nrows=size.lines or 24, disable=not sys.stderr.isatty(),
                bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {elapsed}")
