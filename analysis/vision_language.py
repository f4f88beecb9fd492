"""PuMer on a vision-language model (ViLT, METER) for one question: answers with and without reduction, what was
pruned and merged per reduce layer, measured speed-up and memory, figures and records. Importable without Streamlit.

The models come from the registry and their PuMer forwards from the method table (``models.methods``): every
registry model whose family has a PuMer record is offered (``pumer_models``). What differs per family and is not
a model property (what a trace column counts, layer presets, the small random model, how to fetch the weights)
is the table ``FAMILY_VIEWS``."""
from __future__ import annotations

import html
import inspect
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image

from analysis.data.images import denormalize
from analysis.timing.harness import BenchSettings, Runner, benchmark
from models.methods import METHODS, Method, methods_for
from models.registry import FAMILY_LABELS, METER, METER_SIZE_NOTES, REGISTRY, VILT, ModelSpec, import_target
from models.vilt_pumer import ENTAILMENT_REDUCE_LAYERS, PuMerTrace, pumer_forward

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
    full_peak_mib: float | None  # CUDA only
    pumer_peak_mib: float | None
    memory_saving: float | None  # 1 - pumer / full peak memory; None off CUDA
    memory_note: str
    round_speedups: tuple[float, ...] = ()  # the ratio of each interleaved round; ``speedup`` is their median
    warmup: int = 0  # untimed forwards of each side before the rounds

    @property
    def spread(self) -> tuple[float, float]:
        """The lowest and highest per-round speed-up (both ``speedup`` with a single round)."""
        return (min(self.round_speedups), max(self.round_speedups)) if self.round_speedups else (self.speedup,) * 2


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


# ----------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class FamilyView:
    """What the page and the records need about one family beyond the registry and the method table."""

    label: str  # "ViLT"
    description: str  # the released model, one line
    layer_word: str  # what the forward's reduce layers count
    depth_attribute: str  # model.config attribute: how many of them
    presets: tuple[tuple[str, tuple[int, ...]], ...]  # besides the forward's default (the paper's)
    paper_preset: str  # the name of the forward's default
    summary: str  # where PuMer acts in this model (markdown)
    missing: str  # what is missing when loading fails: "The ... are"
    load: str  # "module:function(source=None, weights_dir=None) -> (model, processor)" through the resolver
    tiny: str  # "module:function(seed) -> (model, processor)": a small random model of the same structure
    tiny_description: str
    fetch: Callable[[ModelSpec, Path], str]  # what to put where, one sentence body


def _fetch_vilt(spec: ModelSpec, base: Path) -> str:
    target = base / spec.weight_file_stem
    return (f"Create the folder {target} (on a machine with internet: `hf download {spec.hf_repo} "
            f"--local-dir {target}`)")


def _fetch_meter(spec: ModelSpec, base: Path) -> str:
    from models.meter import METER_VQA_FILE, ROBERTA_FOLDER_NAME, ROBERTA_REPO

    tokenizer = base / ROBERTA_FOLDER_NAME
    return (f"Put {METER_VQA_FILE} ({spec.url}) in {base} and the tokenizer files of {ROBERTA_REPO} in the folder "
            f"{tokenizer} (`hf download {ROBERTA_REPO} vocab.json merges.txt --local-dir {tokenizer}`)")


