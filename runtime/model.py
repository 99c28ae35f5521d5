"""Load an artifact and generate: prefill the prompt, then the compiled decode loop.

Imports numpy only; a CPU artifact's kernels run on libllmc, the native runtime's loader and
thread pool (`kernels.py`). Loading checks, in order and before anything is allocated:
the artifact (`open_artifact`: schema, files, checksums), that this CPU can run its kernels, and
that every weight the plan reads (`plans.weights`) is in the weights file with the dtype and
shape the plan gives it. When a batch's buffers are first allocated, the executor checks that
the KV caches and activations fit in the memory this machine has free.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from . import chat, cpu, memory, safetensors, threads as kernel_threads
from .artifact import WEIGHTS, open_artifact
from .errors import ArtifactError, LlmcError
from .host import CpuExecutor, Functions
from .kernels import KernelLibrary
from .sampling import Rng, check_options, sample
from .schema import KV_BLOCKS, KV_LENGTHS
from .text import Text

log = logging.getLogger(__name__)

ROW_BUCKET = 8  # a ragged step of more rows is padded to a multiple of this many (`Model.step_rows`)
_SCRATCH = -1  # the padding rows' sequence in the block pool (never a caller's)


class Model:
    def __init__(self, path, threads: int | None = None, interpret: bool = False, device: int | None = None):
        art = open_artifact(path)
        m = art.manifest
        where = str(art.file("manifest.json"))
        kind = m["target"]["kind"]
        cuda = kind == "cuda"
        if interpret and not cuda:
            raise LlmcError(f"{where}: --interpret runs a cuda artifact's Triton kernels; this artifact is for "
                            f"{m['target']['kind']}")
        if device is not None and kind != "opencl":
            raise LlmcError(f"{where}: --device chooses among OpenCL devices; this artifact is for {kind}")
        if kind == "llvm":
            cpu.check(m["cpu"], where)
        if not m["plans"]["forward"]:
            raise ArtifactError(f"{where}: plans.forward: the artifact has no execution plan")
        # a CPU's kernels stream the weights from memory (huge pages); a GPU's get a copy of their own
        weights = safetensors.load(art.file(WEIGHTS), writable=True, read=kind == "llvm")
        _check_weights(m["plans"], weights, where)
        self.manifest = m
        self.max_seq_len = m["model"]["max_seq_len"]
        self.eos_token_ids = set(m["model"]["eos_token_ids"])
        self._tokenizer = art.file(m["model"]["tokenizer"]) if m["model"]["tokenizer"] else None
        self._text = None
        self._model_files = self._tokenizer.parent if self._tokenizer else None  # the bundled configs' folder
        self._template = None
        self._cached: list[int] = []  # the tokens whose keys and values a batch of one holds, in order
        self.index_bounds = m["model"]["index_bounds"]
        self.fixed_batch = _fixed_batch(m)
        self.memory = memory.footprint(m, weights, art.file(WEIGHTS).stat().st_size)
        if cuda:
            self.threads = None
            self.executor = _cuda_executor(art, m, weights, interpret)
            return
        if kind in ("opencl", "metal"):
            from .gpu import GpuExecutor

            self.threads = None
            self.executor = GpuExecutor(_gpu_device(kind, device), art, m, weights)
            return
        asked = kernel_threads.check(threads)
        kernels = KernelLibrary(art.file(m["kernels"]["library"]), m["kernels"]["functions"], asked)
        if kernels.threads < asked:
            log.warning("%d threads asked for, but this process's kernel pool started with %d; using %d",
                        asked, kernels.threads, kernels.threads)
        self.threads = kernels.threads
        self.executor = CpuExecutor(kernels, m, weights)

    def check_ids(self, feeds: dict[str, np.ndarray]) -> None:
        """Token ids index tables: one out of range would make the gather read outside them."""
        for name, bound in self.index_bounds.items():
            ids = feeds.get(name)
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= bound):
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise LlmcError(f"{name}: token id {bad} is outside the vocabulary (0..{bound - 1})")

    def forward(self, input_ids: np.ndarray, past: int = 0, last_only: bool = False, greedy: bool = False) -> np.ndarray:
        """Logits [batch, seq, vocab] for `input_ids` after `past` cached tokens, in an array
        the caller owns; with `last_only`, [batch, 1, vocab] for the last position (what
        generation needs; a cuda artifact on the GPU always gives these). With `greedy` (an
        executor with an `argmax` kernel: the GPU's), each sequence's next token, [batch],
        argmax on the device.

        `past` 0 starts `batch` new sequences (the caches are emptied); a later call continues
        them, `past` counting the tokens given so far."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.dtype.kind not in "iu" or 0 in input_ids.shape:
            raise LlmcError(f"input_ids: expected integer token ids [batch, seq], got {input_ids.dtype}{list(input_ids.shape)}")
        batch = input_ids.shape[0]
        self._check_batch(batch)
        if type(past) is not int or past < 0:
            raise LlmcError(f"past {past!r}: must be an integer >= 0")
        if past == 0:
            self._reset(batch)
        elif self.executor.batch != batch:
            raise LlmcError(f"forward(past={past}) continues {self.executor.batch or 'no'} sequences, not {batch}: "
                            f"start new ones with past=0")
        self._cached = []
        return self._step(input_ids, [past] * batch, list(range(batch)), last_only, greedy)

    def _reset(self, batch: int) -> None:
        self.executor.reset(batch=batch)
        self._cached = []

    def _step(self, input_ids: np.ndarray, pasts: list[int], seqs: list[int], last_only: bool = False,
              greedy: bool = False) -> np.ndarray:
        """`forward` for sequences `seqs` of the batch the executor was reset for, each after
        its own number of cached tokens (`pasts`: they may differ only in a paged cache). The
        mask feeds each its own length; a paged cache is given their blocks (taken as they grow)
        and lengths."""
        batch, seq = input_ids.shape
        lengths = np.array(pasts, np.int64)
        total = int(lengths.max()) + seq
        roles = self.manifest["model"]["roles"]
        feeds = {roles["tokens"]: input_ids,
                 roles["mask"]: (np.arange(total) < (lengths + seq)[:, None]).astype(np.int64),
                 roles["positions"]: lengths[:, None] + np.arange(seq)}
        pages = getattr(self.executor, "pages", None)  # the CPU executor's, when paged
        if pages:
            for s, past in zip(seqs, pasts):
                pages.reserve(s, past + seq)
            feeds.update({KV_BLOCKS: pages.table(seqs), KV_LENGTHS: lengths.astype(np.int32)})
        feeds = {name: a for name, a in feeds.items() if name in self.executor.values}  # what the plan reads
        self.check_ids(feeds)
        if greedy:
            return self.executor.run(feeds, batch, seq, total - seq, greedy=True)
        return self.executor.run(feeds, batch, seq, total - seq, last_logits=last_only)

    def step_rows(self, tokens, positions, seqs, logits_of) -> np.ndarray:
        """One step over a ragged batch of a paged cache's sequences: row r is token `tokens[r]`
        of sequence `seqs[r]` at position `positions[r]`. A server mixes one row per decoding
        sequence with a chunk of a prompt's rows (one sequence at consecutive positions); every
        row's key and value are in the cache before attention reads, so each row sees the rows
        of its sequence before it. Rows are computed each alone, as in any other batch. Returns
        the logits of rows `logits_of`, [len(logits_of), vocab], computed for those rows only.

        Past ROW_BUCKET rows, the batch is padded to a multiple of it (rows of a scratch
        sequence's position 0), so that a server meets a few step shapes, each bound once."""
        pages = getattr(self.executor, "pages", None)
        roles = self.manifest["model"]["roles"]
        if not pages or roles["positions"] not in self.executor.values:
            raise LlmcError("a ragged step needs an artifact with a paged KV cache (--kv-layout paged:N)")
        tokens, positions, seqs, logits_of = list(tokens), list(positions), list(seqs), list(logits_of)
        if not tokens or not len(tokens) == len(positions) == len(seqs):
            raise LlmcError(f"a ragged step: {len(tokens)} tokens, {len(positions)} positions and {len(seqs)} "
                            "sequences; give one of each per row, at least one row")
        if min(positions) < 0 or any(not 0 <= r < len(tokens) for r in logits_of):
            raise LlmcError(f"a ragged step of {len(tokens)} rows: positions must be >= 0 and logits_of rows in "
                            f"0..{len(tokens) - 1}")
        self._cached = []
        pad = padded_rows(len(tokens)) - len(tokens)
        self._check_batch(len(tokens) + pad)
        tokens = np.array(tokens + [0] * pad, np.int64)[:, None]
        lengths = np.array(positions + [0] * pad, np.int64)
        seqs = seqs + [_SCRATCH] * pad
        total = int(lengths.max()) + 1
        if total > self.max_seq_len:
            raise LlmcError(f"context of {total} tokens exceeds the {self.max_seq_len} this artifact was compiled for")
        need: dict[int, int] = {}
        for s, at in zip(seqs, lengths.tolist()):
            need[s] = max(need.get(s, 0), at + 1)
        for s, length in need.items():
            pages.reserve(s, length)
        feeds = {roles["tokens"]: tokens, roles["mask"]: (np.arange(total) <= lengths[:, None]).astype(np.int64),
                 roles["positions"]: lengths[:, None], KV_BLOCKS: pages.table(seqs),
                 KV_LENGTHS: lengths.astype(np.int32)}
        feeds = {name: a for name, a in feeds.items() if name in self.executor.values}
        self.check_ids(feeds)
        try:
            return self.executor.run(feeds, len(seqs), 1, total - 1, rows=logits_of)
        finally:
            pages.release(_SCRATCH)

    def _check_batch(self, batch: int) -> None:
        if self.fixed_batch and batch != self.fixed_batch:
            tokens = self.manifest["model"]["roles"]["tokens"]
            raise LlmcError(f"this artifact's graph fixes a batch of {self.fixed_batch} (its input {tokens!r} is "
                            f"[{self.fixed_batch}, seq]): a step of {batch} sequences cannot run; give one at a time")

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    @property
    def text(self) -> Text:
        """The bundled tokenizer (`encode`, `decode`, `stream`); an error when there is none."""
        if self._tokenizer is None:
            raise LlmcError("this artifact bundles no tokenizer (compile with tokenizer.json beside the model, "
                            "or --tokenizer DIR): give token ids")
        if self._text is None:
            self._text = Text(self._tokenizer)
        return self._text

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 on_token: Callable[..., None] | None = None) -> list:
        """New token ids after `prompt_ids` (token ids, or a string when the artifact bundles a
        tokenizer), up to `max_new_tokens` or an end-of-sequence token (included); `on_token`
        sees each as it comes.

        Given a list of prompts (of any lengths), a list of outputs: each prompt's, the tokens
        it gets alone (sampled with its own generator seeded by `seed`), and `on_token(i, token)`
        for prompt i. With a paged KV cache the prompts are prefilled one by one into the shared
        pool and then decoded together, one step for all, each at its own length; with a
        contiguous cache they run one after another."""
        check_options(temperature, top_k, top_p)
        if type(max_new_tokens) is not int or max_new_tokens < 0:
            raise LlmcError(f"max_new_tokens {max_new_tokens!r}: must be an integer >= 0")
        sampling = (temperature, top_k, top_p, seed)
        if not _is_batch(prompt_ids):
            return self._decode([self._prompt(prompt_ids, max_new_tokens)], max_new_tokens, sampling,
                                on_token and (lambda i, token: on_token(token)))[0]
        prompts = [self._prompt(p, max_new_tokens, f"prompt {i}: ") for i, p in enumerate(prompt_ids)]
        # sequences at different lengths in one step need a paged cache, and each one's positions
        # fed: a graph without them derives positions from the step's past, which one sequence has
        paged = self.manifest["model"]["kv_cache"]["layout"]["page_tokens"] > 0
        if paged and self.manifest["model"]["roles"]["positions"] in self.executor.values and not self.fixed_batch:
            return self._decode(prompts, max_new_tokens, sampling, on_token)
        return [self._decode([p], max_new_tokens, sampling, on_token and (lambda _, t, i=i: on_token(i, t)))[0]
                for i, p in enumerate(prompts)]

    def _prompt(self, prompt_ids, max_new_tokens: int, where: str = "") -> list[int]:
        if isinstance(prompt_ids, str):
            prompt_ids = self.text.encode(prompt_ids)
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise LlmcError(f"{where}the prompt must be a sequence of integer token ids") from None
        if not prompt:
            raise LlmcError(f"{where}the prompt is empty")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise LlmcError(f"{where}prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                            f"of {self.max_seq_len} tokens this artifact was compiled for")
        return prompt

    def _decode(self, prompts: list[list[int]], max_new_tokens: int, sampling: tuple, on_token) -> list[list[int]]:
        """Generate for `prompts` as one batch: each prefilled alone (its own rows of the batch,
        so no prompt is padded), then every unfinished one decoded in one step per token. A
        sequence that ends gives its cache blocks back. Several prompts need a paged cache."""
        temperature, top_k, top_p, seed = sampling
        rngs = [Rng(seed) for _ in prompts]
        on_device = temperature == 0 and getattr(self.executor, "argmax", None) is not None

        def next_tokens(ids, pasts, seqs, last_only=False) -> list[int]:
            if on_device:  # greedy on the GPU: the tokens come back, not the logits
                return [int(t) for t in self._step(ids, pasts, seqs, last_only, greedy=True)]
            logits = self._step(ids, pasts, seqs, last_only)
            return [sample(logits[row, -1], rngs[s], temperature, top_k, top_p) for row, s in enumerate(seqs)]

        self._reset(len(prompts))
        tokens = [next_tokens(np.array([p]), [0], [i], last_only=True)[0] for i, p in enumerate(prompts)]
        pasts = [len(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts))) if max_new_tokens else []
        pages = getattr(self.executor, "pages", None)
        while True:
            for i in active:
                outs[i].append(tokens[i])
                if on_token:
                    on_token(i, tokens[i])
            ended = [i for i in active if tokens[i] in self.eos_token_ids or len(outs[i]) == max_new_tokens]
            for i in ended:
                if pages:
                    pages.release(i)
            active = [i for i in active if i not in ended]
            if not active:
                return outs
            new = next_tokens(np.array([[tokens[i]] for i in active]), [pasts[i] for i in active], active)
            for i, token in zip(active, new):
                tokens[i], pasts[i] = token, pasts[i] + 1

    def chat(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             on_text: Callable[[str], None] | None = None) -> str:
        """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant", "content":
        ...}, ...]), rendered with the model's chat template. `on_text` sees the reply's text as
        it comes. The caches are kept between calls: a conversation that goes on from the last
        call's (its messages and that reply, then a new turn) prefills only the new turn."""
        check_options(temperature, top_k, top_p)
        prompt = self.chat_template().render(messages)
        ids = self.text.encode(prompt, special_tokens=False)
        return self.text.decode(self._continue(ids, max_new_tokens, (temperature, top_k, top_p, seed),
                                               on_text and self.text.stream(on_text)))

    @property
    def template(self) -> chat.Template | None:
        """The bundled chat template, or None."""
        if self._template is None and self._model_files is not None:
            self._template = chat.load(self._model_files)
        return self._template

    def chat_template(self) -> chat.Template:
        """The bundled chat template; an error when there is none."""
        if self.template is None:
            raise LlmcError("this artifact bundles no chat template (chat_template.jinja or tokenizer_config.json's "
                            "chat_template beside the model when it was compiled): use generate with a prompt")
        return self.template

    def _continue(self, ids: list[int], max_new_tokens: int, sampling: tuple, on_token) -> list[int]:
        """New tokens after `ids` in a batch of one, reusing the cached tokens `ids` begins with
        (at least its last token is run again: its logits are needed). `self._cached` follows
        what the caches hold, token by token, also when a callback raises (Ctrl-C)."""
        self._prompt(ids, max_new_tokens)
        keep = 0
        if self.executor.batch == 1:
            limit = min(len(self._cached), len(ids) - 1)
            while keep < limit and self._cached[keep] == ids[keep]:
                keep += 1
        if not keep:
            self._reset(1)
        temperature, top_k, top_p, seed = sampling
        rng, out = Rng(seed), []
        self._cached, feed = self._cached[:keep], ids[keep:]
        while True:
            logits = self._step(np.array([feed]), [len(self._cached)], [0], last_only=True)
            self._cached += feed
            token = sample(logits[0, -1], rng, temperature, top_k, top_p)
            out.append(token)
            if on_token:
                on_token(token)
            if token in self.eos_token_ids or len(out) == max_new_tokens:
                return out
            feed = [token]


