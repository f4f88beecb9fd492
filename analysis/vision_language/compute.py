"""Running PuMer on one question: answers with and without reduction, each correction flipped, the speed-up and
memory timed in interleaved rounds."""
from __future__ import annotations

from dataclasses import asdict
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from analysis.data.images import denormalize
from analysis.timing.harness import BenchSettings, Runner, benchmark
from analysis.vision_language.models import _method_of, _view_of
from analysis.vision_language.records import (CORRECTION_ARGUMENTS, PUMER, CorrectionEffect, PuMerResult,
                                              PuMerSettings, PuMerSpeed)
from models.methods import Method
from models.registry import FAMILY_LABELS
from models.vilt_pumer import PuMerTrace


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
