"""The manifest's schema, as data, and the check that holds a manifest to it.

Every field is checked before anything is allocated or loaded: its presence, its type, and the
range or the set of names it may take; then the references between fields (a plan step's kernel
is one the library declares, its arguments are values the plan describes, every file the
manifest points at is a listed file). A failure names the field by its path, e.g.
`plans.forward[3].kernel`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .dims import BadDim, elements, is_atom, parse
from .errors import ArtifactError
DTYPES = ("float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
KINDS = ("linear", "attention", "rope_cache", "injective", "norm")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[^\x00-\x1f]{1,512}$")


class Invalid(ValueError):
    pass


# A spec is: a type (the value must be an instance), a tuple of allowed values, a one-element
# list (a list of that spec), a dict (an object with exactly these fields; "?name" optional),
# Map(spec) (an object whose every value is spec), or a Check (a predicate with its wording).
@dataclass(frozen=True)
class Map:
    of: Any


@dataclass(frozen=True)
class Check:
    what: str
    ok: Any

    def __call__(self, v) -> bool:
        try:
            return bool(self.ok(v))
        except TypeError:
            return False


def _int(lo: int, hi: int | None = None) -> Check:
    return Check(f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""),
                 lambda v: type(v) is int and v >= lo and (hi is None or v <= hi))


NAME = Check("a name (a non-empty string)", lambda v: isinstance(v, str) and _NAME.match(v))
ATOM = Check("a run-time dim (batch, seq, past, total, blocks) or an expression over them", is_atom)
POLY = Check("a dim: an integer, or [[coefficient, [atoms]], ...] whose atoms are batch/seq/past/total/blocks "
             "or expressions over them", lambda v: (type(v) is int and v >= 0) or (isinstance(v, list) and all(
                 isinstance(t, list) and len(t) == 2 and type(t[0]) is int and isinstance(t[1], list)
                 and all(is_atom(a) for a in t[1]) for t in v)))
OPTIONAL_NAME = Check("a name or null", lambda v: v is None or NAME(v))
TENSOR = {"name": NAME, "dtype": str, "shape": [str]}
VALUE = {"dtype": DTYPES, "shape": [POLY]}
VIEW = Check("null, or a shape: [dim, ...]", lambda v: v is None or (isinstance(v, list) and all(POLY(d) for d in v)))
STEP = {"kernel": NAME, "kind": KINDS, "args": [str], "dims": [ATOM], "views": [VIEW]}
SCALAR = Check("a number", lambda v: type(v) in (int, float))
GRID_FACTOR = Check("[dim, block]", lambda v: isinstance(v, list) and len(v) == 2 and POLY(v[0])
                    and type(v[1]) is int and v[1] >= 1)
SIGNATURE = ("*fp32", "*fp16", "*bf16", "*i64", "*i32", "*i8", "*u8", "*i1", "i32")
CUBIN = {"cubin": NAME, "symbol": NAME, "shared": _int(0), "scratch_args": _int(0, 2),
         "global_scratch_size": _int(0), "profile_scratch_size": _int(0)}
TRITON_KERNEL = {"module": NAME, "function": NAME, "constexprs": Map(SCALAR), "signature": [SIGNATURE],
                 "grid": [[GRID_FACTOR]], "num_warps": _int(1, 32), "num_stages": _int(1, 8),
                 "decode": Check("null or {kernel, max_rows, rows}", lambda v: v is None or (
                     isinstance(v, dict) and set(v) == {"kernel", "max_rows", "rows"} and NAME(v["kernel"])
                     and type(v["max_rows"]) is int and POLY(v["rows"]))),
                 "binaries": Map(CUBIN)}

def _expression(v) -> bool:
    try:
        return isinstance(v, str) and parse(v) is not None
    except BadDim:
        return False


EXPRESSION = Check("an expression over the run-time dims", _expression)
GPU_ARG = Check("a buffer's position, {scratch: i}, or [expression, int64|int32]", lambda v: (
    (type(v) is int and v >= 0) or (isinstance(v, dict) and set(v) == {"scratch"} and type(v["scratch"]) is int)
    or (isinstance(v, list) and len(v) == 2 and _expression(v[0]) and v[1] in ("int64", "int32"))))
LAUNCH_TAGS = tuple(f"{kind}.{axis}" for kind in ("blockIdx", "threadIdx") for axis in "xyz")
GPU_KERNEL = {"name": NAME, "args": [GPU_ARG], "launch": Check(
    f"an object of launch extents ({', '.join(LAUNCH_TAGS)}: expressions over the run-time dims)",
    lambda v: isinstance(v, dict) and set(v) <= set(LAUNCH_TAGS) and all(_expression(e) for e in v.values()))}
# a TVM function's device kernels in launch order and the intermediates they pass on (`runtime/opencl.py`)
GPU_GROUP = {"kernels": [GPU_KERNEL], "scratch": [{"name": NAME, "dtype": DTYPES, "elements": EXPRESSION}]}
# a kernel's signature as tuning tables key it, its knob values (`llmc.tuning`), and where they came from
TUNED = {"kernel": str, "config": Map(Check("a number or a string", lambda v: type(v) in (int, float, str, bool))),
         "source": ("default", "cache", "file", "measured", "partial")}
# the kernels by target kind: one TVM library, Triton kernels (source and cubins), or TVM's GPU
# kernels (one source file, and the launch table of each function's kernels)
KERNELS = {"llvm": {"library": NAME, "functions": [NAME], "tuning": Map(TUNED)},
           "cuda": {"triton_version": str, "archs": [NAME], "sources": [NAME], "functions": Map(TRITON_KERNEL),
                    "argmax": NAME, "tuning": Map(TUNED)},
           **{kind: {"source": NAME, "functions": Map(GPU_GROUP), "?tuning": Map(TUNED)}
              for kind in ("opencl", "metal")}}
TARGETS = {"llvm": {"kind": ("llvm",), "?mcpu": str, "?mtriple": str, "?mattr": [str], "?num-cores": _int(1),
                    "?fast-math-reassoc": bool, "?fast-math-contract": bool},
           "cuda": {"kind": ("cuda",), "dtype": ("fp32", "fp16")},
           **{kind: {"kind": (kind,)} for kind in ("opencl", "metal")}}
GPU_KINDS = ("cuda", "opencl", "metal")  # artifacts with no CPU requirements
CPU = {"name": NAME, "arch": ("x86_64", "aarch64"), "features": [NAME]}
FILE = {"bytes": _int(0), "sha256": Check("a sha256 hex digest", lambda v: isinstance(v, str) and _SHA256.match(v))}

# the KV cache's descriptor (`llmc.backends.cache_layout.lay_out_caches`); the runtimes allocate the caches
# from plans.values, 64-byte aligned. A paged cache's kernels also take these two run-time values:
# each sequence's blocks, int32 [batch, max_blocks], and the positions it holds, int32 [batch]
KV_BLOCKS, KV_LENGTHS = "kv_cache.blocks", "kv_cache.lengths"
KV_LAYOUT = {"order": ("bhsd", "bshd"), "page_tokens": _int(0, 4096),
             "alignment": Check("64", lambda v: v == 64 and type(v) is int)}

MANIFEST = {
    "format": str,
    "format_version": int,
    "llmc_version": str,
    "target": Check(f"an object whose kind is one of {', '.join(TARGETS)}",  # the rest by kind: TARGETS
                    lambda v: isinstance(v, dict) and v.get("kind") in TARGETS),
    "cpu": Check("null or {name, arch, features}", lambda v: v is None or isinstance(v, dict)),
    "model": {
        "name": str,
        "inputs": [TENSOR],
        "outputs": [TENSOR],
        "max_seq_len": _int(1, 1 << 20),
        "index_bounds": Map(_int(1)),
        "roles": {"tokens": NAME, "mask": OPTIONAL_NAME, "positions": OPTIONAL_NAME, "logits": NAME},
        "kv_cache": {"layout": KV_LAYOUT,
                     "dtype": ("f32", "f16", "int8"), "entries": [{"past": NAME, "present": NAME}]},
        "quant": Check("null or an object", lambda v: v is None or isinstance(v, dict)),
        "eos_token_ids": [_int(0)],
        "tokenizer": OPTIONAL_NAME,
    },
    "kernels": Check("an object", lambda v: isinstance(v, dict)),  # by target kind: KERNELS
    "plans": {"forward": [STEP], "values": Map(VALUE), "weights": [NAME]},
    "files": Map(FILE),
    "manifest_sha256": FILE["sha256"],
}


def check(value, spec, path: str) -> None:
    """Raise Invalid naming `path` where `value` departs from `spec`."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise Invalid(f"{path}: expected an object, got {_show(value)}")
        for key, sub in spec.items():
            name = key.lstrip("?")
            if name in value:
                check(value[name], sub, f"{path}.{name}" if path else name)
            elif not key.startswith("?"):
                raise Invalid(f"{path + '.' if path else ''}{name}: missing")
        known = {k.lstrip("?") for k in spec}
        extra = sorted(set(value) - known)
        if extra:
            raise Invalid(f"{path + '.' if path else ''}{extra[0]}: unknown field")
    elif isinstance(spec, Map):
        if not isinstance(value, dict):
            raise Invalid(f"{path}: expected an object, got {_show(value)}")
        for key, sub in value.items():
            check(sub, spec.of, f"{path}[{key!r}]")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise Invalid(f"{path}: expected a list, got {_show(value)}")
        for i, item in enumerate(value):
            check(item, spec[0], f"{path}[{i}]")
    elif isinstance(spec, tuple):
        if not isinstance(value, str) or value not in spec:
            raise Invalid(f"{path}: expected one of {', '.join(spec)}, got {_show(value)}")
    elif isinstance(spec, Check):
        if not spec(value):
            raise Invalid(f"{path}: expected {spec.what}, got {_show(value)}")
    elif spec is int:
        if type(value) is not int:
            raise Invalid(f"{path}: expected an integer, got {_show(value)}")
    elif not isinstance(value, spec):
        raise Invalid(f"{path}: expected {spec.__name__}, got {_show(value)}")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(manifest: dict, where: str) -> None:
    """The whole manifest against MANIFEST, then the references between its fields."""
    try:
        check(manifest, MANIFEST, "")
        kind = manifest["target"]["kind"]
        check(manifest["target"], TARGETS[kind], "target")
        check(manifest["kernels"], KERNELS[kind], "kernels")
        if (manifest["cpu"] is None) != (kind in GPU_KINDS):
            raise Invalid(f"cpu: {'null' if manifest['cpu'] is None else 'given'} for a {kind} target")
        if manifest["cpu"] is not None:
            check(manifest["cpu"], CPU, "cpu")
        _references(manifest)
    except Invalid as e:
        raise ArtifactError(f"{where}: {e}") from None