FAMILY_VIEWS: dict[str, FamilyView] = {
    VILT: FamilyView(
        label="ViLT", description="ViLT-B/32 fine-tuned on VQAv2", layer_word="layer",
        depth_attribute="num_hidden_layers", paper_preset="VQA / NLVR2",
        presets=(("Visual entailment", ENTAILMENT_REDUCE_LAYERS),),
        summary="ViLT runs the question's tokens and the image patches through **one 12-layer encoder**; PuMer "
                "reduces inside a few of its layers, between attention and MLP.",
        missing="The ViLT-VQA weights are", load="models.vilt_pumer:load_vilt", tiny="models.vilt_pumer:tiny_vilt",
        tiny_description="small 10-layer ViLT", fetch=_fetch_vilt),
    METER: FamilyView(
        label="METER", description="METER-CLIP16-RoBERTa fine-tuned on VQAv2", layer_word="fusion block",
        depth_attribute="fusion_layers", paper_preset="VQA",
        presets=(("All", (0, 1, 2, 3, 4, 5)), ("Alternate", (0, 2, 4))),
        summary="METER encodes the question with **RoBERTa** and the image with **CLIP ViT-B/16**, then fuses "
                "them in **6 co-attention blocks**; PuMer reduces inside the fusion blocks, in each text block "
                "after its cross-attention to the image (the image block then sees the reduced streams).",
        missing="The METER-VQA checkpoint or the roberta-base tokenizer it reads is",
        load="models.meter:load_meter", tiny="models.meter:tiny_meter",
        tiny_description="small 3-fusion-block METER", fetch=_fetch_meter),
}


@dataclass(frozen=True)
class PuMerModel:
    """A registry model PuMer applies to, its PuMer record and its family's view."""

    spec: ModelSpec
    method: Method
    view: FamilyView

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.view.label

    @property
    def tiny_name(self) -> str:
        return f"{self.view.label.lower()}_tiny_random"

    @property
    def tiny_weights(self) -> str:
        return f"random ({self.view.tiny_description})"

    def paper_settings(self, **overrides) -> PuMerSettings:
        return PuMerSettings.paper(self.method, **overrides)

    def layer_presets(self) -> dict[str, tuple[int, ...]]:
        """Preset name -> reduce layers; the first is the forward's default (the paper's setting)."""
        word = self.view.layer_word
        presets = ((f"{self.view.paper_preset} (paper)", self.paper_settings().reduce_layers),) + self.view.presets
        return {f"{name}: {word}s {', '.join(map(str, layers))}": tuple(layers) for name, layers in presets}

    def depth(self, model: torch.nn.Module) -> int:
        """How many layers (fusion blocks) ``model`` has: the reduce layers it can use."""
        return int(getattr(model.config, self.view.depth_attribute))

    @property
    def image_sizes(self) -> tuple[int, ...]:
        """The input sizes the entry offers, its default first (METER: 576, 384, 288); empty: one size."""
        return self.spec.input_sizes

    def size_label(self, size: int) -> str:
        note = METER_SIZE_NOTES.get(size) if self.spec.family == METER else None
        return f"{size} px" + (f" ({note})" if note else "")

    def sized_name(self, size: int | None) -> str:
        """The provenance name: the registry name, with the input size where the entry offers several."""
        return f"{self.name} at {size or self.spec.input_size} px" if self.image_sizes else self.name

    def load(self, random_weights: bool, folder: str | None = None, user_file: str | None = None,
             image_size: int | None = None):
        """``(model, processor, provenance name, weights label)``: the small random model when asked, else the
        released weights through the one resolver, at ``image_size`` where the entry offers sizes. Raises
        WeightsNotFoundError or CheckpointError."""
        if random_weights:
            model, processor = import_target(self.view.tiny)(0)
            return model, processor, self.tiny_name, self.tiny_weights
        from analysis.provenance import weights_label
        from models.weights import resolve

        base = Path(folder).expanduser() if folder else None
        source = resolve(self.spec, user_file=user_file, folder=base)
        sized = {"image_size": image_size or self.spec.input_size} if self.image_sizes else {}
        model, processor = import_target(self.view.load)(source=user_file, weights_dir=base, **sized)
        return model, processor, self.sized_name(image_size), weights_label(source)

    def missing_message(self, folder: str | None = None) -> str:
        """Two sentences: what is missing, what to put where."""
        from models.weights import WEIGHTS_DIR_ENV, hub_offline

        base = folder or os.environ.get(WEIGHTS_DIR_ENV, "")
        base_path = Path(base).expanduser() if base else Path(f"${WEIGHTS_DIR_ENV}")
        offline = " and the hub is off (HF_HUB_OFFLINE)" if hub_offline() else ""
        return (f"{self.view.missing} not on this machine{offline}. "
                f"{self.view.fetch(self.spec, base_path)}, or tick **Use a small random {self.view.label}** above.")