def _fixed_batch(manifest: dict) -> int | None:
    """The batch a static-batch export fixes (its token input's first dim a number), else None."""
    tokens = manifest["model"]["roles"]["tokens"]
    shape = next((i["shape"] for i in manifest["model"]["inputs"] if i["name"] == tokens), None)
    return int(shape[0]) if shape and str(shape[0]).isdigit() else None


def padded_rows(rows: int) -> int:
    """The rows a ragged step of `rows` rows runs (`Model.step_rows`)."""
    return rows if rows <= ROW_BUCKET else -(-rows // ROW_BUCKET) * ROW_BUCKET


def _is_batch(prompt_ids) -> bool:
    """A list of prompts (strings or id sequences), not one prompt's ids."""
    return isinstance(prompt_ids, (list, tuple)) and bool(prompt_ids) and \
        all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt_ids)


def _cuda_executor(art, manifest: dict, weights: dict, interpret: bool):
    """A cuda artifact's executor: under Triton's interpreter on the CPU (`interpret`: the CPU
    executor's plan and buffers, the kernels interpreted), or on the GPU through the CUDA driver."""
    kernels = manifest["kernels"]
    if interpret:
        from . import interpret as interpreter

        sources = art.file(kernels["sources"][0]).parent
        return CpuExecutor(Functions(interpreter.functions(sources, kernels["functions"])), manifest, weights)
    from .cuda import CudaExecutor

    return CudaExecutor(art, manifest, weights)