def _references(m: dict) -> None:
    files, values = m["files"], m["plans"]["values"]
    functions = set(m["kernels"]["functions"])
    presents = {e["present"] for e in m["model"]["kv_cache"]["entries"]}  # the same buffers as the pasts
    if m["target"]["kind"] == "cuda":
        _triton_references(m["kernels"], files)
    elif m["target"]["kind"] in GPU_KINDS:
        _gpu_references(m["kernels"], m["plans"]["forward"], files)
    elif m["kernels"]["library"] not in files:
        raise Invalid(f"kernels.library: {m['kernels']['library']!r} is not a listed file")
    for name in m["kernels"].get("tuning", {}):
        if name not in functions:
            raise Invalid(f"kernels.tuning[{name!r}]: not a kernel of kernels.functions")
    from .artifact import WEIGHTS

    if WEIGHTS not in files:
        raise Invalid(f"files: the weights ({WEIGHTS}) are not listed")
    for i, step in enumerate(m["plans"]["forward"]):
        if step["kernel"] not in functions:
            raise Invalid(f"plans.forward[{i}].kernel: {step['kernel']!r} is not a kernel of kernels.functions")
        if len(step["views"]) != len(step["args"]):
            raise Invalid(f"plans.forward[{i}].views: {len(step['views'])} views for {len(step['args'])} arguments")
        for j, (arg, view) in enumerate(zip(step["args"], step["views"])):
            if not arg and m["target"]["kind"] == "llvm":  # CPU kernels declare every parameter they take
                raise Invalid(f"plans.forward[{i}].args[{j}]: an unread slot (\"\"), which only a GPU plan has")
            if arg and arg not in values and arg not in presents:
                raise Invalid(f"plans.forward[{i}].args[{j}]: value {arg!r} is not described in plans.values")
            if view is not None and (arg not in values or elements(view) != elements(values[arg]["shape"])):
                raise Invalid(f"plans.forward[{i}].views[{j}]: a view of {arg!r} must hold its elements, no more or "
                              f"fewer: {view}")
    for i, name in enumerate(m["plans"]["weights"]):
        if name not in values:
            raise Invalid(f"plans.weights[{i}]: {name!r} is not described in plans.values")
    for i, e in enumerate(m["model"]["kv_cache"]["entries"]):
        if e["past"] not in values:
            raise Invalid(f"model.kv_cache.entries[{i}].past: value {e['past']!r} is not described in plans.values")
    _paging_references(m)
    inputs = {t["name"] for t in m["model"]["inputs"]}
    roles = m["model"]["roles"]
    if roles["logits"] not in {t["name"] for t in m["model"]["outputs"]}:
        raise Invalid(f"model.roles.logits: {roles['logits']!r} is not an output of the model")
    if m["plans"]["forward"] and roles["logits"] not in values:
        raise Invalid(f"model.roles.logits: the logits {roles['logits']!r} are not described in plans.values")
    for role in ("tokens", "mask", "positions"):
        if roles[role] is not None and roles[role] not in inputs:
            raise Invalid(f"model.roles.{role}: {roles[role]!r} is not an input of the model")
    if m["model"]["tokenizer"] is not None and m["model"]["tokenizer"] not in files:
        raise Invalid(f"model.tokenizer: {m['model']['tokenizer']!r} is not a listed file")
    for name in m["model"]["index_bounds"]:
        if name not in inputs:
            raise Invalid(f"model.index_bounds[{name!r}]: not an input of the model")


