"""What a compile is asked for: one frozen `CompileOptions` (the weights' encoding in a
`QuantSpec`), built by every way in (the CLI, `llmc.compile`, `llmc package`, `llmc tune`, the
torch.compile backend) and read by the passes and the backend.

The options that mean the same on every target are checked here, when they are made. What a
target picks by default (`dtype`, `kv_cache`, `activations`, `cpu`, `arch`; None until then) and
which values it can honor are its backend's: `CompileOptions.resolved()` asks it
(`llmc.backends.Backend.resolve`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import LlmcError
from .ops.transformer import QUANT_SCHEMES  # int8 per output channel; 4 bits in groups

GROUP_SIZES = (32, 64, 128)
LM_HEADS = ("f32", *QUANT_SCHEMES)
EMBEDDINGS = ("f32", "w8")


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization: `scheme` for the GEMMs, `lm_head` and `embedding` for the two
    tables at the model's ends; with `awq`, 4-bit weights are scaled by their activations first,
    measured on the token ids `calibration` or on the text file `calibration_text` (the driver
    turns it into ids), by default on the English sample llmc ships."""

    scheme: str
    group_size: int = 128
    zero_point: bool = False
    lm_head: str = "w8"
    embedding: str = "w8"
    awq: bool = False
    calibration: tuple[int, ...] | None = None
    calibration_text: str | None = None

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise LlmcError(f"quantization {self.scheme!r} is not supported; supported: {', '.join(QUANT_SCHEMES)}")
        if self.group_size not in GROUP_SIZES:
            raise LlmcError(f"group size {self.group_size} is not supported; supported: "
                            f"{', '.join(map(str, GROUP_SIZES))}")
        if self.lm_head not in LM_HEADS:
            raise LlmcError(f"LM head encoding {self.lm_head!r} is not supported; supported: {', '.join(LM_HEADS)}")
        if self.embedding not in EMBEDDINGS:
            raise LlmcError(f"embedding encoding {self.embedding!r} is not supported; supported: "
                            f"{', '.join(EMBEDDINGS)}")
        if self.awq and self.scheme != "w4":
            raise LlmcError("--awq, --calibration-ids and --calibration-text apply to --quant w4")
        if (self.calibration or self.calibration_text) and not self.awq:
            raise LlmcError("--calibration-ids and --calibration-text calibrate --awq: add it")
        if self.calibration and self.calibration_text:
            raise LlmcError("give --calibration-ids or --calibration-text, not both")


@dataclass(frozen=True)
class CompileOptions:
    """One compile's options; see `llmc.compile` for what each means. `max_seq_len` None leaves
    the graph's lengths symbolic (the torch.compile backend's subgraphs)."""

    target: str = "cpu"
    max_seq_len: int | None = 1024
    eos_token_id: int | None = None
    tokenizer: str | None = None
    quant: QuantSpec | None = None
    dtype: str | None = None
    activations: str | None = None
    kv_cache: str | None = None
    kv_layout: str = "auto"
    cpu: str | None = None
    arch: str | None = None
    tune: bool = False
    tune_budget: float | None = None
    tuning: tuple[str, ...] = field(default=())

    def __post_init__(self):
        from . import backends
        from .backends.cache_layout import check_kv_layout

        if self.target not in backends.BACKENDS:
            raise LlmcError(f"target {self.target!r} is not supported yet; supported: {', '.join(backends.BACKENDS)}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise LlmcError(f"--max-seq-len {self.max_seq_len}: the context must be at least one token")
        check_kv_layout(self.kv_layout)
        if self.tune_budget is not None and self.tune_budget <= 0:
            raise LlmcError(f"--tune-budget {self.tune_budget}: the budget must be a positive number of seconds")

    @classmethod
    def of(cls, quant: str | None = None, group_size: int = 128, zero_point: bool = False, lm_head: str | None = None,
           embedding: str | None = None, awq: bool = False, calibration=None, calibration_text=None,
           tuning=(), **options) -> CompileOptions:
        """From flat keywords, as `llmc.compile` and the CLI take them (`quant="w4",
        group_size=32, ...`); the quantization keywords other than `quant` apply only with it."""
        if quant is None:
            if awq or calibration or calibration_text:
                raise LlmcError("--awq, --calibration-ids and --calibration-text apply to --quant w4")
            if lm_head or zero_point or embedding not in (None, "f32"):
                raise LlmcError("--lm-head, --embedding and --zero-point apply with --quant")
            spec = None
        else:
            spec = QuantSpec(quant, group_size, zero_point, lm_head or "w8", embedding or "w8", awq,
                             tuple(calibration) if calibration else None,
                             str(calibration_text) if calibration_text else None)
        return cls(quant=spec, tuning=tuple(str(t) for t in tuning), **options)

    def backend(self):
        from . import backends

        return backends.for_target(self.target)

    def resolved(self) -> CompileOptions:
        """These options with the target's defaults filled in, refused (LlmcError) where the
        target cannot honor them."""
        return self.backend().resolve(self)

    def with_quant(self, **changes) -> CompileOptions:
        return replace(self, quant=replace(self.quant, **changes))
