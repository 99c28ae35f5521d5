"""Load an artifact and generate: prefill the prompt, then the compiled decode loop.

Imports numpy and tvm_ffi (the kernel runtime) only. Kernels that run in parallel need TVM's
runtime library loaded first, which ships in the apache-tvm wheel; it is found without
importing TVM's compiler.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np

from . import safetensors
from .artifact import WEIGHTS, open_artifact
from .errors import LlmcError
from .executor import Executor
from .sampling import sample

_RUNTIME_LOADED = False


def _load_tvm_runtime():
    """tvm_ffi first (it loads libtvm_ffi.so, which TVM's runtime library links against)."""
    global _RUNTIME_LOADED
    if _RUNTIME_LOADED:
        return
    import tvm_ffi  # noqa: F401

    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise LlmcError("TVM's runtime library is not installed (pip install apache-tvm)")
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtvm_runtime.so"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # parallel kernels call into it
    _RUNTIME_LOADED = True


class Model:
    def __init__(self, path):
        art = open_artifact(path)
        m = art.manifest
        if not m["plans"]:
            raise LlmcError(f"{path}: the artifact has no execution plan")
        _load_tvm_runtime()
        import tvm_ffi

        library = tvm_ffi.load_module(str(art.file(m["kernels"]["library"])))
        functions = {name: library[name] for name in m["kernels"]["functions"]}
        self.manifest = m
        self.max_seq_len = m["model"]["max_seq_len"]
        self.eos_token_id = m["model"].get("eos_token_id")
        self.executor = Executor(functions, m["plans"]["forward"], m["plans"]["values"],
                                 safetensors.load(art.file(WEIGHTS)), m["model"]["kv_cache"]["entries"],
                                 self.max_seq_len, logits=m["model"]["outputs"][0]["name"])

    def forward(self, input_ids: np.ndarray, past: int, last_only: bool = False) -> np.ndarray:
        """Logits [batch, seq, vocab] for `input_ids` after `past` cached tokens; with
        `last_only`, [batch, 1, vocab] for the last position (what generation needs)."""
        batch, seq = input_ids.shape
        feeds = {"input_ids": input_ids.astype(np.int64),
                 "attention_mask": np.ones((batch, past + seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64)}
        return self.executor.run(feeds, past, last_logits=last_only)

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise LlmcError("the prompt is empty")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise LlmcError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the context "
                            f"of {self.max_seq_len} tokens this artifact was compiled for")
        rng = np.random.default_rng(seed)
        self.executor.reset(batch=1)
        logits = self.forward(np.array([prompt]), past=0, last_only=True)
        out, past = [], len(prompt)
        for _ in range(max_new_tokens):
            token = sample(logits[0, -1], rng, temperature, top_k, top_p)
            out.append(token)
            if on_token:
                on_token(token)
            if token == self.eos_token_id or len(out) == max_new_tokens:
                break
            logits = self.forward(np.array([[token]]), past)
            past += 1
        return out


def load(path) -> Model:
    return Model(path)
