"""PuMer's settings and what one question's run gives back: ``PuMerSettings``, ``PuMerSpeed``, ``PuMerResult``,
``CorrectionEffect``, ``PuMerProtocol``."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from analysis.timing.harness import ThroughputRow
from models.methods import METHODS, Method
from models.vilt_pumer import PuMerTrace, pumer_forward

PUMER = "PuMer"  # the label of PuMer's records in the method table
_SETTING_ARGUMENTS = ("reduce_layers", "prune_ratio", "image_merge_ratio", "text_merge_ratio",
                      "proportional_attention", "protect_image_cls", "size_weighted", "image_context")
# Settings of the PuMer records that change one of PuMer's code's choices (see each Setting's help line).
CORRECTION_ARGUMENTS = ("protect_image_cls", "size_weighted", "image_context")


def forward_defaults(forward: Callable) -> dict[str, Any]:
    """The PuMer arguments' defaults of a forward's signature (its paper setting)."""
    parameters = inspect.signature(forward).parameters
    return {name: parameters[name].default for name in _SETTING_ARGUMENTS
            if name in parameters and parameters[name].default is not inspect.Parameter.empty}


_VILT_DEFAULTS = forward_defaults(pumer_forward)


@dataclass(frozen=True)
class PuMerSettings:
    """PuMer's knobs and how long to time them. Field defaults are ``pumer_forward``'s (ViLT, the paper's VQA
    setting); ``PuMerSettings.paper(method)`` gives another forward's."""

    reduce_layers: tuple[int, ...] = tuple(_VILT_DEFAULTS["reduce_layers"])
    prune_ratio: float = _VILT_DEFAULTS["prune_ratio"]
    image_merge_ratio: float = _VILT_DEFAULTS["image_merge_ratio"]
    text_merge_ratio: float = _VILT_DEFAULTS["text_merge_ratio"]
    proportional_attention: bool = _VILT_DEFAULTS["proportional_attention"]
    protect_image_cls: bool = _VILT_DEFAULTS["protect_image_cls"]
    size_weighted: bool = _VILT_DEFAULTS["size_weighted"]
    image_context: str | None = None  # METER only: "text_output" (PuMer's code) or "block_input" (METER's)
    timing_iters: int = 2
    timing_rounds: int = 5

    @classmethod
    def paper(cls, method: Method | str, **overrides) -> "PuMerSettings":
        """The method's paper setting: its forward's defaults, then the record's ``paper_arguments``."""
        method = METHODS[method] if isinstance(method, str) else method
        values = {**forward_defaults(method.forward_function()), **method.paper_arguments, **overrides}
        values["reduce_layers"] = tuple(values["reduce_layers"])
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

    def forward_kwargs(self) -> dict:
        kwargs = dict(reduce_layers=tuple(self.reduce_layers), prune_ratio=self.prune_ratio,
                      image_merge_ratio=self.image_merge_ratio, text_merge_ratio=self.text_merge_ratio,
                      proportional_attention=self.proportional_attention, protect_image_cls=self.protect_image_cls,
                      size_weighted=self.size_weighted)
        return kwargs if self.image_context is None else {**kwargs, "image_context": self.image_context}


@dataclass(frozen=True)
class PuMerSpeed:
    """Interleaved timing of the model with and without PuMer (``benchmark_pumer``)."""

    device: str
    batch: int
    precision: str
    iters: int
    rounds: int
    full_ms: float  # per batch
    pumer_ms: float
    full_per_s: float  # samples per second
    pumer_per_s: float
    speedup: float
    full_gflops: float | None
    pumer_gflops: float | None
    full_peak_mib: float | None  # one forward's peak, net of weights and inputs (CPU and CUDA; None on MPS)
    pumer_peak_mib: float | None
    memory_saving: float | None  # 1 - pumer / full peak memory (the paper's "memory reduction")
    memory_note: str
    round_speedups: tuple[float, ...] = ()  # the ratio of each interleaved round; ``speedup`` is their median
    warmup: int = 0  # untimed forwards of each side before the rounds
    # The same peaks with autograd on (every layer's activations kept for a backward: training, or a forward
    # outside no_grad), where the tokens PuMer removes count in every later layer; None where not measured.
    full_kept_mib: float | None = None
    pumer_kept_mib: float | None = None
    kept_saving: float | None = None

    @property
    def spread(self) -> tuple[float, float]:
        """The lowest and highest per-round speed-up (both ``speedup`` with a single round)."""
        return (min(self.round_speedups), max(self.round_speedups)) if self.round_speedups else (self.speedup,) * 2


@dataclass(frozen=True)
class PuMerProtocol:
    """PuMer's throughput protocol on one question (``paper_protocol``): the batch grown from ``start`` in steps of
    ``step`` until out of memory or ``time_limit`` seconds, and both sides at the batch where the full model was
    fastest (``speed``; None when not even one batch could run)."""

    start: int
    step: int
    time_limit: float
    best_batch: int | None
    speed: PuMerSpeed | None
    rows: tuple[ThroughputRow, ...]  # every batch, both sides (analysis.timing.harness rows)
    notes: tuple[str, ...]  # what was left out, backed off or stopped, in words
    measured_at: str = ""  # when it started (local time, ISO 8601)
    load_average: float | None = None  # the 1-minute load average when it started (None where unknown)


@dataclass
class PuMerResult:
    question: str
    text_tokens: list[str]  # the input tokens as shown (RoBERTa's space marker removed), padding excluded
    image: Image.Image  # what the model saw: resized, normalisation undone
    patch_size: int
    full_answers: list[tuple[str, float]]  # top-5 (answer, sigmoid score)
    pumer_answers: list[tuple[str, float]]
    trace: PuMerTrace
    speed: PuMerSpeed
    settings: PuMerSettings = field(default_factory=PuMerSettings)
    model_label: str = "ViLT"  # names the two answer columns: ViLT / ViLT+PuMer
    layer_word: str = "layer"  # what a trace column counts: an encoder layer (ViLT), a fusion block (METER)
    corrections: list["CorrectionEffect"] = field(default_factory=list)  # each correction flipped, same question
    input_shape: tuple[int, int] = (0, 0)  # (height, width) in pixels of what the model saw

    @property
    def full_name(self) -> str:
        return self.model_label

    @property
    def pumer_name(self) -> str:
        return f"{self.model_label}+{PUMER}"


@dataclass(frozen=True)
class CorrectionEffect:
    """What flipping one correction setting changes for one question (the rest of the settings kept)."""

    argument: str  # the forward argument, e.g. "protect_image_cls"
    label: str
    help: str  # the method record's one-line explanation
    value: Any  # the setting's value in this run
    answers: list[tuple[str, float]]  # top-5 with it
    max_logit_change: float  # largest |logit| change against the run without the flip
    image_cls: list[str]  # per reduce step, where the image CLS is after it (``image_cls_fates``)
    image_tokens_out: int  # image tokens leaving the last layer
    cells_kept_differently: int  # grid cells held by some token at the end in one run and pruned in the other
