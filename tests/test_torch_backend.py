"""The FX frontend and `torch.compile(model, backend="llmc")`, against PyTorch eager.

Every model is a real transformers architecture with seeded random weights; inputs are drawn
fresh per test. The backend compiles real TVM kernels; what it cannot compile runs in eager, and
the report says so.
"""

from __future__ import annotations

import logging

import re

import numpy as np
import pytest
import torch

from llmc import zoo
from llmc.torch_compile import backend as torch_backend
from llmc.ir.evaluate import run_reference
from llmc.errors import LlmcError
from llmc.frontends.fx import from_exported_program

from conftest import rel_err

DECODERS = [m.name for m in zoo.TINY_DECODERS]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch_backend.REPORTS.clear()
    yield
    torch._dynamo.reset()


def _ids(rng, vocab, shape):
    return torch.from_numpy(rng.integers(0, vocab, shape))


def _fully_compiled():
    assert torch_backend.REPORTS, "llmc compiled nothing"
    for report in torch_backend.REPORTS:
        assert not report.fallbacks, str(report)
        assert report.compiled_nodes > 0


# llama by default, every family with the slow tests (CI): 10 s each
@pytest.mark.parametrize("name", [n if n == "llama-tiny" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in DECODERS])
def test_decoder_prefill_and_decode_match_eager(name, rng):
    model = zoo.get(name).build_torch()
    compiled = torch.compile(model, backend="llmc")
    ids = _ids(rng, model.config.vocab_size, (2, 7))
    nxt = _ids(rng, model.config.vocab_size, (2, 1))
    with torch.no_grad():
        ref = model(input_ids=ids)
        out = compiled(input_ids=ids)
        assert rel_err(out.logits, ref.logits) < 1e-5
        for layer_out, layer_ref in zip(out.past_key_values.layers, ref.past_key_values.layers):
            assert rel_err(layer_out.keys, layer_ref.keys) < 1e-5
            assert rel_err(layer_out.values, layer_ref.values) < 1e-5
        step = compiled(input_ids=nxt, past_key_values=out.past_key_values)
        want = model(input_ids=nxt, past_key_values=ref.past_key_values)
        assert rel_err(step.logits, want.logits) < 1e-5
    _fully_compiled()


def test_encoder_matches_eager(rng):
    model = zoo.get("bert-tiny").build_torch()
    compiled = torch.compile(model, backend="llmc")
    ids = _ids(rng, model.config.vocab_size, (2, 9))
    feeds = dict(input_ids=ids, token_type_ids=_ids(rng, 2, (2, 9)), attention_mask=torch.ones(2, 9, dtype=torch.long))
    with torch.no_grad():
        out, ref = compiled(**feeds), model(**feeds)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
    assert rel_err(out.pooler_output, ref.pooler_output) < 1e-5
    _fully_compiled()


def _generate_both(model, ids, **kwargs):
    """(llmc's tokens, eager's tokens) of greedy generation, the forward compiled for the first."""
    kwargs = dict(do_sample=False, pad_token_id=0, **kwargs)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        eager, model.forward = model.forward, torch.compile(model.forward, backend="llmc")
        got = model.generate(ids, **kwargs)
    model.forward = eager
    return got, want


def _assert_same_greedy(model, got, want):
    """Greedy tokens equal eager's, except where eager's own logits tie: random-weight models
    have flat next-token distributions, and a last-bit difference may pick the other of two
    logits equal to 1e-6. At the first difference, both tokens must be eager's top choice."""
    if torch.equal(got, want):
        return
    i = int((got[0] != want[0]).nonzero()[0])
    with torch.no_grad():
        logits = model(input_ids=want[:, :i]).logits[0, -1]
    gap = float(logits[want[0, i]] - logits[got[0, i]])
    assert gap <= 1e-5 * float(logits.abs().max()), f"token {i}: {int(got[0, i])} instead of {int(want[0, i])}"