def _paging_references(m: dict) -> None:
    """A paged cache: each cache a pool of blocks of page_tokens positions, with the block tables
    and lengths described as the kernels take them."""
    layout, values = m["model"]["kv_cache"]["layout"], m["plans"]["values"]
    page = layout["page_tokens"]
    if not page:
        return
    for name, ndim in ((KV_BLOCKS, 2), (KV_LENGTHS, 1)):
        if name not in values or values[name]["dtype"] != "int32" or len(values[name]["shape"]) != ndim:
            raise Invalid(f"plans.values[{name!r}]: a paged cache's kernels take it as int32 with {ndim} dims")
    seq_axis = 2 if layout["order"] == "bhsd" else 1
    for i, e in enumerate(m["model"]["kv_cache"]["entries"]):
        shape = values[e["past"]]["shape"]
        if len(shape) < 3 or shape[0] != [[1, ["blocks"]]] or shape[seq_axis] != page:
            raise Invalid(f"plans.values[{e['past']!r}]: a paged cache is [blocks, ...] with {page} positions "
                          f"on axis {seq_axis}, got {shape}")


def _gpu_references(kernels: dict, plan: list, files: dict) -> None:
    """The source is a listed file; a kernel's buffer arguments are positions the plan's calls of
    its function give, its scratch arguments intermediates the function lists."""
    if kernels["source"] not in files:
        raise Invalid(f"kernels.source: {kernels['source']!r} is not a listed file")
    given = {}
    for step in plan:
        given[step["kernel"]] = min(given.get(step["kernel"], len(step["args"])), len(step["args"]))
    for name, group in kernels["functions"].items():
        for i, k in enumerate(group["kernels"]):
            for j, a in enumerate(k["args"]):
                where = f"kernels.functions[{name!r}].kernels[{i}].args[{j}]"
                if type(a) is int and a >= given.get(name, 0):
                    raise Invalid(f"{where}: buffer {a}, but the plan's calls give {given.get(name, 0)}")
                if isinstance(a, dict) and a["scratch"] >= len(group["scratch"]):
                    raise Invalid(f"{where}: scratch {a['scratch']}, but the function lists {len(group['scratch'])}")


