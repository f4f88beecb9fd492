"""PuMer on ViLT for one question: answers with and without reduction, what was pruned and merged per layer,
measured speed-up and memory, figures and records. Importable without Streamlit."""
from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from analysis.data.images import denormalize
from analysis.throughput import BenchSettings, Runner, benchmark
from models.vilt_pumer import DEFAULT_REDUCE_LAYERS, PuMerTrace, pumer_forward

FULL_NAME, PUMER_NAME = "ViLT", "ViLT+PuMer"
NO_REDUCTION = dict(prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0)


@dataclass(frozen=True)
class PuMerSettings:
    """PuMer's knobs (defaults: the paper's VQA setting) and how long to time them."""

    reduce_layers: tuple[int, ...] = DEFAULT_REDUCE_LAYERS
    prune_ratio: float = 0.1
    image_merge_ratio: float = 0.3
    text_merge_ratio: float = 0.2
    proportional_attention: bool = False
    timing_iters: int = 3
    timing_rounds: int = 3

    def forward_kwargs(self) -> dict:
        return dict(reduce_layers=tuple(self.reduce_layers), prune_ratio=self.prune_ratio,
                    image_merge_ratio=self.image_merge_ratio, text_merge_ratio=self.text_merge_ratio,
                    proportional_attention=self.proportional_attention)


@dataclass
class PuMerResult:
    question: str
    text_tokens: list[str]  # the input tokens, padding excluded
    image: Image.Image  # what the model saw: resized, normalisation undone
    patch_size: int
    full_answers: list[tuple[str, float]]  # top-5 (answer, sigmoid score)
    pumer_answers: list[tuple[str, float]]
    trace: PuMerTrace
    speed: dict  # benchmark_pumer's record
    settings: PuMerSettings = field(default_factory=PuMerSettings)


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
                    settings: PuMerSettings = PuMerSettings(), rounds: int = 3, precision: str = "fp32") -> dict:
    """Throughput of ViLT with and without PuMer on ``inputs`` (already on ``device``), interleaved rounds.

    Both sides run the same explicit forward (the baseline with every ratio at 0, which equals
    ``model(**inputs)``), so the ratio measures the token reduction alone. Peak memory is
    ``torch.cuda.max_memory_allocated`` on CUDA; elsewhere there is no allocator to ask and it is None."""
    batch = next(iter(inputs.values())).shape[0]
    reduce = settings.forward_kwargs()
    runners = [
        Runner(FULL_NAME, lambda x: pumer_forward(model, x, **NO_REDUCTION), lambda b: batch_of(inputs, b)),
        Runner(PUMER_NAME, lambda x: pumer_forward(model, x, **reduce), lambda b: batch_of(inputs, b)),
    ]
    bench = BenchSettings(batch=batch, iters=iters, rounds=rounds, warmup=1, device=device, precision=precision)
    full, pumer = benchmark(runners, bench, baseline=FULL_NAME)
    memory_saving = None
    if full.peak_mem_mib and pumer.peak_mem_mib is not None:
        memory_saving = 1.0 - pumer.peak_mem_mib / full.peak_mem_mib
    return dict(
        device=device, batch=batch, precision=precision, iters=iters, rounds=rounds,
        full_ms=full.ms_per_batch, pumer_ms=pumer.ms_per_batch,
        full_per_s=full.img_per_s, pumer_per_s=pumer.img_per_s, speedup=pumer.speedup,
        full_gflops=full.gflops, pumer_gflops=pumer.gflops,
        full_peak_mib=full.peak_mem_mib, pumer_peak_mib=pumer.peak_mem_mib, memory_saving=memory_saving,
        memory_note=("peak of torch.cuda.max_memory_allocated (weights included)" if memory_saving is not None
                     else f"n/a on {device}: peak memory is measured on CUDA only"),
    )


def processed_image(pixel_values: torch.Tensor, pixel_mask: torch.Tensor, mean, std) -> Image.Image:
    """The first image as the model saw it: normalisation undone, padding cropped."""
    rows, cols = pixel_mask[0].bool().cpu().any(dim=1), pixel_mask[0].bool().cpu().any(dim=0)
    return denormalize(pixel_values[0, :, : int(rows.sum()), : int(cols.sum())], mean, std)