# slow (18 s each): prefill and decode through torch.compile stay in the default run
# (test_decoder_prefill_and_decode_match_eager)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_generate_greedy_tokens_equal_eager_with_bounded_recompiles(name, rng):
    model = zoo.get(name).build_torch()
    got, want = _generate_both(model, _ids(rng, model.config.vocab_size, (1, 6)), max_new_tokens=64)
    _assert_same_greedy(model, got, want)
    # prefill, the first decode step (sizes seen once are specialized), then one graph with
    # the past length dynamic for every later step
    assert len(torch_backend.REPORTS) == 3
    _fully_compiled()


def _static_cache(model, length):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def test_static_cache_is_written_in_place_and_compiles_whole(rng, monkeypatch):
    """transformers' StaticCache writes with index_copy: here rope_cache writes the caller's
    cache tensors in place (the graph's new cache values are its input tensors: no copy of the
    cache per step), and prefill and decode each compile as one llmc graph."""
    from llmc.torch_compile.runner import TorchPlan

    aliased = []  # per call: how many outputs are input tensors themselves
    call = TorchPlan.__call__

    def watched(self, *args):
        outs = call(self, *args)
        aliased.append(sum(any(o is a for a in args) for o in outs))
        return outs
    monkeypatch.setattr(TorchPlan, "__call__", watched)
    model = zoo.get("llama-tiny").build_torch()
    compiled = torch.compile(model, backend="llmc")
    ids, nxt = _ids(rng, model.config.vocab_size, (1, 7)), _ids(rng, model.config.vocab_size, (1, 1))
    ours, theirs = _static_cache(model, 16), _static_cache(model, 16)
    outs = []
    with torch.no_grad():
        for past, x in ((0, ids), (7, nxt), (8, nxt)):
            positions = torch.arange(past, past + x.shape[1])
            out = compiled(input_ids=x, past_key_values=ours, cache_position=positions)
            ref = model(input_ids=x, past_key_values=theirs, cache_position=positions)
            assert rel_err(out.logits, ref.logits) < 1e-5, past
            outs.append((out.logits, ref.logits))
    assert rel_err(*outs[1]) < 1e-5  # a later step of the same sizes leaves the caller's logits alone
    # the decode step's: every layer's keys and values (the prefill creates the cache's tensors:
    # StaticCache allocates them at its first update, inside the graph)
    assert aliased[1:] == [2 * len(ours.layers)] * 2
    for layer_out, layer_ref in zip(ours.layers, theirs.layers):
        assert rel_err(layer_out.keys, layer_ref.keys) < 1e-5 and rel_err(layer_out.values, layer_ref.values) < 1e-5
    _fully_compiled()
    assert all(report.subgraphs == 1 for report in torch_backend.REPORTS)


def test_two_static_caches_stay_apart_and_decode_steps_bind_once(rng, monkeypatch):
    """The prefill creates a StaticCache's tensors (a constant of zeros in the graph): each cache
    gets tensors of its own. The decode steps, all of one size, bind the kernel calls once."""
    from llmc.torch_compile.runner import TorchPlan

    binds = []
    bind = TorchPlan._bind
    monkeypatch.setattr(TorchPlan, "_bind", lambda self, env: binds.append(id(self)) or bind(self, env))
    model = zoo.get("llama-tiny").build_torch()
    compiled = torch.compile(model, backend="llmc")
    first, second = (_ids(rng, model.config.vocab_size, (1, 6)) for _ in range(2))
    ours, other, theirs = (_static_cache(model, 16) for _ in range(3))
    with torch.no_grad():
        compiled(input_ids=first, past_key_values=ours, cache_position=torch.arange(6))
        compiled(input_ids=second, past_key_values=other, cache_position=torch.arange(6))
        model(input_ids=first, past_key_values=theirs, cache_position=torch.arange(6))
        for past in range(6, 10):
            nxt, positions = _ids(rng, model.config.vocab_size, (1, 1)), torch.tensor([past])
            out = compiled(input_ids=nxt, past_key_values=ours, cache_position=positions)
            ref = model(input_ids=nxt, past_key_values=theirs, cache_position=positions)
            assert rel_err(out.logits, ref.logits) < 1e-5, past
    # one binding per graph: the prefill's (both calls) and the decode step's (recompiled once
    # when Dynamo marks the position dynamic: at most one more graph)
    assert len(binds) == len(set(binds)) <= 3


