"""The paged KV cache (`--kv-layout paged:N`): onnxruntime's greedy tokens on every zoo decoder
family (slow), f32 and int8; a batch of prompts of different lengths
gives each prompt the tokens it gets alone, greedy and sampled, with sequences ending early and
their blocks going back to the pool; the pool grows from a block per sequence and holds far less
than contiguous caches would; files nobody here made; and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err, run_cli
from test_end_to_end import _onnxruntime_greedy

import llmc
from llmc import runtime, zoo
from llmc.runtime.paging import BlockPool

LAYOUT = "paged:4"
FIXTURES = Path(__file__).parent / "fixtures" / "third_party"


def _prompts(rng, vocab, lengths=(3, 11, 30, 6)):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


# slow (10 s each, CI): by default, the batch test holds paged llama to the contiguous artifact,
# which the end-to-end tests hold to onnxruntime
@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
def test_paged_cache_gives_onnxruntime_tokens(name, artifacts, rng):
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, 7).tolist()
    want, _ = _onnxruntime_greedy(name, prompt, 16)
    art = artifacts(name, kv_layout=LAYOUT)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["kv_cache"]["layout"] == {"order": "bhsd", "page_tokens": 4, "alignment": 64}
    entry = manifest["model"]["kv_cache"]["entries"][0]
    shape = manifest["plans"]["values"][entry["past"]]["shape"]
    assert shape[0] == [[1, ["blocks"]]] and shape[2] == 4  # a pool of blocks of 4 positions
    assert runtime.load(art).generate(prompt, 16) == want
    int8 = runtime.load(artifacts(name, kv_layout=LAYOUT, kv_cache="int8")).generate(prompt, 16)
    assert int8 == runtime.load(artifacts(name, kv_cache="int8")).generate(prompt, 16)


def test_a_batch_of_prompts_gets_each_prompt_its_solo_tokens(artifacts, rng):
    vocab = zoo.get("llama-tiny").config().vocab_size
    prompts = _prompts(rng, vocab)
    alone = runtime.load(artifacts("llama-tiny"))  # contiguous caches, one prompt at a time
    model = runtime.load(artifacts("llama-tiny", kv_layout=LAYOUT))
    want = [alone.generate(p, 24) for p in prompts]
    seen: list[tuple[int, int]] = []
    assert model.generate(prompts, 24, on_token=lambda i, t: seen.append((i, t))) == want
    assert [[t for i, t in seen if i == k] for k in range(len(prompts))] == want
    # the pool grew from a block per sequence as they did, and got every block back
    pages = model.executor.pages
    # the positions a sequence caches: its prompt and its tokens but the last (sampled, never fed)
    need = sum(-(-(len(p) + len(w) - 1) // 4) for p, w in zip(prompts, want))
    ended_together = len({len(w) for w in want}) == 1  # else some gave blocks back before the others grew
    assert (pages.peak == need if ended_together else pages.peak <= need)
    assert len(pages.free) == pages.capacity <= 1.5 * need + 1
    # sampled: each prompt's own generator, as alone
    sampled = model.generate(prompts, 16, temperature=0.8, top_k=20, seed=7)
    assert sampled == [model.generate(p, 16, temperature=0.8, top_k=20, seed=7) for p in prompts]
    # sequences that end early (an end token) give their blocks to the ones still going
    model.eos_token_ids = alone.eos_token_ids = {want[1][3], want[2][10]}
    ended = model.generate(prompts, 24)
    assert ended == [alone.generate(p, 24) for p in prompts] and len(ended[1]) <= 4 and len(ended[2]) <= 11


def test_a_batch_on_a_contiguous_cache_runs_prompt_by_prompt(artifacts, rng):
    model = runtime.load(artifacts("llama-tiny"))
    prompts = _prompts(rng, zoo.get("llama-tiny").config().vocab_size, (5, 2))
    assert model.generate(prompts, 8) == [model.generate(p, 8) for p in prompts]
    assert model.generate(prompts, 0) == [[], []]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimum-gpt2", "genai-llama-int4"])
def test_files_nobody_here_made(name, tmp_path, rng):
    """optimum's GPT-2 feeds positions (decoded together); the builder's int4 Llama derives them
    from the mask inside GroupQueryAttention (no positions input: prompt by prompt)."""
    path = FIXTURES / name / "model.onnx"
    paged = runtime.load(llmc.compile(path, output=tmp_path / "p.llmc", max_seq_len=64, kv_layout="paged:8"))
    alone = runtime.load(llmc.compile(path, output=tmp_path / "c.llmc", max_seq_len=64))
    prompts = _prompts(rng, 256, (3, 11, 20))
    assert paged.generate(prompts, 12) == [alone.generate(p, 12) for p in prompts]


def _ragged_case(name, artifacts, rng, **compile_options):
    """A ragged step against plain steps: A's prompt and B's first 5 tokens prefilled by plain
    steps; then one ragged step of B's next 6 tokens (a chunk) and A's next token (a decode row),
    and the same rows again split over two steps with other company."""
    model = runtime.load(artifacts(name, kv_layout=LAYOUT, **compile_options))
    a, b = _prompts(rng, zoo.get(name).config().vocab_size, (9, 11))
    model.executor.reset(batch=24)
    want_a = model._step(np.array([a]), [0], [0])[0]
    want_b = model._step(np.array([b]), [0], [1])[0]
    model.executor.reset(batch=24)
    model._step(np.array([a[:8]]), [0], [0])
    model._step(np.array([b[:5]]), [0], [1])
    rows = (b[5:] + [a[8]], list(range(5, 11)) + [8], [1] * 6 + [0])
    together = model.step_rows(*rows, range(7))
    model.executor.reset(batch=24)
    model._step(np.array([a[:8]]), [0], [0])
    model._step(np.array([b[:5]]), [0], [1])
    apart = np.concatenate([model.step_rows(b[5:8], [5, 6, 7], [1] * 3, range(3)),
                            model.step_rows([a[8]] + b[8:] + [7] * 10, [8, 8, 9, 10] + [0] * 10,
                                            [0, 1, 1, 1] + [2] * 10, [1, 2, 3, 0])])
    return model, together, apart, np.concatenate([want_b[5:], want_a[8:]])


# slow (CI) for every family but llama: compiles with a paged cache each (the onnxruntime test's)
@pytest.mark.parametrize("name", [pytest.param(m.name, marks=[] if m.name == "llama-tiny" else pytest.mark.slow)
                                  for m in zoo.TINY_DECODERS])
def test_a_ragged_step_computes_each_row_as_plain_steps_do(name, artifacts, rng):
    """Rows of several sequences at their own positions in one step (`Model.step_rows`, the
    server's step): the logits plain steps give (to rounding: the prefill's attention sums in
    another order), the same bits in any company (17 rows, padded to 24, or 3 and 14), and only
    the rows asked for; the padding's scratch blocks go back."""
    model, together, apart, want = _ragged_case(name, artifacts, rng)
    assert rel_err(together, want) < 1e-5, f"{name}: {rel_err(together, want)}"
    np.testing.assert_array_equal(together, apart)
    assert sorted(model.executor.pages.held) == [0, 1, 2]  # no scratch sequence (-1) left holding blocks


