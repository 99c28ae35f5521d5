"""The folders map into the `llmc` namespace; setuptools finds every package under each, so a
new subpackage ships without a hand-kept list (the metadata is in pyproject.toml)."""

from pathlib import Path

from setuptools import Extension, find_packages, setup

ROOTS = {"llmc": "compiler", "llmc.passes": "passes", "llmc.backends": "backends", "llmc.runtime": "runtime",
         "llmc.serve": "serve"}

setup(
    package_dir=ROOTS,
    packages=[f"{name}.{sub}" if sub else name for name, folder in ROOTS.items()
              for sub in ["", *find_packages(folder)]],
    # the native runtime, built by `llmc runtime build`; the English sample AWQ calibrates on
    package_data={"llmc.runtime": ["native/*.c", "native/*.h"], "llmc": ["data/*.txt"]},
    # libllmc, the native runtime as a library (its C API, llmc.h, through ctypes: not a Python
    # module): the Python runtime runs CPU artifacts on its executor and thread pool
    ext_modules=[Extension("llmc.runtime.libllmc",
                           sources=sorted(str(p) for p in Path("runtime/native").glob("*.c") if p.name != "main.c"),
                           extra_compile_args=["-std=c11", "-D_GNU_SOURCE", "-fvisibility=hidden"],
                           libraries=["dl", "m", "pthread"])],
)