def pumer_models() -> list[PuMerModel]:
    """Every registry model whose family has a PuMer record in the method table (and a view), registry order."""
    return [PuMerModel(spec, method, FAMILY_VIEWS[spec.family]) for spec in REGISTRY.values()
            for method in methods_for(spec) if method.label == PUMER and spec.family in FAMILY_VIEWS]


def _method_of(method: Method | str | None) -> Method:
    """A record of the table by key; None: the table's first PuMer record (ViLT's)."""
    if method is None:
        return next(m for m in METHODS.values() if m.label == PUMER)
    return METHODS[method] if isinstance(method, str) else method


def _view_of(method: Method) -> FamilyView | None:
    return next((FAMILY_VIEWS[f] for f in sorted(method.families) if f in FAMILY_VIEWS), None)


# ----------------------------------------------------------------------------------------------- compute
def top_answers(logits: torch.Tensor, id2label: Mapping[int, str], k: int = 5) -> list[tuple[str, float]]:
    """The k best answers of one sample with their sigmoid scores (ViLT-VQA is trained with a BCE loss)."""
    scores = logits.float().sigmoid()
    values, indices = scores.topk(min(k, scores.numel()))
    return [(str(id2label.get(int(i), i)), float(v)) for v, i in zip(values, indices)]


def batch_of(inputs: Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """The inputs as they are when ``batch`` matches, otherwise the first sample repeated ``batch`` times."""
    if next(iter(inputs.values())).shape[0] == batch:
        return dict(inputs)
    return {k: v[:1].expand(batch, *v.shape[1:]).contiguous() for k, v in inputs.items()}


def benchmark_pumer(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], iters: int, device: str,
                    settings: PuMerSettings = PuMerSettings(), rounds: int = 3, precision: str = "fp32",
                    method: Method | str | None = None) -> PuMerSpeed:
    """Throughput of the model with and without PuMer on ``inputs`` (already on ``device``), interleaved rounds.

    Both sides run the method's explicit forward (the baseline at the record's neutral arguments, which equals
    ``model(**inputs)``), so the ratio measures the token reduction alone. Peak memory is
    ``torch.cuda.max_memory_allocated`` on CUDA; elsewhere there is no allocator to ask and it is None."""
    method = _method_of(method)
    forward = method.forward_function()
    batch = next(iter(inputs.values())).shape[0]
    reduce = settings.forward_kwargs()
    full_name, pumer_name = "full", PUMER
    runners = [
        Runner(full_name, lambda x: forward(model, x, **method.neutral_arguments), lambda b: batch_of(inputs, b)),
        Runner(pumer_name, lambda x: forward(model, x, **reduce), lambda b: batch_of(inputs, b)),
    ]
    # Warmed (a cold first round once read 1.83x where the next read 0.65x), then interleaved rounds; the
    # speed-up is the median of the per-round ratios and the page shows their spread.
    bench = BenchSettings(batch=batch, iters=iters, rounds=rounds, warmup=max(2, iters), device=device,
                          precision=precision)
    full, pumer = benchmark(runners, bench, baseline=full_name)
    memory_saving = None
    if full.peak_mem_mib and pumer.peak_mem_mib is not None:
        memory_saving = 1.0 - pumer.peak_mem_mib / full.peak_mem_mib
    return PuMerSpeed(
        device=device, batch=batch, precision=precision, iters=iters, rounds=rounds,
        full_ms=full.ms_per_batch, pumer_ms=pumer.ms_per_batch,
        full_per_s=full.img_per_s, pumer_per_s=pumer.img_per_s, speedup=pumer.speedup,
        full_gflops=full.gflops, pumer_gflops=pumer.gflops,
        full_peak_mib=full.peak_mem_mib, pumer_peak_mib=pumer.peak_mem_mib, memory_saving=memory_saving,
        memory_note=("peak of torch.cuda.max_memory_allocated (weights included)" if memory_saving is not None
                     else f"n/a on {device}: peak memory is measured on CUDA only"),
        round_speedups=tuple(p / f for p, f in zip(pumer.rounds, full.rounds)), warmup=bench.warmup,
    )


