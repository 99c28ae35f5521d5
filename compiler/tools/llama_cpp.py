"""llama.cpp as a benchmark peer (`llmc bench --quant`), on the same weights as llmc's model.

The zoo's Llama-family or GPT-2 model is written as a GGUF file (f32, with the `gguf` library,
laid out as llama.cpp's own converter does: a Llama's Q and K rows permuted from the Hugging
Face rotary layout to GGML's, GPT-2's Conv1D weights transposed; no vocabulary: token ids in,
logits out), then quantized by llama.cpp's own
quantizer (`llama_model_quantize`) to q8_0 or q4_0 with its default choices (the output
matrix of a q4_0 model goes to q6_K, as `llama-quantize` does).

The peer runs in a process of its own (`python -m llmc.tools.llama_cpp MODEL.gguf THREADS`),
answering the same JSON commands as llmc's runtime worker. Both packages come with the
`peers` extra: `pip install -e .[peers]` builds llama.cpp from source (about 10 minutes on 2
cores).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

FTYPES = {"q8_0": 7, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
FOR_QUANT = {"w8": "q8_0", "w4": "q4_0"}


def available() -> str | None:
    """None if llama.cpp can be measured here, else why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama.cpp is not installed ({e.name}: pip install -e .[peers])"
    return None


def _rotary_rows(w, heads: int):
    """Hugging Face's rotary halves -> GGML's interleaved pairs, per head (llama.cpp's convert)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama(cfg, state):
    """Llama: Q and K rows permuted to GGML's rotary layout, as llama.cpp's converter does."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    meta = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
            "head_count": heads, "head_count_kv": kv_heads, "rope_dimension_count": head_dim,
            "rope_freq_base": float(getattr(cfg, "rope_theta", 10000.0)), "layer_norm_rms_eps": cfg.rms_norm_eps}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in per_layer.items()})
    tensors = {g: state[hf] for hf, g in names.items() if hf in state}
    for i in range(cfg.num_hidden_layers):
        tensors[f"blk.{i}.attn_q.weight"] = _rotary_rows(tensors[f"blk.{i}.attn_q.weight"], heads)
        tensors[f"blk.{i}.attn_k.weight"] = _rotary_rows(tensors[f"blk.{i}.attn_k.weight"], kv_heads)
    return meta, tensors


def _gpt2(cfg, state):
    """GPT-2: its Conv1D weights are [in, out], GGML's matrices [out, in]; the head is the token table."""
    meta = {"context_length": cfg.n_positions, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
            "feed_forward_length": cfg.n_inner or 4 * cfg.n_embd, "head_count": cfg.n_head,
            "layer_norm_eps": cfg.layer_norm_epsilon}
    tensors = {"token_embd.weight": state["transformer.wte.weight"], "position_embd.weight": state["transformer.wpe.weight"],
               "output_norm.weight": state["transformer.ln_f.weight"], "output_norm.bias": state["transformer.ln_f.bias"]}
    per_layer = {"ln_1": ("attn_norm", False), "attn.c_attn": ("attn_qkv", True), "attn.c_proj": ("attn_output", True),
                 "ln_2": ("ffn_norm", False), "mlp.c_fc": ("ffn_up", True), "mlp.c_proj": ("ffn_down", True)}
    for i in range(cfg.n_layer):
        for hf, (g, conv) in per_layer.items():
            w = state[f"transformer.h.{i}.{hf}.weight"]
            tensors[f"blk.{i}.{g}.weight"] = w.T if conv else w
            tensors[f"blk.{i}.{g}.bias"] = state[f"transformer.h.{i}.{hf}.bias"]
    return meta, tensors


LAYOUTS = {"llama": _llama, "gpt2": _gpt2}  # transformers model_type -> (metadata, tensors)