def _gpu_device(kind: str, index: int | None):
    """The device an opencl (OpenCL device number `index`) or metal artifact runs on."""
    if kind == "metal":
        from .metal import MetalDevice

        return MetalDevice()
    from .opencl import OpenCLDevice

    return OpenCLDevice(index)


def _check_weights(plans: dict, weights: dict[str, np.ndarray], where: str) -> None:
    """Every weight the plan reads is in the weights file, as the plan describes it."""
    for i, name in enumerate(plans["weights"]):
        w, info = weights.get(name), plans["values"][name]
        if w is None:
            raise ArtifactError(f"{where}: plans.weights[{i}]: {name!r} is not in {WEIGHTS}")
        if str(w.dtype) != info["dtype"] or list(w.shape) != info["shape"]:
            raise ArtifactError(f"{where}: plans.values[{name!r}]: {info['dtype']}{info['shape']}, but the weights "
                                f"file holds {w.dtype}{list(w.shape)}")


def load(path, threads: int | None = None, interpret: bool = False, device: int | None = None) -> Model:
    """Open, verify and load an artifact; `threads`: the kernels' threads (default: every core,
    or LLMC_NUM_THREADS). A cuda artifact runs on the GPU, or with `interpret` under Triton's
    interpreter on the CPU (slow; needs torch and triton); an opencl artifact on OpenCL device
    number `device` (default 0)."""
    return Model(path, threads, interpret, device)