def processed_image(pixel_values: torch.Tensor, pixel_mask: torch.Tensor, mean, std) -> Image.Image:
    """The first image as the model saw it: normalisation undone, padding cropped."""
    rows, cols = pixel_mask[0].bool().cpu().any(dim=1), pixel_mask[0].bool().cpu().any(dim=0)
    return denormalize(pixel_values[0, :, : int(rows.sum()), : int(cols.sum())], mean, std)


def display_tokens(tokenizer, ids: torch.Tensor) -> list[str]:
    """The tokens of ``ids`` as a reader wants them: byte-level BPE's space marker (RoBERTa's 'Ġ') removed and
    bytes decoded; WordPiece keeps its '##'; a token that would become empty keeps its raw form."""
    shown = []
    for token in tokenizer.convert_ids_to_tokens(ids.tolist()):
        text = tokenizer.convert_tokens_to_string([token]).strip()
        shown.append(text or token)
    return shown


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


def image_cls_fates(trace: PuMerTrace, sample: int = 0) -> list[str]:
    """Per reduce step, where the image CLS is after it: 'first' (its own token at the front of the image
    tokens), 'position k', 'merged at k' (its token holds patches too) or 'pruned'."""
    fates = []
    for step in trace.steps:
        position = int(step.image_cls[sample])
        first = int(trace.text_counts[sample, step.layer + 1])
        if position < 0:
            fates.append("pruned")
        elif (step.image_groups[sample] == position).any():
            fates.append(f"merged at {position - first}")
        else:
            fates.append("first" if position == first else f"position {position - first}")
    return fates


def _kept_cells(trace: PuMerTrace, sample: int = 0) -> set[int]:
    if not trace.steps:
        return set(range(trace.grid_shape[0] * trace.grid_shape[1]))
    return set(np.flatnonzero(trace.steps[-1].image_groups[sample] >= 0).tolist())


def correction_effects(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], settings: PuMerSettings,
                       method: Method, logits: torch.Tensor, trace: PuMerTrace) -> list[CorrectionEffect]:
    """Each correction setting of ``method`` flipped on its own (a switch toggled, a choice changed to the other
    value), on the same inputs; ``logits`` / ``trace`` are the run with ``settings`` as they are."""
    forward, labels = method.forward_function(), model.config.id2label
    effects = []
    for setting in (s for s in method.settings if s.argument in CORRECTION_ARGUMENTS):
        current = getattr(settings, setting.argument)
        if current is None:
            continue
        value = (not current) if isinstance(current, bool) else next(c for c in setting.choices if c != current)
        flipped = PuMerSettings(**{**asdict(settings), setting.argument: value})
        with torch.inference_mode():
            other_logits, other = forward(model, inputs, **flipped.forward_kwargs(), return_trace=True)
        effects.append(CorrectionEffect(
            argument=setting.argument, label=setting.label, help=setting.help, value=value,
            answers=top_answers(other_logits[0], labels),
            max_logit_change=float((other_logits[0] - logits[0]).abs().max()),
            image_cls=image_cls_fates(other), image_tokens_out=int(other.image_counts[0, -1]),
            cells_kept_differently=len(_kept_cells(other) ^ _kept_cells(trace))))
    return effects