def answer_question(model: torch.nn.Module, processor, image: Image.Image, question: str,
                    settings: PuMerSettings = PuMerSettings()) -> PuMerResult:
    """Answer ``question`` about ``image`` with full ViLT and with ViLT+PuMer, trace the reduction and time both
    on the model's device. The model is only read."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in processor(images=image.convert("RGB"), text=question,
                                                     return_tensors="pt").items()}
    with torch.inference_mode():
        full_logits = pumer_forward(model, inputs, **NO_REDUCTION)
        pumer_logits, trace = pumer_forward(model, inputs, **settings.forward_kwargs(), return_trace=True)
    speed = benchmark_pumer(model, inputs, settings.timing_iters, str(device), settings, settings.timing_rounds)
    image_processor = processor.image_processor
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    labels = model.config.id2label
    return PuMerResult(
        question=question, text_tokens=list(tokens),
        image=processed_image(inputs["pixel_values"], inputs["pixel_mask"], image_processor.image_mean,
                         image_processor.image_std),
        patch_size=int(model.config.patch_size),
        full_answers=top_answers(full_logits[0], labels), pumer_answers=top_answers(pumer_logits[0], labels),
        trace=trace, speed=speed, settings=settings,
    )


# ----------------------------------------------------------------------------------------------- tables and records
def counts_frame(trace: PuMerTrace, sample: int = 0):
    """Tokens entering each layer per modality (image CLS counted), and after the encoder."""
    import pandas as pd

    layers = trace.text_counts.shape[1] - 1
    reduce_layers = {s.layer for s in trace.steps}
    return pd.DataFrame({
        "layer": [str(i) for i in range(layers)] + ["output"],
        "text_tokens": trace.text_counts[sample], "image_tokens": trace.image_counts[sample],
        "total_tokens": trace.text_counts[sample] + trace.image_counts[sample],
        "reduces_here": [i in reduce_layers for i in range(layers)] + [False],
    })


def steps_frame(trace: PuMerTrace, sample: int = 0):
    """One row per reduce layer: what came in, what was pruned and merged, which grid cells were pruned."""
    import pandas as pd

    return pd.DataFrame([{
        "layer": s.layer,
        "image_tokens_in": int(trace.image_counts[sample, s.layer]),
        "image_pruned": int(s.image_pruned[sample]), "image_merged": int(s.image_merged[sample]),
        "text_tokens_in": int(trace.text_counts[sample, s.layer]), "text_merged": int(s.text_merged[sample]),
        "pruned_cells": " ".join(map(str, s.pruned_cells[sample].tolist())),
    } for s in trace.steps])


def answers_frame(result: PuMerResult):
    import pandas as pd

    return pd.DataFrame([{"rank": i + 1, "ViLT answer": fa, "ViLT score": round(fs, 4),
                          "ViLT+PuMer answer": pa, "ViLT+PuMer score": round(ps, 4)}
                         for i, ((fa, fs), (pa, ps)) in enumerate(zip(result.full_answers, result.pumer_answers))])


def _finite_or_none(values: np.ndarray) -> list:
    return [None if not math.isfinite(v) else round(float(v), 6) for v in values]


def records_to_json(result: PuMerResult, sample: int = 0) -> dict:
    """Everything the page shows, as plain JSON types."""
    trace = result.trace
    return {
        "question": result.question, "text_tokens": result.text_tokens,
        "settings": asdict(result.settings), "grid_shape": list(trace.grid_shape), "patch_size": result.patch_size,
        "answers": {"full": result.full_answers, "pumer": result.pumer_answers},
        "speed": result.speed,
        "tokens_per_layer": counts_frame(trace, sample).to_dict(orient="records"),
        "reduce_steps": [{
            "layer": s.layer,
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


def token_counts_figure(trace: PuMerTrace, subtitle: str = "", sample: int = 0):
    """Tokens per layer for each modality, with PuMer (solid) and without (dashed); reduce layers marked.
    ``subtitle`` (model, weights, image) goes under the title."""
    import plotly.graph_objects as go

    frame = counts_frame(trace, sample)
    figure = go.Figure()
    for column, colour in (("text_tokens", "#1f77b4"), ("image_tokens", "#d62728"), ("total_tokens", "#444")):
        name = column.replace("_", " ")
        figure.add_scatter(x=frame["layer"], y=frame[column], mode="lines+markers", name=f"{name} (PuMer)",
                           line=dict(color=colour, shape="hv"))
        figure.add_scatter(x=frame["layer"], y=[frame[column].iloc[0]] * len(frame), mode="lines",
                           name=f"{name} (full)", line=dict(color=colour, dash="dash"), opacity=0.5)
    for step in trace.steps:
        figure.add_vline(x=str(step.layer), line=dict(color="#999", dash="dot"))
    title = "Tokens entering each layer (dotted: reduce layers; their MLP already sees the reduced count)"
    figure.update_layout(xaxis_title="layer", yaxis_title="tokens",
                         title=title + (f"<br><sup>{subtitle}</sup>" if subtitle else ""),
                         legend=dict(orientation="h", y=-0.25), margin=dict(t=70, b=10))
    return figure
