"""Briefly trained zoo models: byte-level language models of real architectures, trained on
Python's own standard library source.

Randomly initialized models predict nearly uniform next-token distributions, so what
quantization does to their top-1 predictions measures near-ties, not quality. A model trained for
a few minutes on real text has peaked predictions and the activation statistics training brings
(a few input features larger than the rest), which is what quantization quality is about.

The corpus is the source of a fixed list of standard-library modules (present on any Python, no
download); the held-out text comes from other modules. Tokens are bytes (vocabulary 256).
Training is seeded; its result is cached with the export, keyed by the corpus's digest.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sysconfig
import time
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_TRAIN_MODULES = (
    "argparse", "typing", "inspect", "pathlib", "dataclasses", "functools", "collections/__init__",
    "json/decoder", "json/encoder", "logging/__init__", "subprocess", "tarfile", "textwrap", "string",
    "enum", "random", "statistics", "fractions", "_pydecimal", "shutil", "tempfile", "pickle",
    "calendar", "difflib", "doctest", "email/message", "http/client", "urllib/parse",
    "unittest/case", "ast", "tokenize", "traceback", "configparser", "csv", "heapq", "bisect", "copy",
    "pprint", "gettext", "locale", "optparse", "platform", "threading", "queue", "weakref", "abc",
    "contextlib", "operator", "codecs", "base64", "socket", "ssl", "uuid", "ipaddress", "mailbox",
    "shlex", "sysconfig", "timeit", "trace", "glob", "fnmatch", "fileinput", "filecmp", "linecache",
    "gzip", "_pyio", "os", "posixpath", "ntpath", "numbers", "dis", "pdb", "bdb", "cmd", "pydoc",
    "reprlib", "runpy", "types", "warnings", "webbrowser",
)
_HELD_OUT_MODULES = ("zipfile/__init__", "smtplib", "imaplib", "ftplib", "plistlib", "sched",
                     "wave", "xml/dom/minidom", "getopt", "quopri")

BATCH, SEQ, LR = 32, 128, 3e-3


def _read(modules) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / f"{m}.py").read_bytes() for m in modules if (root / f"{m}.py").exists()]
    if len(parts) < len(modules) // 2:
        raise RuntimeError(f"the training corpus needs Python's standard library sources under {root}")
    return b"".join(parts)


@cache
def corpus(split: str) -> bytes:
    """The training text ('train') or the held-out text ('held-out')."""
    return _read(_TRAIN_MODULES if split == "train" else _HELD_OUT_MODULES)


def corpus_digest() -> str:
    return hashlib.sha256(corpus("train")).hexdigest()[:16]


def token_ids(split: str, n: int) -> list[int]:
    """The first `n` byte tokens of a split."""
    text = corpus(split)[:n]
    if len(text) < n:
        raise ValueError(f"the {split} corpus has fewer than {n} bytes")
    return list(text)


def train(model, steps: int, seed: int = 0):
    """Train `model` (a transformers causal LM over bytes) in place: AdamW, warmup then cosine
    decay, random windows of the training corpus. Returns the model in eval mode."""
    import torch

    data = torch.from_numpy(np.frombuffer(corpus("train"), np.uint8).astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        lr = LR * min(1.0, (step + 1) / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        at = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        x = torch.stack([data[i:i + SEQ] for i in at.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("training step %d/%d: loss %.3f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - start)
    return model.eval()
