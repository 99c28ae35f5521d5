"""The serving engine: one loop owns a loaded model and schedules at the iteration level (Orca).

Each iteration of the loop (its own thread; the model's kernels release no lock it needs)
  1. drops the sequences whose clients left, their KV blocks back at once;
  2. admits waiting requests in arrival order while a batch slot is free;
  3. runs one step over a ragged batch (`Model.step_rows`): a row for every sequence past its
     prompt, each at its own length over the paged KV cache, and at most `prefill_chunk` tokens
     of the prompts not yet in the cache, oldest first, so a step reads every weight once for
     both and a long prompt is prefilled over several steps while the running sequences keep
     their pace (chunked prefill, as in Sarathi and vLLM; llama-server batches the same way).
     A step in which no sequence decodes takes up to `IDLE_CHUNK` prompt tokens;
  4. samples each decoding sequence's next token, and a prompt's first when its last chunk ran,
     with the request's own seeded generator.

A request's tokens do not depend on what else runs: the kernels compute each row of a step by
itself, in the same order in a batch of any size, and its sampling generator is its own. An
artifact without a paged cache serves one sequence at a time (its chunks and tokens as plain
steps).

With a block budget (`kv_blocks`), a step that would need more blocks than the budget holds
preempts the most recently admitted sequence first: its blocks go back and it waits at the
head of the queue, to be prefilled again with what it generated so far (its generator keeps its
state, so it goes on as it would have). A running request never fails for memory.

`Engine.submit(request)` queues a request (or refuses it at once) and returns an async iterator
of its `Output`s, the last one with `finish_reason` set; leaving the iteration early (a client
that hangs up) aborts the request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..runtime.errors import LlmcError
from ..runtime.model import padded_rows
from ..runtime.sampling import Rng, check_options, sample
from ..runtime.text import Increments

log = logging.getLogger(__name__)

# prompt tokens a step takes when no sequence decodes (none waits on it): 64 rows run the GEMMs
# near their peak, and the chunk's own time to first token is what is left to shorten
IDLE_CHUNK = 64


class RequestError(LlmcError):
    """A request the engine refuses as given (the HTTP layer's 400)."""


class QueueFull(LlmcError):
    """Every queue place is taken (the HTTP layer's 429)."""


class ShuttingDown(LlmcError):
    """The engine admits nothing more (the HTTP layer's 503)."""


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (not included), checked on the decoded text
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely


@dataclass
class Output:
    """What one iteration adds to a request: a token and the text it completes (text can lag a
    token: a character split over tokens, or the start of a stop string, is held back)."""

    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last output
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class _Sequence:
    request: Request
    emit: callable  # thread-safe: hands an Output to the request's iterator
    rng: Rng
    arrived: float
    prompt: list[int] = field(default_factory=list)  # what to prefill: the prompt, then what was generated
    fed: int = 0  # tokens of `prompt` in the cache
    out: list[int] = field(default_factory=list)
    text: str = ""  # the output's text so far (`increments`' settled text)
    increments: Increments | None = None
    shown: int = 0  # characters of the text already emitted
    slot: int | None = None
    last_token_at: float = 0.0
    done: bool = False
    aborted: bool = False

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.prompt) and bool(self.out)


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 16,
                 kv_blocks: int | None = None, prefix_cache: bool = True, metrics=None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise LlmcError(f"max_batch {max_batch}, max_queue {max_queue}, prefill_chunk {prefill_chunk}: "
                            "need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1")
        self.model = model
        layout = model.manifest["model"]["kv_cache"]["layout"]
        roles = model.manifest["model"]["roles"]
        self.paged = layout["page_tokens"] > 0 and roles.get("positions") in model.executor.values and \
            not model.fixed_batch
        if not self.paged and max_batch > 1:
            log.warning("this artifact's graph fixes a batch of 1: serving one sequence at a time" if model.fixed_batch
                        else "this artifact has no paged KV cache (compile with --kv-layout paged:16): "
                        "serving one sequence at a time")
            max_batch = 1
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.page_tokens, self.kv_blocks = layout["page_tokens"], kv_blocks
        if kv_blocks is not None and self.paged and kv_blocks * self.page_tokens < model.max_seq_len:
            raise LlmcError(f"kv_blocks {kv_blocks}: holds {kv_blocks * self.page_tokens} tokens, fewer than one "
                            f"sequence's context of {model.max_seq_len}")
        self.metrics = metrics
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.running: list[_Sequence] = []  # in admission order
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.preemptions = 0
        self.prefix_cache = prefix_cache and self.paged
        self.cached_tokens = 0  # prompt tokens whose keys and values came from cached blocks
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmc-engine", daemon=True)
        # a step's rows: one per running sequence and a prompt chunk's (padded: `padded_rows`)
        self.idle_chunk = max(prefill_chunk, IDLE_CHUNK)
        self.rows = padded_rows(max(max_batch + prefill_chunk, self.idle_chunk)) if self.paged else 1
        model._reset(self.rows)
        self._reserve_blocks()
        self._warm_up()
        self._thread.start()

    def _reserve_blocks(self) -> None:
        """The pool at its full size now (the budget, or every slot at full context), so that no
        step stops to grow it and copy the caches; where memory is short, it grows as needed."""
        pages = self._pages()
        if pages is None:
            return
        full = self.kv_blocks or self.max_batch * -(-self.model.max_seq_len // self.page_tokens)
        try:
            pages.ensure(full)
        except LlmcError as e:
            log.warning("KV cache pool not reserved in full (%s): it grows as sequences need", e)

    def _warm_up(self) -> None:
        """Run a step of every row count the loop can meet, and the logits of every number of
        rows it can ask for, so that their kernel calls are bound before the first request (as
        servers capture their graphs at start): binding a step's shape takes about as long as
        running it."""
        if not self.paged:
            chunk = min(self.idle_chunk, self.model.max_seq_len)
            for length in {chunk, 1}:
                self.model._step(np.zeros((1, length), np.int64), [0], [0], last_only=True)
            return
        def step(rows: int, logits: int) -> None:  # token 0 (in every vocabulary) at position 0 of the slots
            self.model.step_rows([0] * rows, [0] * rows, [r % self.max_batch for r in range(rows)], range(logits))

        for rows in sorted({padded_rows(n) for n in range(1, self.rows + 1)}):
            step(rows, 1)
        for n in range(2, self.max_batch + 1):  # a step samples one row per running sequence at most
            step(n, n)
        self.model._reset(self.rows)  # the same batch: the blocks are free again

    # -- what the HTTP layer calls (any thread; submit from an asyncio loop) --

    def check(self, request: Request) -> None:
        """Refuse a request that cannot run, before it queues."""
        prompt, limit = len(request.prompt), self.model.max_seq_len
        if not prompt:
            raise RequestError("the prompt is empty")
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens {request.max_tokens}: must be at least 1")
        if prompt + request.max_tokens > limit:
            raise RequestError(f"the prompt ({prompt} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                               f"model's context of {limit} tokens")
        vocab = self.model.index_bounds.get(self.model.manifest["model"]["roles"]["tokens"])
        if vocab is not None and any(not 0 <= t < vocab for t in request.prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        try:
            check_options(request.temperature, request.top_k, request.top_p)
            Rng(request.seed)
        except LlmcError as e:
            raise RequestError(str(e)) from None

    def submit(self, request: Request):
        """Queue `request` (from a coroutine of the asyncio loop that will read its outputs):
        refused here, before anything is sent, when it cannot run or the queue is full. Returns
        an async iterator of its outputs; the last has `finish_reason`."""
        self.check(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output | Exception] = asyncio.Queue()
        seq = _Sequence(request, _emitter(loop, queue), Rng(request.seed), time.perf_counter(),
                        prompt=list(request.prompt))
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"all {self.max_queue} queue places are taken")
            self.waiting.append(seq)
            self._cond.notify()
        if self.metrics:
            self.metrics.request_started()
        return self._outputs(seq, queue)

    async def _outputs(self, seq: _Sequence, queue: asyncio.Queue):
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:  # the reader left early (a client gone): the sequence leaves the batch
            if not seq.done:
                self.abort(seq)

    def abort(self, seq: _Sequence) -> None:
        with self._cond:
            seq.aborted = True
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            pages = self._pages()
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "kv_blocks_used": pages.in_use() if pages else 0,
                    "preemptions": self.preemptions, "prefix_cached_tokens": self.cached_tokens}

    def shutdown(self, grace: float = 30.0) -> None:
        """Admit nothing more, let what runs finish for up to `grace` seconds, abort the rest."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._cond:
                if not self.running and not self.waiting:
                    break
            time.sleep(0.01)
        with self._cond:
            for seq in list(self.running) + list(self.waiting):
                seq.aborted = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the loop (the engine's thread) --

    def _pages(self):
        return getattr(self.model.executor, "pages", None) if self.paged else None

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_aborted()
                if self._stopping and not self.running and not self.waiting:
                    return
                if not self.running and not self.waiting:
                    self._cond.wait()
                    continue
                self._admit()
                work = list(self.running)
            try:
                self._iterate(work)
            except Exception as e:  # a step failed: its sequences end with the error, the engine goes on
                log.exception("engine step failed")
                with self._cond:
                    for seq in work:
                        self._finish(seq, e)

    def _drop_aborted(self) -> None:
        for seq in [s for s in self.running if s.aborted]:
            self._finish(seq, self._aborted(seq))
        for seq in [s for s in self.waiting if s.aborted]:
            self.waiting.remove(seq)
            self._finish(seq, self._aborted(seq))

    def _admit(self) -> None:
        while self.waiting and self.free_slots and not self._stopping:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            if not self.paged:
                self.model._reset(1)
            if self.prefix_cache:  # its first step computes one token at least: its logits are needed
                seq.fed = self._pages().share(seq.slot, seq.prompt, len(seq.prompt) - 1)
                self.cached_tokens += seq.fed
            self.running.append(seq)

    def _iterate(self, work: list[_Sequence]) -> None:
        # the running sequences' rooms first: prompts wait for them, not they for prompts
        decoding = [s for s in work if s.decoding and s.slot is not None and not s.done]
        decoding = [s for s in decoding if s.slot is not None and self._make_room(s, len(s.prompt) + 1)]
        # (sequence, its prompt tokens this step), oldest first; a step nobody decodes in delays nobody
        chunks, budget = [], self.prefill_chunk if decoding else self.idle_chunk
        for seq in work:
            if budget and seq.slot is not None and not seq.done and seq.fed < len(seq.prompt):
                take = seq.prompt[seq.fed:seq.fed + budget]
                if self._make_room(seq, seq.fed + len(take)):
                    chunks.append((seq, take))
                    budget -= len(take)
        # room for a later one can preempt an earlier one
        chunks = [(seq, take) for seq, take in chunks if seq.slot is not None]
        decoding = [s for s in decoding if s.slot is not None]
        if not chunks and not decoding:
            return
        tokens, positions, slots, sampled = [], [], [], []  # sampled: (row, sequence) of the logits taken
        for seq, take in chunks:
            tokens += take
            positions += range(seq.fed, seq.fed + len(take))
            slots += [seq.slot] * len(take)
            if seq.fed + len(take) == len(seq.prompt) and not seq.out:  # a preempted one's next token is known
                sampled.append((len(tokens) - 1, seq))
        for seq in decoding:
            tokens.append(seq.out[-1])
            positions.append(len(seq.prompt))
            slots.append(seq.slot)
            sampled.append((len(tokens) - 1, seq))
        logits = self._forward(tokens, positions, slots, [row for row, _ in sampled])
        for seq, take in chunks:
            seq.fed += len(take)
        for seq in decoding:
            seq.prompt.append(seq.out[-1])  # its key and value are cached now
            seq.fed += 1
        if self.prefix_cache:
            for seq in [s for s, _ in chunks] + decoding:
                self._pages().register(seq.slot, seq.prompt, seq.fed)
        for (_, seq), row in zip(sampled, logits):
            self._sampled(seq, row)

    def _forward(self, tokens: list[int], positions: list[int], seqs: list[int], logits_of: list[int]) -> np.ndarray:
        """The logits of rows `logits_of` of a step; without a paged cache the rows are one
        sequence's at consecutive positions (a chunk or a token): a plain step."""
        if self.paged:
            return self.model.step_rows(tokens, positions, seqs, logits_of)
        return self.model._step(np.array([tokens]), [positions[0]], [seqs[0]], last_only=True)[:, -1]

    def _make_room(self, seq: _Sequence, length: int) -> bool:
        """Blocks for `seq` at `length` tokens within the budget, preempting the most recently
        admitted other sequences as needed; False if `seq` itself had to go."""
        pages = self._pages()
        if self.kv_blocks is None or pages is None:
            return True
        need = -(-length // self.page_tokens) - len(pages.held.get(seq.slot, []))
        with self._cond:
            while pages.in_use() + need > self.kv_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False
        return True

    def _preempt(self, seq: _Sequence) -> None:
        """`seq` gives its blocks and slot back and waits first in line, to be prefilled again with
        its prompt and what it generated (its last token is fed by its next decode step)."""
        self.preemptions += 1
        log.info("preempting a sequence of %d tokens for KV blocks", len(seq.prompt))
        self.running.remove(seq)
        self._release(seq)
        seq.prompt = seq.prompt[:seq.fed] if seq.decoding else seq.prompt
        seq.fed = 0
        self.waiting.appendleft(seq)

    def _release(self, seq: _Sequence) -> None:
        pages = self._pages()
        if pages is not None:
            pages.release(seq.slot)
        self.free_slots.append(seq.slot)
        seq.slot = None

    def _sampled(self, seq: _Sequence, logits: np.ndarray) -> None:
        r = seq.request
        token = sample(logits, seq.rng, r.temperature, r.top_k, r.top_p)
        now = time.perf_counter()
        if self.metrics:
            self.metrics.token(now - (seq.last_token_at or seq.arrived), first=not seq.out)
        seq.last_token_at = now
        seq.out.append(token)
        logprob, top = _logprobs(logits, token, r.logprobs) if r.logprobs is not None else (None, None)
        eos = token in self.model.eos_token_ids and not r.ignore_eos
        text, stopped = self._text(seq, None if eos else token, final=eos or len(seq.out) == r.max_tokens)
        reason = "stop" if eos or stopped else "length" if len(seq.out) == r.max_tokens else None
        output = Output(token, text, logprob, top, reason, len(r.prompt), len(seq.out))
        if reason:
            with self._cond:
                self._finish(seq, output)
        else:
            seq.emit(output)

    def _text(self, seq: _Sequence, token: int | None, final: bool) -> tuple[str, bool]:
        """The text `token` (None: no text, an end token) adds past what was shown, and whether
        a stop string ended it. Held back: a character not yet complete, and a tail that may
        begin a stop string."""
        if not self.model.has_tokenizer:
            return "", False
        if seq.increments is None:
            seq.increments = Increments(self.model.text)
        if token is not None:
            seq.text += seq.increments.add(token)
        if final:
            seq.text += seq.increments.rest()
        text, stops = seq.text, seq.request.stop
        for stop in stops:
            at = text.find(stop, max(0, seq.shown - len(stop) + 1))
            if at >= 0:
                piece = text[seq.shown:at]
                seq.shown = at
                return piece, True
        end = len(text)
        if not final:
            end -= max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k], 0, end)),
                       default=0)
        piece = text[seq.shown:end] if end > seq.shown else ""
        seq.shown = max(seq.shown, end)
        return piece, False

    def _finish(self, seq: _Sequence, last: Output | Exception) -> None:
        """(under the lock) `seq` ends: out of the batch and its blocks back, then its client
        gets `last`."""
        if seq.done:
            return
        seq.done = True
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self._release(seq)
        seq.emit(last)
        if self.metrics:
            self.metrics.request_finished(len(seq.request.prompt), len(seq.out))

    @staticmethod
    def _aborted(seq: _Sequence) -> Output:
        return Output(None, "", finish_reason="abort", prompt_tokens=len(seq.request.prompt),
                      completion_tokens=len(seq.out))


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """Hands items to `queue` on its loop from the engine's thread; a loop that has ended (its
    reader is gone) drops them."""
    def emit(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            pass
    return emit


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model's distribution and the k most likely
    tokens' (before temperature and truncation, as OpenAI reports them)."""
    z = logits.astype(np.float64)
    lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    top = np.argsort(-lp, kind="stable")[:k] if k else []
    return float(lp[token]), [(int(t), float(lp[t])) for t in top]
