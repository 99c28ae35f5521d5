"""The export variants the tests run, in one place."""

from __future__ import annotations

import functools

from llmc import zoo

EXPORTERS = ("dynamo", "torchscript")


@functools.lru_cache(maxsize=None)
def export(name: str, **kwargs):
    """Export a zoo model (cached on disk by the zoo, and in memory for this test session)."""
    return zoo.get(name).export(**kwargs)


def compiler(root, target="cpu", **defaults):
    """`get(name, **options)`: a zoo model compiled for `target` into `root`, once (context 128)."""
    import llmc

    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            tag = "-".join([name] + [f"{k}{v}" for k, v in sorted(options.items())])
            cache[key] = llmc.compile(export(name, exporter="dynamo", kv_cache=True), target=target,
                                      output=root / f"{tag}.llmc", max_seq_len=128, **{**defaults, **options})
        return cache[key]
    return get


def decoder_cases():
    """(model name, exporter, kv_cache) for every tiny decoder family."""
    return [(m.name, e, kv) for m in zoo.TINY_DECODERS for e in EXPORTERS for kv in (True, False)]


def encoder_cases():
    return [(m.name, e) for m in zoo.TINY_MODELS if not m.is_decoder for e in EXPORTERS]


# Opsets, precision and weight storage, on two families with different attention code.
VARIANTS = [
    ("llama-tiny", dict(exporter="torchscript", opset=14)),
    ("gpt2-tiny", dict(exporter="torchscript", opset=14)),
    ("gpt2-tiny", dict(exporter="torchscript", opset=17)),
    ("llama-tiny", dict(exporter="dynamo", opset=18)),
    ("gpt2-tiny", dict(exporter="dynamo", opset=23)),
    ("llama-tiny", dict(exporter="dynamo", opset=25)),
    ("llama-tiny", dict(exporter="dynamo", dtype="f16")),
    ("gpt2-tiny", dict(exporter="dynamo", dtype="f16")),
    # The TorchScript exporter's f16 GPT-2 is invalid (onnxruntime rejects its LayerNorm).
    ("llama-tiny", dict(exporter="torchscript", dtype="f16")),
    ("llama-tiny", dict(exporter="dynamo", external_data=True)),
    ("qwen2-tiny", dict(exporter="torchscript", external_data=True)),
]