@pytest.mark.slow  # a second generate loop under torch.compile (15 s)
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_generate_with_static_cache_equals_eager(name, rng):
    model = zoo.get(name).build_torch()
    got, want = _generate_both(model, _ids(rng, model.config.vocab_size, (1, 5)), max_new_tokens=32,
                               cache_implementation="static")
    _assert_same_greedy(model, got, want)
    _fully_compiled()
    assert all(report.subgraphs == 1 for report in torch_backend.REPORTS)


def test_a_static_cache_written_out_of_order_is_refused():
    """The kernel writes consecutive rows: other positions are an error naming the cache."""
    from llmc.torch_compile.runner import _first_position

    assert _first_position(torch.tensor([5, 6, 7]), 3, 16, "k") == 5
    for positions in ([5, 7, 6], [14, 15, 16], [3]):
        with pytest.raises(LlmcError, match="k: a static cache is written at 3 consecutive positions inside its 16"):
            _first_position(torch.tensor(positions), 3, 16, "k")


class _Cumprod(torch.nn.Module):
    """An op llmc has no converter for (cumprod) between two that it compiles."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.relu(self.proj(x))
        return torch.cumprod(y * 0.5 + 1.0, dim=-1) - y


def test_unsupported_op_falls_back_to_eager_and_is_reported(rng, caplog):
    module = _Cumprod().eval()
    x = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32))
    compiled = torch.compile(module, backend="llmc", options={"report": True})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="llmc.torch_compile.backend"):
        got, want = compiled(x), module(x)
    assert rel_err(got, want) < 1e-5
    report = torch_backend.REPORTS[-1]
    assert report.compiled_nodes > 0
    assert [reason for reason in report.fallbacks if "cumprod" in reason], str(report)
    assert "cumprod" in caplog.text


class _Truncations(torch.nn.Module):
    """Eight nodes that have a converter but do not convert (div with a rounding mode), between
    GEMMs that do."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(8))

    def forward(self, x):
        for proj in self.proj:
            x = torch.div(proj(x) * 4.0, 3.0, rounding_mode="trunc") + x
        return x


def test_every_node_that_does_not_convert_is_found_in_one_round(rng, monkeypatch):
    """One conversion records every failing node: the nodes go to eager together, so the
    subgraphs are built once or twice each, not once per failing node (a quadratic number)."""
    builds = []
    build = torch_backend._Subgraph.build
    monkeypatch.setattr(torch_backend._Subgraph, "build", staticmethod(lambda *a: builds.append(1) or build(*a)))
    module = _Truncations().eval()
    x = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32))
    compiled = torch.compile(module, backend="llmc")
    with torch.no_grad():
        got, want = compiled(x), module(x)
    assert rel_err(got, want) < 1e-5
    report = torch_backend.REPORTS[-1]
    truncated = [name for reason, names in report.fallbacks.items() if "rounding_mode" in reason for name in names]
    assert len(truncated) == 8, str(report)
    assert report.subgraphs == 9 and len(builds) <= report.subgraphs + 1, (len(builds), str(report))


def test_graph_needing_gradients_runs_in_eager(rng, caplog):
    module = _Cumprod().train()
    x = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32))
    compiled = torch.compile(module, backend="llmc")
    with caplog.at_level(logging.WARNING, logger="llmc.torch_compile.backend"):
        got = compiled(x)
    got.sum().backward()
    assert module.proj.weight.grad is not None
    assert "gradients" in caplog.text
    assert not torch_backend.REPORTS


