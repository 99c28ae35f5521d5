"""Shared fixtures. Zoo exports are cached on disk (LLMC_CACHE_DIR, default ~/.cache/llmc), so a
model is exported once per machine, not once per test run.

Random test data comes from the `rng` fixture: a fresh seed per test, printed when the test
fails; `LLMC_TEST_SEED=N pytest ...` replays a failure with the seed it printed."""

from __future__ import annotations

import os

import numpy as np
import pytest

# The Triton kernels run under Triton's interpreter in the tests (no GPU here): the switch must be
# on before triton is imported. Compiling them to cubins happens in worker processes without it.
os.environ.setdefault("TRITON_INTERPRET", "1")

SEED_VARIABLE = "LLMC_TEST_SEED"


@pytest.fixture(autouse=True, scope="session")
def _tuning_cache(tmp_path_factory):
    """The test run's own tuning table: kernels are built with their defaults unless a test
    tunes, and the user's table is neither read nor written."""
    os.environ["LLMC_TUNING_CACHE"] = str(tmp_path_factory.mktemp("tuning") / "tuning.json")


@pytest.fixture
def rng(request):
    """A generator seeded differently in every test (or by $LLMC_TEST_SEED)."""
    text = os.environ.get(SEED_VARIABLE)
    seed = int(text) if text else int(np.random.SeedSequence().entropy % 2**32)
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"{seed}: replay with {SEED_VARIABLE}={seed} pytest '{item.nodeid}'"))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """`artifacts(name, **options)`: a zoo model compiled once per session (max_seq_len 128)."""
    from zoo_cases import compiler

    return compiler(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """The native runtime's program (llmc-run), built for this machine."""
    from llmc import toolchain
    from llmc.runtime.cpu import arch

    return toolchain.build_runtime(arch(), tmp_path_factory.mktemp("native") / "llmc-run")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Error relative to the reference's norm."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm((got - want).ravel()) / max(np.linalg.norm(want.ravel()), 1e-30))


def run_cli(*args: str):
    """`llmc ARGS` in a process of its own (the environment's tuning table included)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True)


def in_kv_order(cache, order: str):
    """A cache [batch, kv_heads, max_seq(, d)] as kernels of `order` address it (bshd: seq second),
    and back: the swap is its own inverse. None stays None."""
    if cache is None or order == "bhsd":
        return cache
    return np.ascontiguousarray(np.swapaxes(cache, 1, 2))


def block_table(batch: int, max_seq: int, page: int, rng, spare: int = 3):
    """A paged cache's block table [batch, max_blocks]: every sequence's blocks, distinct, shuffled
    over a pool of `spare` more blocks than they need (the pool's size)."""
    max_blocks = -(-max_seq // page)
    blocks = rng.permutation(batch * max_blocks + spare)[:batch * max_blocks]
    return blocks.reshape(batch, max_blocks).astype(np.int32), batch * max_blocks + spare


def to_pages(cache, table, pool_blocks: int, page: int, fill=0):
    """A cache [batch, kv_heads, max_seq(, d)] (bhsd) as a pool [blocks, kv_heads, page(, d)]
    that `table` maps; blocks no sequence holds are `fill`."""
    batch, max_blocks = table.shape
    padded = np.full((batch, cache.shape[1], max_blocks * page, *cache.shape[3:]), fill, cache.dtype)
    padded[:, :, :cache.shape[2]] = cache
    pool = np.full((pool_blocks, cache.shape[1], page, *cache.shape[3:]), fill, cache.dtype)
    for b in range(batch):
        for i, block in enumerate(table[b]):
            pool[block] = padded[b, :, i * page:(i + 1) * page]
    return pool


def from_pages(pool, table, max_seq: int):
    """The inverse of `to_pages`: each sequence's positions [batch, kv_heads, max_seq(, d)]."""
    rows = [np.concatenate([pool[block] for block in blocks], axis=1) for blocks in table]
    return np.stack(rows)[:, :, :max_seq]