def test_a_ragged_step_with_an_int8_cache(artifacts, rng):
    model, together, apart, want = _ragged_case("llama-tiny", artifacts, rng, kv_cache="int8")
    assert rel_err(together, want) < 1e-5
    np.testing.assert_array_equal(together, apart)


def test_a_ragged_step_needs_a_paged_cache(artifacts):
    from llmc.runtime.errors import LlmcError

    model = runtime.load(artifacts("llama-tiny"))
    model.executor.reset(batch=2)
    with pytest.raises(LlmcError, match="needs an artifact with a paged KV cache"):
        model.step_rows([1, 2], [0, 0], [0, 1], [0, 1])


@pytest.mark.parametrize("rows,message", [
    (([1, 2], [0], [0, 1], [0]), "2 tokens, 1 positions and 2 sequences"),
    (([], [], [], []), "at least one row"),
    (([1, 2], [0, -1], [0, 0], [1]), "positions must be >= 0"),
    (([1, 2], [0, 1], [0, 0], [2]), "logits_of rows in 0..1"),
    (([1, 2], [0, 200], [0, 0], [1]), "context of 201 tokens exceeds the 128"),
    (([1, 10**6], [0, 1], [0, 0], [1]), "outside the vocabulary"),
])
def test_a_bad_ragged_step_is_refused_by_name(rows, message, artifacts):
    from llmc.runtime.errors import LlmcError

    model = runtime.load(artifacts("llama-tiny", kv_layout=LAYOUT))
    model.executor.reset(batch=4)
    with pytest.raises(LlmcError, match=message):
        model.step_rows(*rows)