def answer_question(model: torch.nn.Module, processor, image: Image.Image, question: str,
                    settings: PuMerSettings | None = None, method: Method | str | None = None) -> PuMerResult:
    """Answer ``question`` about ``image`` with the full model and with PuMer, trace the reduction and time both
    on the model's device. ``method``: the PuMer record of the method table that applies to the model ("pumer"
    for ViLT, "pumer-meter" for METER); ``settings`` default to its paper setting. The model is only read."""
    method = _method_of(method)
    settings = settings if settings is not None else PuMerSettings.paper(method)
    forward = method.forward_function()
    view = _view_of(method)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in processor(images=image.convert("RGB"), text=question,
                                                     return_tensors="pt").items()}
    with torch.inference_mode():
        full_logits = forward(model, inputs, **method.neutral_arguments)
        pumer_logits, trace = forward(model, inputs, **settings.forward_kwargs(), return_trace=True)
    corrections = correction_effects(model, inputs, settings, method, pumer_logits, trace)
    speed = benchmark_pumer(model, inputs, settings.timing_iters, str(device), settings, settings.timing_rounds,
                            method=method)
    image_processor = processor.image_processor
    labels = model.config.id2label
    return PuMerResult(
        question=question,
        text_tokens=display_tokens(processor.tokenizer, inputs["input_ids"][0][inputs["attention_mask"][0].bool()]),
        image=processed_image(inputs["pixel_values"], inputs["pixel_mask"], image_processor.image_mean,
                              image_processor.image_std),
        patch_size=int(model.config.patch_size),
        full_answers=top_answers(full_logits[0], labels), pumer_answers=top_answers(pumer_logits[0], labels),
        trace=trace, speed=speed, settings=settings,
        model_label=view.label if view else FAMILY_LABELS.get(next(iter(method.families)), "model"),
        layer_word=view.layer_word if view else "layer", corrections=corrections,
        input_shape=tuple(int(v) for v in inputs["pixel_values"].shape[-2:]),
    )


def numbered_answers(model: torch.nn.Module) -> bool:
    """True when the answer head has no answer names (METER without an answer list): answers read 'answer #i'."""
    labels = list(model.config.id2label.values())
    return bool(labels) and all(str(v).startswith("answer #") for v in labels)


# ----------------------------------------------------------------------------------------------- tables and records
def _column(layer_word: str) -> str:
    return layer_word.replace(" ", "_")


def counts_frame(trace: PuMerTrace, sample: int = 0, layer_word: str = "layer"):
    """Tokens entering each layer (fusion block) per modality (image CLS counted), and what leaves the last.
    The first column is named by ``layer_word``."""
    import pandas as pd

    layers = trace.text_counts.shape[1] - 1
    reduce_layers = {s.layer for s in trace.steps}
    return pd.DataFrame({
        _column(layer_word): [str(i) for i in range(layers)] + ["output"],
        "text_tokens": trace.text_counts[sample], "image_tokens": trace.image_counts[sample],
        "total_tokens": trace.text_counts[sample] + trace.image_counts[sample],
        "reduces_here": [i in reduce_layers for i in range(layers)] + [False],
    })


def steps_frame(trace: PuMerTrace, sample: int = 0, layer_word: str = "layer"):
    """One row per reduce layer: what came in, what was pruned and merged, which grid cells were pruned."""
    import pandas as pd

    return pd.DataFrame([{
        _column(layer_word): s.layer,
        "image_tokens_in": int(trace.image_counts[sample, s.layer]),
        "image_pruned": int(s.image_pruned[sample]), "image_merged": int(s.image_merged[sample]),
        "text_tokens_in": int(trace.text_counts[sample, s.layer]), "text_merged": int(s.text_merged[sample]),
        "pruned_cells": " ".join(map(str, s.pruned_cells[sample].tolist())),
    } for s in trace.steps])


def answers_frame(result: PuMerResult):
    import pandas as pd

    full, pumer = result.full_name, result.pumer_name
    return pd.DataFrame([{"rank": i + 1, f"{full} answer": fa, f"{full} score": round(fs, 4),
                          f"{pumer} answer": pa, f"{pumer} score": round(ps, 4)}
                         for i, ((fa, fs), (pa, ps)) in enumerate(zip(result.full_answers, result.pumer_answers))])