def test_changed_scalar_input_recompiles(rng):
    """Dynamo lifts Python floats to inputs; llmc compiles them in as constants and checks them."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.eps = 1e-6

        def forward(self, x):
            return self.proj(x) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    module = Scaled().eval()
    compiled = torch.compile(module, backend="llmc", dynamic=True)
    x = torch.from_numpy(rng.standard_normal((4, 8)).astype(np.float32))
    with torch.no_grad():
        for eps in (1e-6, 0.5):
            module.eps = eps
            assert rel_err(compiled(x), module(x)) < 1e-5


def test_unknown_option_is_an_error():
    with pytest.raises(LlmcError, match="unknown llmc option"):
        torch_backend.llmc_backend(None, [], options={"quantise": "w8"})


@pytest.mark.parametrize("options,message", [
    ({"target": "cuda"}, "target 'cuda' builds kernels that do not run in this process; supported: cpu"),
    ({"target": "tpu"}, "target 'tpu' is not supported yet"),
    ({"activations": "int4"}, "activations 'int4' are not supported"),
    ({"quant": "w3"}, "quantization 'w3' is not supported"),
    ({"cpu": "pentium"}, "CPU 'pentium' is not supported for this target"),
])
def test_options_mean_what_they_mean_to_llmc_compile(options, message):
    """The options are a CompileOptions, resolved by the target's backend as on the command line."""
    with pytest.raises(LlmcError, match=re.escape(message)):
        torch_backend.llmc_backend(None, [], options=options)


@pytest.mark.parametrize("name", ["qwen2-tiny", "gpt2-tiny"])
def test_exported_program_imports_to_the_reference_semantics(name, rng):
    model = zoo.get(name).build_torch()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).logits

    ids = _ids(rng, model.config.vocab_size, (1, 6))
    graph = from_exported_program(torch.export.export(Logits(), (ids,)))
    (got,) = run_reference(graph, {graph.inputs[0].name: ids.numpy()}).values()
    assert rel_err(got, Logits()(ids).detach().numpy()) < 1e-5


def test_quant_option_quantizes_the_weights(rng):
    """options={"quant": "w8"}: the GEMMs read int8 weights; outputs stay close to eager's."""
    model = zoo.get("llama-tiny").build_torch()
    compiled = torch.compile(model, backend="llmc", options={"quant": "w8", "dump_dir": None})
    ids = _ids(rng, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, model(input_ids=ids).logits
    assert 1e-6 < rel_err(got, want) < 5e-2
    _fully_compiled()


@pytest.mark.slow
def test_bench_torch_runs_each_system_in_its_own_process(tmp_path):
    from llmc.cli import main

    out = tmp_path / "bt.json"
    assert main(["bench-torch", "gpt2-tiny", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                 "--systems", "eager", "llmc", "llmc-runtime", "--cache", "static", "--loop", "forward",
                 "--json", str(out)]) == 0
    import json

    rows = {r["system"]: r for r in json.loads(out.read_text())["systems"]}
    # (the speeds of a tiny model's 4 tokens are noise, the runtime's can come out negative)
    assert set(rows) == {"eager", "llmc", "llmc-runtime"} and all(r["prefill_ms"] > 0 for r in rows.values())
    assert rows["llmc"]["same_tokens_as_eager"] and rows["llmc-runtime"]["same_tokens_as_eager"]


@pytest.mark.parametrize("bad", [256, -1])
def test_token_ids_outside_the_vocabulary_are_refused(bad, rng):
    """The embedding gather does not check its indices: the runner does, before any kernel."""
    model = zoo.get("llama-tiny").build_torch()
    compiled = torch.compile(model, backend="llmc")
    ids = _ids(rng, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        compiled(input_ids=ids)
        ids[0, 2] = bad
        with pytest.raises(LlmcError, match=f"index {bad} is outside the table it indexes"):
            compiled(input_ids=ids)