def test_block_pool_takes_grows_and_gives_back():
    sizes = []
    pool = BlockPool(page_tokens=4, max_blocks=8, capacity=2, grow=sizes.append)
    pool.reserve(0, 5)  # two blocks
    pool.reserve(1, 1)  # a third: the pool grows by half, and a block
    assert sizes == [4] and pool.held == {0: [0, 1], 1: [2]}
    pool.reserve(0, 8)  # still two blocks
    pool.reserve(1, 13)  # three more: 4 -> 7
    assert sizes == [4, 7] and len(pool.held[1]) == 4 and pool.peak == 6
    np.testing.assert_array_equal(pool.table([1, 0])[:, :4], [pool.held[1], [0, 1, 0, 0]])
    freed = pool.held[1]
    pool.release(1)
    pool.reserve(2, 16)
    assert sorted(pool.held[2]) == sorted(freed)  # the freed blocks serve the next sequence first
    pool.clear()
    assert len(pool.free) == 7 and not pool.held


def test_block_pool_shares_a_cached_prefix_and_evicts_it_last():
    pool = BlockPool(page_tokens=4, max_blocks=8, capacity=6, grow=lambda n: None)
    a = list(range(100, 111))  # 11 tokens: 2 whole blocks
    pool.reserve(0, 11)
    pool.register(0, a, 11)
    assert pool.share(1, a[:8] + [1, 2, 3], limit=10) == 8  # both whole blocks
    assert pool.held[1] == pool.held[0][:2] and pool.in_use() == 3
    assert pool.share(2, [100, 101, 102, 9, 9], limit=4) == 0  # a block's last token differs
    pool.release(2)
    assert pool.share(3, a, limit=7) == 4  # at most `limit` tokens: one whole block
    pool.release(3)
    pool.release(0)
    pool.release(1)
    assert pool.in_use() == 0 and len(pool.free) == 6
    assert pool.share(4, a, limit=10) == 8  # released, still cached
    pool.release(4)
    pool.reserve(5, 4 * 4)  # the 4 uncached free blocks first
    assert pool.share(6, a, limit=10) == 8
    pool.release(6)
    pool.reserve(7, 2 * 4)  # now the cached ones, whose prefixes are forgotten
    assert pool.share(8, a, limit=10) == 0 and not pool.prefixes


@pytest.mark.parametrize("args,message", [
    (["--kv-layout", "paged:0"], "N, the tokens of a block, must be an integer from 1 to 4096"),
    (["--kv-layout", "paged:x"], "N, the tokens of a block"),
    (["--kv-layout", "pages"], "not a KV-cache layout; supported: auto, bhsd, bshd, paged:N"),
])
def test_compile_refuses(args, message, tmp_path):
    from zoo_cases import export

    done = run_cli("compile", str(export("llama-tiny", exporter="dynamo", kv_cache=True)), "-o",
                   str(tmp_path / "m.llmc"), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_paged_batch_prefills_one_sequence_at_a_time(artifacts):
    """Its arena holds one sequence's prefill or the batch's decode step, not a batch's prefill."""
    from llmc.runtime.errors import LlmcError

    model = runtime.load(artifacts("llama-tiny", kv_layout=LAYOUT))
    model.executor.reset(batch=2)
    with pytest.raises(LlmcError, match="prefills one sequence at a time"):
        model.forward(np.array([[1, 2, 3], [4, 5, 6]]), past=0)


def test_llmc_run_with_several_prompts_prints_one_line_each(artifacts, capsys):
    from llmc.cli import main

    art = str(artifacts("llama-tiny", kv_layout=LAYOUT))
    assert main(["run", art, "--prompt-ids", "1,2,3", "--prompt-ids", "4,5,6,7,8,9", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    solo = runtime.load(art)
    assert [[int(t) for t in line.split()] for line in lines] == [solo.generate([1, 2, 3], 5),
                                                                  solo.generate([4, 5, 6, 7, 8, 9], 5)]
