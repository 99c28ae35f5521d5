"""GPU tests (`scripts/gpu-check.sh` runs test_cuda_executor.py on a machine with an NVIDIA GPU,
`scripts/metal-check.sh` test_metal.py on a Mac; the default test run never collects this
folder). They share the CPU tests' helpers and fixtures."""

import importlib.util
import os
import sys
from pathlib import Path

# the interpreter's results are a reference: on before triton is imported (compiling to cubins
# happens in worker processes without it)
os.environ.setdefault("TRITON_INTERPRET", "1")
TESTS = Path(__file__).parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # onnx_reference, zoo_cases

# this module is `conftest` to the tests here: it hands on the CPU tests' conftest
_spec = importlib.util.spec_from_file_location("cpu_tests_conftest", TESTS / "conftest.py")
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)
rng, rel_err = _shared.rng, _shared.rel_err
pytest_runtest_makereport = _shared.pytest_runtest_makereport
