"""Perplexity of a text under a model, teacher-forced, chunked as llama.cpp's `llama-perplexity`
does, so that the two tools' numbers compare.

The text's tokens are cut into `n_chunks` whole chunks of `ctx` tokens (a tail shorter than a
chunk is dropped). Each chunk is one forward pass from an empty cache; its first token is the
BOS token where the tokenizer starts texts with one. Only the second half of each chunk is
scored: the position i in [ctx/2, ctx-1) predicts token i+1, with at least half a chunk of
context behind it. The result is exp(mean negative log-likelihood) over every scored token, and
its standard error, exp's first-order error of the mean: ppl * sqrt(var(nll) / (N - 1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .errors import LlmcError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    stderr: float
    tokens: int  # tokens scored
    chunks: int
    ctx: int

    def __str__(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.stderr:.5f} ({self.chunks} chunks of {self.ctx} tokens, " \
               f"{self.tokens} scored)"


def chunks(ids: list[int], ctx: int, n_chunks: int | None = None, bos: int | None = None) -> Iterator[np.ndarray]:
    """The chunks of `ids` a perplexity run evaluates, each [ctx] (its first token `bos` if given)."""
    if ctx < 4:
        raise LlmcError(f"--ctx {ctx}: a chunk needs at least 4 tokens (half of it is scored)")
    available = len(ids) // ctx
    if available == 0:
        raise LlmcError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}: give a longer text or "
                        f"a smaller --ctx")
    if n_chunks is not None and n_chunks < 1:
        raise LlmcError(f"--chunks {n_chunks}: must be at least 1")
    for c in range(min(available, n_chunks or available)):
        chunk = np.array(ids[c * ctx:(c + 1) * ctx], np.int64)
        if bos is not None:
            chunk[0] = bos
        yield chunk


def scored_nll(logits: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Negative log-likelihoods of a chunk's second half: `logits` [ctx, vocab] at every position
    of `chunk` [ctx]."""
    first = len(chunk) // 2
    x = logits[first:len(chunk) - 1].astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=1))
    return log_z - x[np.arange(len(x)), chunk[first + 1:]]


def summarize(nll: np.ndarray, n_chunks: int, ctx: int) -> Perplexity:
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll * nll).mean()) - mean * mean
    stderr = ppl * math.sqrt(var / (len(nll) - 1)) if len(nll) > 1 and var > 0 else 0.0
    return Perplexity(ppl, stderr, len(nll), n_chunks, ctx)


def evaluate(logits_of: Callable[[np.ndarray], np.ndarray], ids: list[int], ctx: int,
             n_chunks: int | None = None, bos: int | None = None,
             on_chunk: Callable[[int, float], None] | None = None) -> Perplexity:
    """Perplexity of `ids` under `logits_of(chunk [ctx]) -> logits [ctx, vocab]` (any model: an
    artifact's, transformers', ...). `on_chunk(i, running ppl)` follows the progress."""
    nlls = []
    for i, chunk in enumerate(chunks(ids, ctx, n_chunks, bos)):
        nlls.append(scored_nll(logits_of(chunk), chunk))
        if on_chunk:
            on_chunk(i, math.exp(float(np.concatenate(nlls).mean())))
    return summarize(np.concatenate(nlls), len(nlls), ctx)


def of_model(model, ids: list[int], ctx: int | None = None, n_chunks: int | None = None,
             on_chunk: Callable[[int, float], None] | None = None) -> Perplexity:
    """Perplexity of token ids under a loaded artifact (`llmc.runtime.Model`), `ctx` tokens a
    chunk (default: the artifact's context, up to 512)."""
    ctx = ctx or min(model.max_seq_len, 512)
    if ctx > model.max_seq_len:
        raise LlmcError(f"--ctx {ctx}: longer than the {model.max_seq_len} tokens this artifact was compiled for")
    bos = model.text.bos_token_id if model.has_tokenizer else None
    return evaluate(lambda chunk: model.forward(chunk[None], past=0)[0], ids, ctx, n_chunks, bos, on_chunk)
