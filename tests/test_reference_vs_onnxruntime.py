"""The reference executor on real exports of every zoo family matches onnxruntime on the same
ONNX file: logits and every present key/value, prefill of 7 tokens and a decode step of 1 token
over a past of 7, on random inputs drawn per test. Every intermediate value is also checked
against its inferred (symbolic) type."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from conftest import rel_err
from zoo_cases import VARIANTS, decoder_cases, encoder_cases, export

import llmc
from llmc import zoo

TOL = {"f32": 1e-4, "f16": 5e-3}  # f16: two different f16 computations round differently


def _compare(path, feeds, dtype="f32"):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want_names = [o.name for o in session.get_outputs()]
    want = dict(zip(want_names, session.run(None, feeds)))
    got = llmc.run_reference(llmc.from_onnx(path), feeds, check_types=True)
    assert list(got) == want_names
    for name in want_names:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        err = rel_err(got[name], want[name])
        assert err < TOL[dtype], f"{name}: relative error {err:.2e}"


def _steps(kv_cache):
    # (batch, new tokens, past tokens): a prefill, then a decode step over a past.
    return [(2, 7, 0), (2, 1, 7)] if kv_cache else [(2, 7, 0)]


@pytest.mark.parametrize("name,exporter,kv_cache", decoder_cases())
def test_decoder(name, exporter, kv_cache, rng):
    path = export(name, exporter=exporter, kv_cache=kv_cache)
    for batch, seq, past in _steps(kv_cache):
        feeds = zoo.get(name).feeds(rng, batch=batch, seq=seq, past=past, kv_cache=kv_cache)
        _compare(path, feeds)


@pytest.mark.parametrize("name,exporter", encoder_cases())
def test_encoder(name, exporter, rng):
    path = export(name, exporter=exporter)
    _compare(path, zoo.get(name).feeds(rng, batch=2, seq=7))


@pytest.mark.parametrize("name,variant", VARIANTS,
                         ids=[f"{n}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for n, kw in VARIANTS])
def test_variant(name, variant, rng):
    path = export(name, **variant)
    dtype = variant.get("dtype", "f32")
    for batch, seq, past in _steps(True):
        _compare(path, zoo.get(name).feeds(rng, batch=batch, seq=seq, past=past, dtype=dtype), dtype)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_left_padding_mask(name, exporter, rng):
    """A batch whose second row is left-padded: the padding mask takes part in attention."""
    path = export(name, exporter=exporter, kv_cache=True)
    feeds = zoo.get(name).feeds(rng, batch=2, seq=7, past=0)
    feeds["attention_mask"][1, :3] = 0
    _compare(path, feeds)
