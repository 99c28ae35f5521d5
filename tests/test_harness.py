"""The test harness itself: a failing test prints its random seed, and the seed replays it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

FAILING = '''
def test_draws(rng):
    x = rng.random()
    print("drawn", x)
    assert x > 2
'''


def _run(tmp_path, seed=None):
    env = {k: v for k, v in os.environ.items() if k != "LLMC_TEST_SEED"}
    if seed is not None:
        env["LLMC_TEST_SEED"] = str(seed)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    return out.stdout


def test_a_failure_prints_its_seed_and_the_seed_replays_it(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_fails.py").write_text(FAILING)
    first = _run(tmp_path)
    line = next(l for l in first.splitlines() if "replay with LLMC_TEST_SEED=" in l)
    seed = int(line.split("LLMC_TEST_SEED=")[1].split()[0])
    drawn = [l for l in first.splitlines() if l.startswith("drawn")]
    replayed = _run(tmp_path, seed)
    assert [l for l in replayed.splitlines() if l.startswith("drawn")] == drawn
    assert f"replay with LLMC_TEST_SEED={seed}" in replayed