def write_gguf(model, path: Path) -> Path:
    """A transformers Llama or GPT-2 model as an f32 GGUF file llama.cpp loads."""
    import gguf
    import numpy as np

    cfg = model.config
    if cfg.model_type not in LAYOUTS or getattr(cfg, "attention_bias", False):
        raise ValueError(f"llama.cpp peer: a {cfg.model_type} model is not written as GGUF here "
                         f"(supported: {', '.join(LAYOUTS)})")
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    meta, tensors = LAYOUTS[cfg.model_type](cfg, state)
    writer = gguf.GGUFWriter(str(path), cfg.model_type)
    for key, value in meta.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("no_vocab")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, w in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def convert_hf(folder: Path, out: Path, cache: Path) -> Path:
    """A Hugging Face folder as an f32 GGUF file, written by llama.cpp's own converter
    (`convert_hf_to_gguf.py`, with its vocabulary and metadata), from the llama.cpp sources that
    the installed llama-cpp-python's source distribution vendors (fetched from the package index
    once, into `cache`)."""
    import subprocess
    import tarfile
    from importlib.metadata import version

    from llmc.zoo.pretrained import download

    release = version("llama_cpp_python")
    sources = cache / f"llama.cpp-{release}"
    if not (sources / "convert_hf_to_gguf.py").exists():
        archive = download(f"llama-cpp-python=={release}", cache, source=True)
        prefix = f"llama_cpp_python-{release}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        tmp = cache / f".{sources.name}"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(sources)
        archive.unlink()
    done = subprocess.run([sys.executable, str(sources / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                           "--outfile", str(out)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {folder}:\n{done.stderr[-2000:]}")
    return out


def perplexity(gguf_path: Path, ids: list[int], ctx: int, n_chunks: int | None, threads: int):
    """llama.cpp's perplexity of token ids (its logits, through its library; chunked and scored
    as `llama-perplexity` does, by `llmc.runtime.perplexity`)."""
    import llama_cpp
    import numpy as np

    from llmc.runtime.perplexity import evaluate

    _quiet(llama_cpp)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)

    def logits(chunk):
        llm.reset()
        llm.eval(chunk.tolist())
        return np.array(llm.scores[:len(chunk)])
    return evaluate(logits, ids, ctx, n_chunks)


def decode_weight_bytes(path: Path) -> int:
    """Bytes of the matrices every decode step reads: all but the tables gathered by row (the
    token table, unless it is also the LM head, and GPT-2's positions)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    gathered = {"position_embd.weight"} | ({"token_embd.weight"} if any(t.name == "output.weight" for t in tensors)
                                           else set())
    return int(sum(t.n_bytes for t in tensors if t.name not in gathered))


def _quiet(llama_cpp) -> None:
    """llama.cpp's log lines (per tensor, per load) go nowhere: the bench prints its own."""
    global _silence
    _silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_silence, None)


_silence = None


def quantize(f32_path: Path, out: Path, ftype: str, threads: int) -> Path:
    """llama.cpp's own quantizer (what `llama-quantize` runs)."""
    import llama_cpp

    _quiet(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(f32_path).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f32_path} to {ftype}")
    return out


class LlamaCpp:
    """A GGUF model in a llama.cpp worker process; the same calls as the bench's other systems."""

    def __init__(self, gguf_path: Path, threads: int, name: str, n_ctx: int):
        from .worker import Worker

        self.name = name
        self.worker = Worker("llmc.tools.llama_cpp", gguf_path, threads, n_ctx, what=gguf_path)
        self.close = self.worker.close

    def prefill(self, prompt):
        return self.worker.ask("prefill", prompt=prompt)

    def decode(self, prompt, steps):
        return self.worker.ask("decode", prompt=prompt, steps=steps)

    def generate(self, prompt, steps):
        return self.worker.ask("generate", prompt=prompt, steps=steps)


def _worker() -> None:
    import llama_cpp
    import numpy as np

    path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _quiet(llama_cpp)
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def run(tokens):
        llm.eval(tokens)

    def last_token():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    def prefill(prompt):
        llm.reset()
        t = time.perf_counter()
        run(prompt)
        return time.perf_counter() - t

    def decode(prompt, steps):
        prefill(prompt)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            run([1])
            times.append(time.perf_counter() - t)
        return times

    def generate(prompt, steps):
        prefill(prompt)
        tokens = [last_token()]
        while len(tokens) < steps:
            run(tokens[-1:])
            tokens.append(last_token())
        return tokens

    commands = {"prefill": prefill, "decode": decode, "generate": generate}
    print(json.dumps({"vocab": vocab}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        print(json.dumps(commands[command["op"]](**command["args"])), flush=True)


if __name__ == "__main__":
    _worker()