def _triton_references(kernels: dict, files: dict) -> None:
    """Every source and cubin is a listed file; a kernel's module is a listed source, its decode
    variant a kernel of the table, its cubins for the artifact's architectures."""
    modules = set()
    for i, path in enumerate(kernels["sources"]):
        if path not in files or not path.endswith(".py"):
            raise Invalid(f"kernels.sources[{i}]: {path!r} is not a listed Python file")
        modules.add(path.rsplit("/", 1)[-1][:-3])
    if kernels["argmax"] not in kernels["functions"]:
        raise Invalid(f"kernels.argmax: {kernels['argmax']!r} is not a kernel of kernels.functions")
    for name, k in kernels["functions"].items():
        where = f"kernels.functions[{name!r}]"
        if k["module"] not in modules:
            raise Invalid(f"{where}.module: {k['module']!r} is not one of kernels.sources")
        if k["decode"] and k["decode"]["kernel"] not in kernels["functions"]:
            raise Invalid(f"{where}.decode.kernel: {k['decode']['kernel']!r} is not a kernel of kernels.functions")
        if len(k["grid"]) != 3:
            raise Invalid(f"{where}.grid: expected three dims, got {len(k['grid'])}")
        for arch in kernels["archs"]:
            if arch not in k["binaries"]:
                raise Invalid(f"{where}.binaries: no cubin for {arch}")
        for arch, binary in k["binaries"].items():
            if binary["cubin"] not in files:
                raise Invalid(f"{where}.binaries[{arch!r}].cubin: {binary['cubin']!r} is not a listed file")