def corrections_frame(result: PuMerResult):
    """The run as set and each correction flipped: top answer, logit change, where the image CLS went at each
    reduce step, image tokens out, grid cells kept differently."""
    import pandas as pd

    def row(what, value, answers, change, fates, tokens_out, cells):
        answer, score = answers[0]
        return {"run": what, "value": str(value), "top answer": answer, "score": round(score, 4),
                "max |logit change|": round(change, 4),
                f"image CLS after each reduce {result.layer_word}": ", ".join(fates) or "-",
                "image tokens out": tokens_out, "cells kept differently": cells}

    rows = [row("as set", "", result.pumer_answers, 0.0, image_cls_fates(result.trace),
                int(result.trace.image_counts[0, -1]), 0)]
    rows += [row(e.label, e.value, e.answers, e.max_logit_change, e.image_cls, e.image_tokens_out,
                 e.cells_kept_differently) for e in result.corrections]
    return pd.DataFrame(rows)


def _finite_or_none(values: np.ndarray) -> list:
    return [None if not math.isfinite(v) else round(float(v), 6) for v in values]


def records_to_json(result: PuMerResult, sample: int = 0) -> dict:
    """Everything the page shows, as plain JSON types."""
    trace, column = result.trace, _column(result.layer_word)
    return {
        "question": result.question, "text_tokens": result.text_tokens, "layers_are": result.layer_word + "s",
        "input_pixels": list(result.input_shape),
        "settings": asdict(result.settings), "grid_shape": list(trace.grid_shape), "patch_size": result.patch_size,
        "answers": {"full": result.full_answers, "reduced": result.pumer_answers}, "method": PUMER,
        "speed": asdict(result.speed),
        "corrections": [asdict(e) for e in result.corrections],
        "image_cls": image_cls_fates(trace, sample),
        "tokens_per_layer": counts_frame(trace, sample, result.layer_word).to_dict(orient="records"),
        "reduce_steps": [{
            column: s.layer,
            "image_pruned": int(s.image_pruned[sample]), "image_merged": int(s.image_merged[sample]),
            "text_merged": int(s.text_merged[sample]),
            "pruned_cells": s.pruned_cells[sample].tolist(),
            "image_groups": s.image_groups[sample].tolist(),
            "text_groups": s.text_groups[sample][: len(result.text_tokens)].tolist(),
            "patch_scores": _finite_or_none(s.patch_scores[sample]),
        } for s in trace.steps],
    }


# ----------------------------------------------------------------------------------------------- figures
def _palette() -> list[tuple[int, int, int]]:
    import plotly.colors

    return [tuple(int(c) for c in plotly.colors.hex_to_rgb(h)) for h in plotly.colors.qualitative.Alphabet]


def _cell_boxes(grid_shape: tuple[int, int], patch_size: int):
    grid_w = grid_shape[1]
    for cell in range(grid_shape[0] * grid_w):
        row, col = divmod(cell, grid_w)
        yield cell, (col * patch_size, row * patch_size, (col + 1) * patch_size, (row + 1) * patch_size)


