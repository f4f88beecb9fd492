"""Running PuMer on one question: answers with and without reduction, each correction flipped, the speed-up and
memory timed in interleaved rounds."""
from __future__ import annotations

import datetime
import os
from dataclasses import asdict, replace
from typing import Callable, Mapping

import numpy as np
import torch
from PIL import Image

from analysis.data.images import denormalize
from analysis.timing.harness import BenchSettings, Runner, ThroughputRow, benchmark, best_batch, growing_sweep
from analysis.timing.memory import PEAK_MEMORY_METHODS, kept_activations_peak_bytes, memory_reduction
from analysis.vision_language.models import _method_of, _view_of
from analysis.vision_language.records import (CORRECTION_ARGUMENTS, PUMER, CorrectionEffect, PuMerProtocol,
                                              PuMerResult, PuMerSettings, PuMerSpeed)
from models.methods import Method
from models.registry import FAMILY_LABELS, batch_growth
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
    ``model(**inputs)``), so the ratio measures the token reduction alone. Peak memory is that of one forward of
    each at the same batch, net of the weights and inputs (``analysis.timing.memory.forward_peak_bytes``: the CPU
    allocator's live bytes through ``torch.profiler``, ``torch.cuda.max_memory_allocated`` on CUDA; None on MPS), and
    again with autograd on (``kept_activations_peak_bytes``: every layer's activations kept, as in training)."""
    batch = next(iter(inputs.values())).shape[0]
    runners = _runners(model, inputs, settings, _method_of(method))
    # Warmed (a cold first round once read 1.83x where the next read 0.65x), then interleaved rounds; the
    # speed-up is the median of the per-round ratios and the page shows their spread.
    bench = BenchSettings(batch=batch, iters=iters, rounds=rounds, warmup=max(2, iters), device=device,
                          precision=precision, peak_memory=True)
    full, pumer = benchmark(runners, bench, baseline=FULL)
    kept = [kept_activations_peak_bytes(r.forward, r.make_inputs(batch), device) for r in runners]
    return _speed(full, pumer, bench, tuple(None if k is None else k / 2**20 for k in kept))


FULL = "full"  # the unreduced side's runner


def _runners(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], settings: PuMerSettings,
             method: Method) -> list[Runner]:
    """The full model (the method's forward at its neutral arguments) and PuMer at ``settings``, over ``inputs``'s
    first sample repeated to each batch."""
    forward, reduce = method.forward_function(), settings.forward_kwargs()
    return [Runner(FULL, lambda x: forward(model, x, **method.neutral_arguments), lambda b: batch_of(inputs, b)),
            Runner(PUMER, lambda x: forward(model, x, **reduce), lambda b: batch_of(inputs, b))]


def paper_protocol(model: torch.nn.Module, processor, image: Image.Image, question: str,
                   settings: PuMerSettings, method: Method | str | None = None, family: str | None = None,
                   time_limit: float = 120.0, progress: Callable[[float, str], None] | None = None) -> PuMerProtocol:
    """PuMer's throughput protocol on this question: the batch grows from the family's start in its steps
    (``models.registry.batch_growth``: ViLT 32, METER 16, steps of 8) until out of memory or ``time_limit`` seconds
    (``analysis.timing.harness.growing_sweep``, its out-of-memory back-off included), every batch timed with and
    without PuMer in ``settings``' interleaved rounds and its peak memory measured; the full model's fastest batch
    is reported for both. ``family``: the model's registry family (default: the method's)."""
    method = _method_of(method)
    growth = batch_growth(family or sorted(method.families)[0])
    if growth is None:
        raise ValueError(f"The paper gives no batch protocol for {family or sorted(method.families)[0]}.")
    bench = BenchSettings(batch=growth[0], iters=settings.timing_iters, rounds=settings.timing_rounds,
                          warmup=max(2, settings.timing_iters), device=str(next(model.parameters()).device),
                          peak_memory=True)
    runners = _runners(model, _inputs(model, processor, image, question), settings, method)
    when, load = datetime.datetime.now().isoformat(timespec="seconds"), _load_average()
    rows, notes = growing_sweep(runners, bench, *growth, time_limit=time_limit, baseline=FULL, progress=progress)
    best = best_batch(rows, FULL)
    at_best = {r.model: r for r in rows if r.batch == best}
    speed = _speed(at_best[FULL], at_best[PUMER], replace(bench, batch=best)) if best is not None else None
    return PuMerProtocol(start=growth[0], step=growth[1], time_limit=time_limit, best_batch=best, speed=speed,
                         rows=tuple(rows), notes=tuple(notes), measured_at=when, load_average=load)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every system
        return None


def _speed(full: ThroughputRow, pumer: ThroughputRow, bench: BenchSettings,
           kept: tuple[float | None, float | None] = (None, None)) -> PuMerSpeed:
    """The record of one interleaved timing of the full model and PuMer at one batch (``kept``: their peaks in MiB
    with autograd on, where measured)."""
    device, memory_saving = bench.device, pumer.memory_reduction
    method = PEAK_MEMORY_METHODS.get(torch.device(device).type)
    return PuMerSpeed(
        device=device, batch=bench.batch, precision=bench.precision, iters=bench.iters, rounds=bench.rounds,
        full_ms=full.ms_per_batch, pumer_ms=pumer.ms_per_batch,
        full_per_s=full.img_per_s, pumer_per_s=pumer.img_per_s, speedup=pumer.speedup,
        full_gflops=full.gflops, pumer_gflops=pumer.gflops,
        full_peak_mib=full.forward_peak_mib, pumer_peak_mib=pumer.forward_peak_mib, memory_saving=memory_saving,
        memory_note=(f"peak of one forward at batch {bench.batch}: {method}" if memory_saving is not None
                     else f"n/a on {device}: no allocator to ask for its peak there"),
        round_speedups=tuple(p / f for p, f in zip(pumer.rounds, full.rounds)), warmup=bench.warmup,
        full_kept_mib=kept[0], pumer_kept_mib=kept[1], kept_saving=memory_reduction(*kept),
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
    inputs = _inputs(model, processor, image, question)
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


def _inputs(model: torch.nn.Module, processor, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
    """The processor's inputs for one question, on the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in processor(images=image.convert("RGB"), text=question,
                                                   return_tensors="pt").items()}


def numbered_answers(model: torch.nn.Module) -> bool:
    """True when the answer head has no answer names (METER without an answer list): answers read 'answer #i'."""
    labels = list(model.config.id2label.values())
    return bool(labels) and all(str(v).startswith("answer #") for v in labels)
