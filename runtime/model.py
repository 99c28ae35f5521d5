"""Load an artifact and generate: prefill the prompt, then the compiled decode loop.

Imports numpy and tvm_ffi (the kernel runtime) only, with TVM's runtime library for the
kernels' thread pool (`threads.py`). Loading checks, in order and before anything is allocated:
the artifact (`open_artifact`: schema, files, checksums), that this CPU can run its kernels, and
that every weight the plan reads (`plans.weights`) is in the weights file with the dtype and
shape the plan gives it. When a batch's buffers are first allocated, the executor checks that
the KV caches and activations fit in the memory this machine has free.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import cpu, memory, safetensors
from .artifact import WEIGHTS, open_artifact
from .errors import ArtifactError, LlmcError
from .executor import Executor
from .sampling import Rng, check_options, sample
from .text import Text
from .threads import import_tvm_ffi
from .threads import start as start_kernel_pool


class Model:
    def __init__(self, path, threads: int | None = None, interpret: bool = False):
        art = open_artifact(path)
        m = art.manifest
        where = str(art.file("manifest.json"))
        cuda = m["target"]["kind"] == "cuda"
        if interpret and not cuda:
            raise LlmcError(f"{where}: --interpret runs a cuda artifact's Triton kernels; this artifact is for "
                            f"{m['target']['kind']}")
        if not cuda:
            cpu.check(m["cpu"], where)
        if not m["plans"]["forward"]:
            raise ArtifactError(f"{where}: plans.forward: the artifact has no execution plan")
        weights = safetensors.load(art.file(WEIGHTS), writable=True)
        _check_weights(m["plans"], weights, where)
        self.manifest = m
        self.max_seq_len = m["model"]["max_seq_len"]
        self.eos_token_ids = set(m["model"]["eos_token_ids"])
        self._tokenizer = art.file(m["model"]["tokenizer"]) if m["model"]["tokenizer"] else None
        self._text = None
        self.index_bounds = m["model"]["index_bounds"]
        self.memory = memory.footprint(m, weights, art.file(WEIGHTS).stat().st_size)
        if cuda:
            self.threads = None
            self.executor = _cuda_executor(art, m, weights, interpret)
            return
        self.threads = start_kernel_pool(threads)
        library = import_tvm_ffi().load_module(str(art.file(m["kernels"]["library"])))
        try:
            functions = {name: library[name] for name in m["kernels"]["functions"]}
        except Exception as e:  # tvm_ffi raises its own error types for a missing symbol
            raise ArtifactError(f"{where}: kernels.functions: not in the kernel library ({e})") from None
        self.executor = Executor(functions, m, weights)

    def check_ids(self, feeds: dict[str, np.ndarray]) -> None:
        """Token ids index tables: one out of range would make the gather read outside them."""
        for name, bound in self.index_bounds.items():
            ids = feeds.get(name)
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= bound):
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise LlmcError(f"{name}: token id {bad} is outside the vocabulary (0..{bound - 1})")

    def forward(self, input_ids: np.ndarray, past: int, last_only: bool = False, greedy: bool = False) -> np.ndarray:
        """Logits [batch, seq, vocab] for `input_ids` after `past` cached tokens; with
        `last_only`, [batch, 1, vocab] for the last position (what generation needs; a cuda
        artifact on the GPU always gives these). With `greedy` (an executor with an `argmax`
        kernel: the GPU's), each sequence's next token, [batch], argmax on the device."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.dtype.kind not in "iu":
            raise LlmcError(f"input_ids: expected integer token ids [batch, seq], got {input_ids.dtype}{list(input_ids.shape)}")
        batch, seq = input_ids.shape
        roles = self.manifest["model"]["roles"]
        feeds = {roles["tokens"]: input_ids, roles["mask"]: np.ones((batch, past + seq)),
                 roles["positions"]: np.broadcast_to(np.arange(past, past + seq), (batch, seq))}
        feeds = {name: a for name, a in feeds.items() if name in self.executor.values}  # what the plan reads
        self.check_ids(feeds)
        if greedy:
            return self.executor.run(feeds, batch, seq, past, greedy=True)
        return self.executor.run(feeds, batch, seq, past, last_logits=last_only)

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
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """New token ids after `prompt_ids` (token ids, or a string when the artifact bundles a
        tokenizer), up to `max_new_tokens` or an end-of-sequence token (included)."""
        check_options(temperature, top_k, top_p)
        if isinstance(prompt_ids, str):
            prompt_ids = self.text.encode(prompt_ids)
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise LlmcError("the prompt must be a sequence of integer token ids") from None
        if not prompt:
            raise LlmcError("the prompt is empty")
        if type(max_new_tokens) is not int or max_new_tokens < 0:
            raise LlmcError(f"max_new_tokens {max_new_tokens!r}: must be an integer >= 0")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise LlmcError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                            f"of {self.max_seq_len} tokens this artifact was compiled for")
        rng = Rng(seed)
        on_device = temperature == 0 and getattr(self.executor, "argmax", None) is not None

        def next_token(ids, past, last_only=False) -> int:
            if on_device:  # greedy on the GPU: one token comes back, not the logits
                return int(self.forward(ids, past, last_only, greedy=True)[0])
            return sample(self.forward(ids, past, last_only)[0, -1], rng, temperature, top_k, top_p)

        self.executor.reset(batch=1)
        token = next_token(np.array([prompt]), 0, last_only=True)
        out, past = [], len(prompt)
        for _ in range(max_new_tokens):
            out.append(token)
            if on_token:
                on_token(token)
            if token in self.eos_token_ids or len(out) == max_new_tokens:
                break
            token = next_token(np.array([[token]]), past)
            past += 1
        return out


def _cuda_executor(art, manifest: dict, weights: dict, interpret: bool):
    """A cuda artifact's executor: under Triton's interpreter on the CPU (`interpret`: the CPU
    executor's plan and buffers, the kernels interpreted), or on the GPU through the CUDA driver."""
    kernels = manifest["kernels"]
    if interpret:
        from . import interpret as interpreter

        sources = art.file(kernels["sources"][0]).parent
        return Executor(interpreter.functions(sources, kernels["functions"]), manifest, weights)
    from .cuda import CudaExecutor

    return CudaExecutor(art, manifest, weights)


def _check_weights(plans: dict, weights: dict[str, np.ndarray], where: str) -> None:
    """Every weight the plan reads is in the weights file, as the plan describes it."""
    for i, name in enumerate(plans["weights"]):
        w, info = weights.get(name), plans["values"][name]
        if w is None:
            raise ArtifactError(f"{where}: plans.weights[{i}]: {name!r} is not in {WEIGHTS}")
        if str(w.dtype) != info["dtype"] or list(w.shape) != info["shape"]:
            raise ArtifactError(f"{where}: plans.values[{name!r}]: {info['dtype']}{info['shape']}, but the weights "
                                f"file holds {w.dtype}{list(w.shape)}")


def load(path, threads: int | None = None, interpret: bool = False) -> Model:
    """Open, verify and load an artifact; `threads`: the kernels' threads (default: every core,
    or LLMC_NUM_THREADS). A cuda artifact runs on the GPU, or with `interpret` under Triton's
    interpreter on the CPU (slow; needs torch and triton)."""
    return Model(path, threads, interpret)