def _paint(image: Image.Image, colours: dict[int, tuple[tuple[int, int, int], float]],
           grid_shape: tuple[int, int], patch_size: int) -> Image.Image:
    """Blend each listed grid cell with its (colour, opacity)."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for cell, (x0, y0, x1, y1) in _cell_boxes(grid_shape, patch_size):
        if cell in colours:
            colour, alpha = colours[cell]
            canvas[y0:y1, x0:x1] = (1 - alpha) * canvas[y0:y1, x0:x1] + alpha * np.asarray(colour, np.float32)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def pruned_overlay(result: PuMerResult, step_index: int, sample: int = 0) -> Image.Image:
    """The image with the patches pruned at this reduce layer faded toward red and those gone earlier faded
    toward white."""
    step, trace = result.trace.steps[step_index], result.trace
    colours = {int(c): ((255, 255, 255), 0.8) for c in np.flatnonzero(step.image_groups[sample] < 0)}
    colours.update({int(c): ((220, 40, 40), 0.6) for c in step.pruned_cells[sample]})
    return _paint(result.image, colours, trace.grid_shape, result.patch_size)


def merge_overlay(result: PuMerResult, step_index: int, sample: int = 0) -> Image.Image:
    """The image after this reduce layer: patches sharing a token have one colour; patches still alone are
    left as they are; patches without a token are faded toward white."""
    groups = result.trace.steps[step_index].image_groups[sample]
    ids, sizes = np.unique(groups[groups >= 0], return_counts=True)
    palette = _palette()
    merged = {int(g): palette[i % len(palette)] for i, g in enumerate(ids[sizes > 1])}
    colours = {}
    for cell, group in enumerate(groups.tolist()):
        if group < 0:
            colours[cell] = ((255, 255, 255), 0.8)
        elif group in merged:
            colours[cell] = (merged[group], 0.55)
    return _paint(result.image, colours, result.trace.grid_shape, result.patch_size)


def text_groups_html(result: PuMerResult, step_index: int, sample: int = 0) -> str:
    """The question's tokens as HTML; tokens merged into one token share a colour and a group number."""
    groups = result.trace.steps[step_index].text_groups[sample][: len(result.text_tokens)]
    ids, sizes = np.unique(groups, return_counts=True)
    palette = _palette()
    colour_of = {int(g): palette[i % len(palette)] for i, g in enumerate(ids[sizes > 1])}
    spans = []
    for token, group in zip(result.text_tokens, groups.tolist()):
        style = "padding:2px 5px;margin:2px;border-radius:4px;display:inline-block;border:1px solid #bbb;"
        if group in colour_of:
            r, g, b = colour_of[group]
            style += f"background:rgba({r},{g},{b},0.45);"
        spans.append(f'<span style="{style}">{html.escape(token)}<sub>{group}</sub></span>')
    return "<div style='line-height:2.2'>" + "".join(spans) + "</div>"


def tokens(count: int, what: str = "token") -> str:
    """'1 image token', '3 image tokens'."""
    return f"{count} {what}{'' if count == 1 else 's'}"


def token_counts_figure(trace: PuMerTrace, subtitle: str = "", sample: int = 0, layer_word: str = "layer"):
    """Tokens per layer (fusion block: ``layer_word``) for each modality, with PuMer (solid) and without
    (dashed); reduce layers marked. ``subtitle`` (model, weights, image) goes under the title."""
    import plotly.graph_objects as go

    frame = counts_frame(trace, sample, layer_word)
    x = frame[_column(layer_word)]
    figure = go.Figure()
    for column, colour in (("text_tokens", "#1f77b4"), ("image_tokens", "#d62728"), ("total_tokens", "#444")):
        name = column.replace("_", " ")
        figure.add_scatter(x=x, y=frame[column], mode="lines+markers", name=f"{name} (PuMer)",
                           line=dict(color=colour, shape="hv"))
        figure.add_scatter(x=x, y=[frame[column].iloc[0]] * len(frame), mode="lines",
                           name=f"{name} (full)", line=dict(color=colour, dash="dash"), opacity=0.5)
    for step in trace.steps:
        figure.add_vline(x=str(step.layer), line=dict(color="#999", dash="dot"))
    title = (f"Tokens entering each {layer_word} (dotted: where PuMer reduces; the MLP there already sees "
             "the reduced count)")
    figure.update_layout(xaxis_title=layer_word, yaxis_title="tokens", xaxis_type="category",
                         title=title + (f"<br><sup>{subtitle}</sup>" if subtitle else ""),
                         legend=dict(orientation="h", y=-0.25), margin=dict(t=70, b=10))
    return figure


def for_display(picture: Image.Image, min_side: int = 320) -> Image.Image:
    """``picture`` enlarged by a whole factor (nearest neighbour, patches stay sharp) until its longer side is
    at least ``min_side``: a small random model's 64-px input stays readable."""
    factor = max(1, math.ceil(min_side / max(picture.size)))
    return picture if factor == 1 else picture.resize((picture.width * factor, picture.height * factor),
                                                      Image.NEAREST)
