"""The folders map into the `llmc` namespace; setuptools finds every package under each, so a
new subpackage ships without a hand-kept list (the metadata is in pyproject.toml)."""

from setuptools import find_packages, setup

ROOTS = {"llmc": "compiler", "llmc.passes": "passes", "llmc.backends": "backends", "llmc.runtime": "runtime"}

setup(
    package_dir=ROOTS,
    packages=[f"{name}.{sub}" if sub else name for name, folder in ROOTS.items()
              for sub in ["", *find_packages(folder)]],
    # the native runtime, built by `llmc runtime build`; the English sample AWQ calibrates on
    package_data={"llmc.runtime": ["native/*.c", "native/*.h"], "llmc": ["data/*.txt"]},
)
