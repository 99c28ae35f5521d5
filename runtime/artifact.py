"""The .llmc artifact: its schema, sealing (checksums), and verified opening.

An artifact is a directory:

    model.llmc/
      manifest.json        format, format_version, llmc_version, target, cpu, model, kernels,
                           plans, and files: {relative path: {bytes, sha256}}
      weights.safetensors  the parameters after the passes (concatenated QKV, ...), 64-byte aligned
      kernels/…            compiled kernel libraries (per target)

The schema lives here, in the runtime (`schema.py`); the compiler's writer imports it and `seal`
checks what it writes, so reader and writer cannot drift. Opening checks, before anything is
allocated or run: the manifest parses, is an llmc manifest of a version this runtime reads, and
holds to the schema in every field; every file it lists or points at is listed, relative, inside
the directory, and present with the listed size (not truncated) and checksum (not altered).
Nothing is unpickled; the only code an artifact carries is the kernel libraries its manifest
declares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import schema
from .errors import ArtifactError

FORMAT = "llmc-artifact"
# 2: the cpu and index_bounds fields, aligned weights used in place; 3: model.roles, and dims
# whose atoms may be expressions (min, max, //) over the run-time dims; 4: cuda artifacts (Triton
# kernels: sources, cubins and launches), cpu null for them, f16 KV caches
FORMAT_VERSION = 6
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
_MAX_MANIFEST_BYTES = 64 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def seal(directory, manifest: dict) -> dict:
    """Write manifest.json for the files in `directory`, with their sizes and checksums.
    `manifest` holds every field but format, format_version and files."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    full = json.loads(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}))
    full["manifest_sha256"] = digest(full)
    text = json.dumps(full, indent=1, sort_keys=True) + "\n"
    schema.validate(full, f"{directory / MANIFEST} (as written)")
    (directory / MANIFEST).write_text(text)
    return full


def digest(manifest: dict) -> str:
    """The manifest's own checksum, over every field but itself: an edit after compilation (a
    longer context, another kernel) is refused as such rather than run."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict

    def file(self, rel: str) -> Path:
        return self.path / rel


def open_artifact(path) -> Artifact:
    """Open and verify an artifact directory; any problem raises ArtifactError naming it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact")
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an llmc artifact (an artifact is a directory with {MANIFEST})")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: not an llmc artifact (no {MANIFEST})")
    if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{manifest_path}: too large for a manifest")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not an llmc manifest (format is "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format version {manifest.get('format_version')!r}; this "
                            f"runtime reads version {FORMAT_VERSION} (recompile with this llmc)")
    schema.validate(manifest, str(manifest_path))
    if manifest["manifest_sha256"] != digest(manifest):
        raise ArtifactError(f"{manifest_path}: altered after compilation (its checksum, manifest_sha256, does not "
                            "match its fields); recompile rather than edit an artifact")
    root = path.resolve()
    for rel, info in manifest["files"].items():
        file = (path / rel).resolve()
        if Path(rel).is_absolute() or ".." in Path(rel).parts or root not in file.parents:
            raise ArtifactError(f"{manifest_path}: file {rel!r} lies outside the artifact (listed paths are "
                                "relative, inside the artifact's directory)")
        if not file.is_file():
            raise ArtifactError(f"{path / rel}: missing (the manifest lists it)")
        size = file.stat().st_size
        if size != info["bytes"]:
            what = "truncated" if size < info["bytes"] else "longer than recorded"
            raise ArtifactError(f"{path / rel}: {what} ({size} bytes, the manifest says {info['bytes']})")
        if sha256(file) != info["sha256"]:
            raise ArtifactError(f"{path / rel}: checksum mismatch (the file was altered after compilation)")
    return Artifact(path, manifest)
