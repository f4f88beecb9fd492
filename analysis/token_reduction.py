"""Token reduction side by side: the DynamicViT family's pruning and ToMe merging on the same images.

``compare_reductions`` is the one computation behind the token-reduction page (the page runs its parts,
``reference_run``, ``dynamicvit_run`` and ``tome_run``, separately so each is cached by its own setting);
the other functions turn its record into figures (plotly), images (PIL) and tables (pandas). Which models
the page offers and which method runs on each come from the registry and the method table
(``models.methods``). Nothing here imports streamlit.

Every DynamicViT family's trace is read as a ``DynamicStageTrace``: each pruning stage has its own grid and
its maps are drawn on the image with cells of ``image size / grid`` pixels. Two kinds of trace exist:
* nested (DeiT, LV-ViT): dropped tokens leave the sequence for good; a map shows the tokens still there.
* structured (ConvNeXt, Swin, ``nested`` False): the feature map stays whole; a map shows the positions that
  take the block's full (MLP) path, the others take the cheap fast path. Each stage picks its own set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from PIL import Image, ImageDraw
from timm.models.vision_transformer import VisionTransformer

from analysis.data.images import imagenet_label
from analysis.provenance import UNTRAINED_PREDICTORS, label_rows, with_title
from analysis.tome_agreement import top1_agreement, top5_overlap
from models.dynamic_zoo import DynamicStageTrace, as_stage_trace, linear_targets
from models.dynamicvit import DynamicViT, dynamicvit_from_backbone
from models.methods import METHODS, Method
from models.registry import FAMILY_LABELS, REGISTRY, ModelSpec
from models.registry import DYNAMICVIT as DYNAMICVIT_FAMILY
from models.tome import ToMeTrace, tome_forward
from models.vit_forward import token_count

NO_REDUCTION, TOME = "no reduction", "ToMe merging"
KEEP_RATIO_KEY = "rho"  # the method table's main setting of every DynamicViT-family method
TOME_METHOD = METHODS["tome"]


def pruning_label(method: Method) -> str:
    """The method's name in tables and charts: 'DynamicViT pruning', 'DynamicCNN pruning', ..."""
    return f"{method.label} pruning"


DYNAMICVIT = "DynamicViT pruning"  # DeiT's, and the label of the page's default model


# --------------------------------------------------------------------------------------------
# Which models, which methods (registry + method table)
# --------------------------------------------------------------------------------------------
def pruning_method(family: str) -> Method | None:
    """The DynamicViT-family method (keep ratio rho) of a model family, or None."""
    return next((m for m in METHODS.values() if family in m.families and m.main_setting.key == KEEP_RATIO_KEY),
                None)


def tome_applies(spec: ModelSpec) -> bool:
    """Whether ToMe runs on the model: the method table applies it to the model's family or to its backbone's."""
    return TOME_METHOD.applies_to(spec) or spec.backbone_family in TOME_METHOD.families


def tome_absent_reason(spec: ModelSpec) -> str:
    """One sentence saying why ToMe is not run on this model."""
    families = ", ".join(FAMILY_LABELS.get(f, f) for f in sorted(TOME_METHOD.families))
    return (f"ToMe is not shown for {spec.name}: the method table applies {TOME_METHOD.label} to {families} "
            f"backbones only, and this model is a {spec.family_label}.")


class ModelChoice(NamedTuple):
    name: str                  # registry name of what is loaded
    pruning: Method | None     # the DynamicViT-family forward to run, None: ToMe only
    untrained_predictors: bool = False  # attach fresh score predictors to a plain ViT first


UNTRAINED_ON_TINY = "DeiT-Tiny backbone + UNTRAINED DynamicViT predictors"


def model_choices() -> dict[str, ModelChoice]:
    """The token-reduction page's models, by label: DeiT-Tiny with untrained predictors, every registry model
    with a DynamicViT-family method, then the plain models ToMe applies to (ToMe only)."""
    choices = {UNTRAINED_ON_TINY: ModelChoice("deit_tiny_patch16_224", pruning_method(DYNAMICVIT_FAMILY), True)}
    for name, spec in REGISTRY.items():
        method = pruning_method(spec.family)
        if method is not None:
            choices[name] = ModelChoice(name, method)
    for name, spec in REGISTRY.items():
        if pruning_method(spec.family) is None and TOME_METHOD.applies_to(spec):
            choices[f"{name} (ToMe only)"] = ModelChoice(name, None)
    return choices


def choice_text(label: str, choice: ModelChoice) -> str:
    """How the model picker shows a choice: releases say their method and the rho they were trained for."""
    spec = REGISTRY[choice.name]
    if choice.pruning is None or choice.untrained_predictors:
        return label
    trained = f", trained at rho {spec.trained_keep_ratio:g}" if spec.trained_keep_ratio else ""
    return f"{label} ({choice.pruning.label}{trained})"


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------
@dataclass
class ReductionComparison:
    """Logits (CPU) of the unreduced model and of each reduction that ran on one batch, with their traces.

    ``unreduced_tokens`` counts, per block, what enters it without reduction: tokens with CLS for a ViT,
    feature-map positions for a hierarchical model. The pruning fields are None when no DynamicViT-family
    method ran (a plain ViT), the ToMe fields when ToMe does not apply to the model.
    """

    image_names: list[str]
    reference_logits: torch.Tensor
    unreduced_tokens: list[int]
    tome_logits: torch.Tensor | None = None
    tome_trace: ToMeTrace | None = None
    r: int | Sequence[int] | str | None = None
    keep_ratio: float | None = None
    dynamicvit_logits: torch.Tensor | None = None
    dynamicvit_trace: DynamicStageTrace | None = None
    pruning_label: str = DYNAMICVIT
    proportional_attention: bool = True  # ToMe's log-size bias (only meaningful when ToMe ran)
    untrained_predictors: bool = False  # DynamicViT's score predictors freshly initialised on a plain backbone

    @property
    def num_tokens(self) -> int:
        return self.unreduced_tokens[0]

    @property
    def depth(self) -> int:
        return len(self.unreduced_tokens)

    def logits_by_method(self) -> dict[str, torch.Tensor]:
        methods = {NO_REDUCTION: self.reference_logits}
        if self.dynamicvit_logits is not None:
            methods[self.pruning_label] = self.dynamicvit_logits
        if self.tome_logits is not None:
            methods[TOME] = self.tome_logits
        return methods


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def reference_run(model: torch.nn.Module, batch: torch.Tensor, pruning: Method | None = None
                  ) -> tuple[torch.Tensor, list[int]]:
    """Logits (CPU, float) without any reduction and what enters each block.

    With a pruning method its forward runs at its neutral setting (rho = 1, equal to ``model(x)``), whose
    trace counts a hierarchical model's positions per block; a plain ViT runs ``model(x)``.
    """
    with torch.inference_mode():
        x = batch.to(_device(model))
        if pruning is None:
            counts = [token_count(model)] * len(model.blocks)
            return model(x).float().cpu(), counts
        logits, trace = pruning.bind_neutral(model)(x, return_trace=True)
    return logits.float().cpu(), list(trace.tokens_per_block)


def tome_run(model: VisionTransformer, batch: torch.Tensor, r: int | Sequence[int] | str = 13,
             proportional_attention: bool = True) -> tuple[torch.Tensor, ToMeTrace]:
    """ToMe's logits (CPU) and merge trace on ``batch``."""
    with torch.inference_mode():
        logits, trace = tome_forward(model, batch.to(_device(model)), r=r,
                                     proportional_attention=proportional_attention, return_trace=True)
    return logits.float().cpu(), trace


def dynamicvit_run(model: torch.nn.Module, batch: torch.Tensor, keep_ratio: float = 0.7,
                   pruning: Method | None = None) -> tuple[torch.Tensor, DynamicStageTrace]:
    """Logits (CPU) and per-stage trace of a DynamicViT-family forward at ``keep_ratio``.

    ``pruning`` is the model's method from the table (default: DeiT's DynamicViT). ValueError for a keep ratio
    the family's schedule cannot run (hierarchical models need rho > 0.4).
    """
    pruning = pruning or pruning_method(DYNAMICVIT_FAMILY)
    with torch.inference_mode():
        logits, trace = pruning.bind(model, {KEEP_RATIO_KEY: keep_ratio})(batch.to(_device(model)),
                                                                          return_trace=True)
    return logits.float().cpu(), as_stage_trace(trace, tuple(batch.shape[-2:]))


def combine_runs(image_names: Sequence[str], reference: tuple[torch.Tensor, list[int]],
                 tome: tuple[torch.Tensor, ToMeTrace] | None = None, r: int | Sequence[int] | str | None = None,
                 dynamicvit: tuple[torch.Tensor, DynamicStageTrace] | None = None,
                 keep_ratio: float | None = None, pruning: Method | None = None, proportional_attention: bool = True,
                 untrained_predictors: bool = False) -> ReductionComparison:
    """The comparison record from separately computed runs (so each can be cached by its own setting)."""
    return ReductionComparison(
        image_names=list(image_names),
        reference_logits=reference[0],
        unreduced_tokens=list(reference[1]),
        tome_logits=None if tome is None else tome[0],
        tome_trace=None if tome is None else tome[1],
        r=r if tome is not None else None,
        keep_ratio=keep_ratio if dynamicvit is not None else None,
        dynamicvit_logits=None if dynamicvit is None else dynamicvit[0],
        dynamicvit_trace=None if dynamicvit is None else dynamicvit[1],
        pruning_label=pruning_label(pruning) if pruning is not None else DYNAMICVIT,
        proportional_attention=proportional_attention,
        untrained_predictors=untrained_predictors and dynamicvit is not None,
    )


def compare_reductions(
    model: torch.nn.Module,
    batch: torch.Tensor,
    image_names: Sequence[str],
    keep_ratio: float = 0.7,
    r: int | Sequence[int] | str | None = 13,
    proportional_attention: bool = True,
    pruning: Method | None = None,
) -> ReductionComparison:
    """Run the model unreduced, with its DynamicViT-family pruning (``pruning``; default: DeiT's DynamicViT
    when the model has score predictors) and with ToMe (unless ``r`` is None), on ``batch``.

    The model is only read (inference mode, no attribute set): it may be a shared cached model.
    """
    if pruning is None and isinstance(model, DynamicViT):
        pruning = pruning_method(DYNAMICVIT_FAMILY)
    dynamicvit = dynamicvit_run(model, batch, keep_ratio, pruning) if pruning is not None else None
    tome = tome_run(model, batch, r, proportional_attention) if r is not None else None
    return combine_runs(image_names, reference_run(model, batch, pruning), tome, r, dynamicvit, keep_ratio, pruning,
                        proportional_attention)


def dynamicvit_with_untrained_predictors(backbone: VisionTransformer, seed: int = 0):
    """A DynamicViT on a copy of ``backbone``'s weights with freshly initialised (untrained) score predictors.

    The predictors are seeded for reproducibility without disturbing the global random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dynamicvit_from_backbone(backbone).eval()


# --------------------------------------------------------------------------------------------
# Predictions and agreement
# --------------------------------------------------------------------------------------------
def class_name(index: int, num_classes: int) -> str:
    """ImageNet-1k name for a 1000-class head, else a numbered class."""
    return imagenet_label(index) if num_classes == 1000 else f"class {index}"


def top5_frame(logits: torch.Tensor, image: int, k: int = 5) -> pd.DataFrame:
    """The top-k classes of one image with softmax probabilities."""
    probs = logits[image].float().softmax(-1)
    values, indices = probs.topk(min(k, probs.numel()))
    return pd.DataFrame(
        {
            "rank": range(1, len(indices) + 1),
            "class": [class_name(i, probs.numel()) for i in indices.tolist()],
            "class index": indices.tolist(),
            "probability": values.tolist(),
        }
    )


def agreement_frame(comparison: ReductionComparison, image: int | None = None) -> pd.DataFrame:
    """Per method: top-1 agreement and top-5 overlap with the unreduced model (one image or all of them)."""
    rows = slice(None) if image is None else slice(image, image + 1)
    reference = comparison.reference_logits[rows]
    return pd.DataFrame(
        [
            {
                "method": method,
                "top-1 agreement": top1_agreement(reference, logits[rows]),
                "top-5 overlap": top5_overlap(reference, logits[rows]),
            }
            for method, logits in comparison.logits_by_method().items()
        ]
    )


def predictions_frame(comparison: ReductionComparison, image: int | None = None) -> pd.DataFrame:
    """Top-5 of every method for one image (or every image), long format (image, method, rank, class, probability)."""
    images = range(len(comparison.image_names)) if image is None else [image]
    frames = [top5_frame(logits, i).assign(method=method, image=comparison.image_names[i])
              for i in images for method, logits in comparison.logits_by_method().items()]
    return pd.concat(frames, ignore_index=True)[["image", "method", "rank", "class", "class index", "probability"]]


# --------------------------------------------------------------------------------------------
# What produced a result: every export of the comparison names it
# --------------------------------------------------------------------------------------------
def reduction_settings(comparison: ReductionComparison) -> dict[str, Any]:
    """Every setting behind ``comparison``, as export columns; a method that did not run leaves its columns
    empty (None)."""
    pruned, merged = comparison.dynamicvit_trace is not None, comparison.tome_trace is not None
    return {"rho": comparison.keep_ratio if pruned else None,
            "predictors": ("untrained" if comparison.untrained_predictors else "trained") if pruned else None,
            "tome_r": str(comparison.r) if merged else None,
            "tome_proportional_attention": comparison.proportional_attention if merged else None}


def tome_setting_text(r, proportional_attention: bool) -> str:
    schedule = "decreasing schedule" if str(r).startswith("decreasing") else "constant schedule"
    r_text = str(r).removeprefix("decreasing:")
    return f"r={r_text} ({schedule}), proportional attention {'on' if proportional_attention else 'off'}"


def method_setting(comparison: ReductionComparison, method: str) -> str:
    """One method's setting in words: 'rho=0.7, untrained predictors', 'r=13 (constant schedule), ...'."""
    if method == comparison.pruning_label and comparison.keep_ratio is not None:
        return f"rho={comparison.keep_ratio:g}" + (f", {UNTRAINED_PREDICTORS}" if comparison.untrained_predictors
                                                   else "")
    if method == TOME and comparison.r is not None:
        return tome_setting_text(comparison.r, comparison.proportional_attention)
    return "none"


def method_weights(comparison: ReductionComparison, method: str, weights: str) -> str:
    """The weights behind one method's row: the backbone's, plus the untrained predictors only on DynamicViT's."""
    if method == comparison.pruning_label and comparison.untrained_predictors:
        return f"{weights} + {UNTRAINED_PREDICTORS}"
    return weights


def export_frame(frame: pd.DataFrame, comparison: ReductionComparison, model: str, weights: str,
                 image: str | Sequence[str] | None = None) -> pd.DataFrame:
    """``frame`` as the page exports it: model, weights, image(s) and every setting on each row. A frame with a
    ``method`` column also gets each row's own setting and weights (``weights`` is the backbone's: only
    DynamicViT's rows name its untrained predictors)."""
    settings = reduction_settings(comparison)
    if "method" in frame.columns:
        methods = frame["method"].tolist()
        settings = {"setting": [method_setting(comparison, m) for m in methods], **settings}
        weights = [method_weights(comparison, m, weights) for m in methods]
    return label_rows(frame, model, weights, image, settings)


# --------------------------------------------------------------------------------------------
# Tokens per block
# --------------------------------------------------------------------------------------------
def tome_tokens_entering_blocks(trace: ToMeTrace, num_tokens: int) -> list[int]:
    """Tokens entering each block's attention under ToMe (merging happens inside the block)."""
    return [num_tokens] + trace.tokens_per_layer[:-1]


def is_structured(comparison: ReductionComparison) -> bool:
    """Whether the pruning kept the feature map whole (ConvNeXt, Swin) rather than dropping tokens."""
    return comparison.dynamicvit_trace is not None and not comparison.dynamicvit_trace.nested


def tokens_per_block(comparison: ReductionComparison) -> dict[str, list[int]]:
    """Per block and method: tokens entering it (CLS included) or, for a structured model, the positions
    that take its full path."""
    series = {NO_REDUCTION: list(comparison.unreduced_tokens)}
    if comparison.dynamicvit_trace is not None:
        series[comparison.pruning_label] = list(comparison.dynamicvit_trace.tokens_per_block)
    if comparison.tome_trace is not None:
        series[TOME] = tome_tokens_entering_blocks(comparison.tome_trace, comparison.num_tokens)
    return series


def tokens_per_block_figure(series: dict[str, list[int]], title: str = "Tokens entering each block",
                            structured: bool = False) -> go.Figure:
    """Step chart of token counts per block, one line per method; a structured model's positions on the full
    path per block on a log axis (its stages differ 16-fold in size)."""
    figure = go.Figure()
    for method, counts in series.items():
        figure.add_trace(go.Scatter(x=list(range(len(counts))), y=counts, name=method, mode="lines+markers",
                                    line_shape="hv"))
    y_title = "positions on the full path (MLP)" if structured else "tokens (CLS included)"
    figure.update_layout(title=title, xaxis_title="block (all stages, in order)" if structured else "block",
                         yaxis_title=y_title, hovermode="x unified")
    if structured:  # tick at every count that occurs (3136, 784, 196, 137, ...), not at log decades
        values = sorted({count for counts in series.values() for count in counts})
        figure.update_yaxes(type="log", tickvals=values if len(values) <= 16 else None)
    else:
        figure.update_yaxes(rangemode="tozero")
    return figure


# --------------------------------------------------------------------------------------------
# DynamicViT-family maps: each stage on its own grid, drawn to scale on the image
# --------------------------------------------------------------------------------------------
def _stages(trace) -> DynamicStageTrace:
    # DeiT's DynamicViTTrace has no image size; what is computed without drawing (frequencies, indices) does not
    # need it, so its grid stands in (1-pixel cells).
    return as_stage_trace(trace, getattr(trace, "image_size", None) or tuple(trace.grid_size))


def _cell_of_pixel(pixels: int, cells: int) -> np.ndarray:
    """The cell (row or column) each of ``pixels`` pixels falls in when ``cells`` cells span them evenly."""
    return np.minimum(np.arange(pixels) * cells // pixels, cells - 1)


def fade_dropped_patches(canvas: Image.Image, keep_mask: np.ndarray, grid: tuple[int, int], fade: float = 0.8,
                         cell_borders: bool = False) -> Image.Image:
    """The canvas with every cell not kept blended towards white by ``fade`` (kept cells unchanged).

    The ``grid`` (rows, cols) spans the whole canvas, so each cell covers canvas size / grid pixels: a 14x14
    stage map of a 224-px input has 16-px cells, a 7x7 one 32-px cells. ``cell_borders`` outlines the cells
    faintly so the map's resolution shows.
    """
    pixels = np.asarray(canvas.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    rows, cols = _cell_of_pixel(height, grid[0]), _cell_of_pixel(width, grid[1])
    kept = np.asarray(keep_mask, dtype=bool).reshape(grid)[rows[:, None], cols[None, :]]
    out = pixels.copy()
    out[~kept] = pixels[~kept] * (1.0 - fade) + 255.0 * fade
    if cell_borders:
        edge = np.zeros((height, width), dtype=bool)
        edge[1:, :] |= (rows[1:] != rows[:-1])[:, None]
        edge[:, 1:] |= (cols[1:] != cols[:-1])[None, :]
        out[edge] = out[edge] * 0.6 + 128.0 * 0.4
    return Image.fromarray(out.round().astype(np.uint8))


def dynamicvit_stage_panels(canvas: Image.Image, trace, image: int) -> list[tuple[str, Image.Image]]:
    """The input and, per pruning stage, its map on the canvas (cells not kept faded), with captions."""
    trace = _stages(trace)
    what = "kept" if trace.nested else "full path"
    panels = [("input", canvas)]
    for stage, (block, mask) in enumerate(zip(trace.stage_blocks, trace.keep_masks())):
        rows, cols = trace.stage_grids[stage]
        panels.append((f"{block}: {int(mask[image].sum())}/{rows * cols} {what}",
                       fade_dropped_patches(canvas, mask[image].numpy(), (rows, cols), cell_borders=True)))
    return panels


def _grid_text(trace: DynamicStageTrace, stage: int) -> str:
    rows, cols = trace.stage_grids[stage]
    cell_h, cell_w = trace.cell_size(stage)
    return f"{rows}x{cols} map, {cell_h:g}x{cell_w:g}-px cells"


def stage_maps_caption(trace: DynamicStageTrace) -> str:
    """What the stage maps show, for the model's kind of pruning."""
    grids = sorted({_grid_text(trace, s) for s in range(trace.num_stages)})
    where = f"Predictors before {', '.join(trace.stage_blocks)}; {' / '.join(grids)} on the " \
            f"{trace.image_size[0]}x{trace.image_size[1]} input."
    if trace.nested:
        return (f"{where} Bright cells: tokens still in the sequence after each stage; faded cells were dropped "
                "there or earlier and never come back.")
    return (f"{where} Nothing is dropped: the feature map stays whole (convolutions and windows need it). Bright "
            "cells are the positions that take the full MLP path from that block on; faded cells take the cheap "
            "fast path. Each predictor picks its own set; blocks outside the pruned stage run on every position."
            + "".join(f" {note}" for note in truncation_notes(trace)))


def truncation_notes(trace: DynamicStageTrace) -> list[str]:
    """Where a structured stage keeps one position fewer than N x ratio: the official code truncates
    int(N * (rho - 0.2 s)) in floating point, and 0.7 - 0.2 is 0.49999999999999994 (196 -> 97, not 98)."""
    if trace.nested or trace.keep_ratio >= 1.0:
        return []
    notes = []
    for stage, (count, ratio) in enumerate(zip(trace.kept_counts, linear_targets(trace.keep_ratio,
                                                                                   trace.num_stages))):
        rows, cols = trace.stage_grids[stage]
        expected = int(round(rows * cols * round(ratio, 9), 6))  # what N x ratio gives on paper
        if count != expected:
            notes.append(f"Stage {stage + 1} keeps {count} of {rows * cols}, not {expected}: as in the official "
                         f"code, int({rows * cols} x ({trace.keep_ratio:g} - {0.2 * stage:g})) is computed in "
                         f"floating point, where {trace.keep_ratio:g} - {0.2 * stage:g} = {ratio!r}, so "
                         f"{rows * cols} x {ratio!r} = {rows * cols * ratio!r} truncates to {count}.")
    return notes


def _pixel_heatmap(values: np.ndarray, cell: tuple[float, float], **kwargs) -> go.Heatmap:
    """A heat map whose cells sit on the image's pixels (cell centres at (i + 0.5) * cell size)."""
    rows, cols = values.shape
    where = np.dstack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"))
    return go.Heatmap(z=values, x0=cell[1] / 2, dx=cell[1], y0=cell[0] / 2, dy=cell[0], customdata=where,
                      **kwargs)


def _image_axes(figure: go.Figure, trace: DynamicStageTrace, columns: int) -> None:
    height, width = trace.image_size
    for column in range(1, columns + 1):
        anchor = f"x{column if column > 1 else ''}"
        figure.update_xaxes(range=[0, width], constrain="domain", showticklabels=False, row=1, col=column)
        figure.update_yaxes(range=[height, 0], scaleanchor=anchor, showticklabels=False, row=1, col=column)


def keep_score_range(trace, image: int) -> tuple[float, float]:
    """The lowest and highest keep score of one image over every stage (dropped positions left out)."""
    values = np.concatenate([scores[image].numpy().ravel() for scores in _stages(trace).score_maps()])
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)


NARROW_SCORES = 0.05  # keep scores spanning less than this carry no confidence (untrained predictors: all ~0.5)


def keep_score_note(trace, image: int) -> str | None:
    """Why the heat maps' colour scale is stretched, when the scores span almost nothing (None otherwise)."""
    low, high = keep_score_range(trace, image)
    if high - low >= NARROW_SCORES:
        return None
    return (f"Keep scores span only {low:.5f} to {high:.5f}. Untrained predictors score every patch near 0.5 "
            "(their freshly initialised last layer gives both classes, keep and drop, almost the same "
            "probability), so the colours are stretched to that range: they show the tiny differences that still "
            "decide which patches are kept, not any confidence.")


def keep_score_figure(trace, image: int, title: str = "DynamicViT keep scores per stage") -> go.Figure:
    """Heat maps of the predicted keep probability per position at each stage, on its own grid drawn to the
    image's scale (blank: dropped at an earlier stage, so not scored). The colour scale spans the image's own
    scores (untrained predictors give 0.4999-0.5001: on a 0-1 scale a flat square; see ``keep_score_note``)."""
    trace = _stages(trace)
    low, high = keep_score_range(trace, image)
    if high <= low:
        low, high = low - 1e-6, high + 1e-6
    digits = max(2, int(np.ceil(-np.log10(high - low))) + 1)
    titles = [f"stage {s + 1}: {b} ({_grid_text(trace, s)})" for s, b in enumerate(trace.stage_blocks)]
    figure = make_subplots(rows=1, cols=trace.num_stages, subplot_titles=titles, horizontal_spacing=0.03)
    for stage, scores in enumerate(trace.score_maps()):
        figure.add_trace(_pixel_heatmap(
            scores[image].numpy(), trace.cell_size(stage), zmin=low, zmax=high, colorscale="Viridis",
            showscale=stage == trace.num_stages - 1, colorbar=dict(title="keep prob.", tickformat=f".{digits}f"),
            hovertemplate=f"row %{{customdata[0]}}, col %{{customdata[1]}}: %{{z:.{digits + 1}f}}<extra></extra>"),
            row=1, col=stage + 1)
    _image_axes(figure, trace, trace.num_stages)
    figure.update_annotations(font_size=11)
    figure.update_layout(title=title, height=340, margin=dict(t=80, b=10))
    return figure


def keep_frequency(trace, stage: int = -1) -> np.ndarray:
    """Fraction of the batch's images in which each position is kept at ``stage``: [rows, cols] of its grid."""
    return _stages(trace).keep_masks()[stage].float().mean(0).numpy()


def keep_frequency_figure(frequency: np.ndarray, title: str) -> go.Figure:
    """Heat map of how often each position is kept across images (one stage, in grid cells)."""
    figure = go.Figure(go.Heatmap(z=frequency, zmin=0.0, zmax=1.0, colorscale="Cividis",
                                  colorbar=dict(title="kept in"), hovertemplate="row %{y}, col %{x}: %{z:.0%}<extra></extra>"))
    figure.update_yaxes(autorange="reversed", scaleanchor="x", title="patch row")
    figure.update_xaxes(constrain="domain", title="patch column")
    figure.update_layout(title=title, height=420)
    return figure


def keep_frequency_by_stage_figure(trace, title: str) -> go.Figure:
    """Per stage, how often each position is kept over the batch's images, each on its grid at the image's scale."""
    trace = _stages(trace)
    titles = [f"stage {s + 1}: {b}, {k} kept" for s, (b, k) in enumerate(zip(trace.stage_blocks, trace.kept_counts))]
    figure = make_subplots(rows=1, cols=trace.num_stages, subplot_titles=titles, horizontal_spacing=0.03)
    for stage in range(trace.num_stages):
        figure.add_trace(_pixel_heatmap(
            keep_frequency(trace, stage), trace.cell_size(stage), zmin=0.0, zmax=1.0, colorscale="Cividis",
            showscale=stage == trace.num_stages - 1, colorbar=dict(title="kept in"),
            hovertemplate="row %{customdata[0]}, col %{customdata[1]}: %{z:.0%}<extra></extra>"), row=1, col=stage + 1)
    _image_axes(figure, trace, trace.num_stages)
    figure.update_annotations(font_size=11)
    figure.update_layout(title=title, height=340, margin=dict(t=80, b=10))
    return figure


def kept_indices_frame(trace, image_names: Sequence[str]) -> pd.DataFrame:
    """One row per image and stage: the kept positions (row-major over that stage's grid), space-separated."""
    trace = _stages(trace)
    rows = []
    for stage, (block, kept) in enumerate(zip(trace.stage_blocks, trace.kept_indices)):
        grid_rows, grid_cols = trace.stage_grids[stage]
        for image, name in enumerate(image_names):
            indices = kept[image].tolist()
            rows.append({"image": name, "stage": stage + 1, "before block": block,
                         "grid": f"{grid_rows}x{grid_cols}", "kept": len(indices),
                         "kept_indices": " ".join(map(str, indices))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# ToMe maps
# --------------------------------------------------------------------------------------------
def tome_merge_panels(canvas: Image.Image, trace: ToMeTrace, layers: Sequence[int], image: int) -> list[tuple[str, Image.Image]]:
    """The input and ToMe's merge map after each chosen block (groups in their mean colour), with captions."""
    patch = canvas.size[0] // trace.grid_size[1]
    panels = [("input", canvas)]
    for layer in layers:
        painted = tome_merge_map_image(canvas, trace.assignments[layer][image], grid=trace.grid_size, patch=patch)
        panels.append((f"after block {layer}: {trace.tokens_per_layer[layer]} tokens", painted))
    return panels


# --------------------------------------------------------------------------------------------
# Panels -> one image for download
# --------------------------------------------------------------------------------------------
def image_strip(panels: Sequence[tuple[str, Image.Image]], caption_height: int = 18, gap: int = 6,
                title: str | None = None) -> Image.Image:
    """The panels side by side on white, each with its caption above, as one PNG-ready image; ``title`` (model,
    weights, image) goes on a line above them all."""
    width = sum(image.size[0] for _, image in panels) + gap * (len(panels) - 1)
    height = max(image.size[1] for _, image in panels) + caption_height
    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    x = 0
    for caption, image in panels:
        draw.text((x + 2, 3), caption, fill=(0, 0, 0))
        strip.paste(image.convert("RGB"), (x, caption_height))
        x += image.size[0] + gap
    return with_title(strip, title) if title else strip


# ToMe's merge visualisation (the paper's figure)
def _as_rgb_array(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """The image as an [height, width, 3] float array, resized when it is not already that size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    return np.asarray(image, dtype=np.float64)


def tome_merge_map_image(
    image: Image.Image | np.ndarray,
    assignment: np.ndarray,
    grid: tuple[int, int] = (14, 14),
    patch: int = 16,
    border_color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """The paper's merge visualisation: every group of merged patches in its mean colour, with borders.

    ``assignment`` [grid_h * grid_w] gives each patch's token (one image's row of
    ``ToMeTrace.assignments[layer]``); the image is resized to ``grid * patch`` pixels.
    """
    grid_h, grid_w = grid
    height, width = grid_h * patch, grid_w * patch
    pixels = _as_rgb_array(image, height, width)
    labels = np.asarray(assignment).reshape(grid_h, grid_w)
    _, group = np.unique(labels, return_inverse=True)
    group = group.reshape(grid_h, grid_w)
    patch_colours = pixels.reshape(grid_h, patch, grid_w, patch, 3).mean(axis=(1, 3)).reshape(-1, 3)
    counts = np.bincount(group.ravel())
    group_colours = np.stack(
        [np.bincount(group.ravel(), weights=patch_colours[:, c]) / counts for c in range(3)], axis=1
    )
    pixel_groups = np.repeat(np.repeat(group, patch, axis=0), patch, axis=1)
    painted = group_colours[pixel_groups]
    # Mark both pixels on each side of a group change, so borders are two pixels wide.
    horizontal = pixel_groups[:, 1:] != pixel_groups[:, :-1]
    vertical = pixel_groups[1:, :] != pixel_groups[:-1, :]
    edge = np.zeros((height, width), dtype=bool)
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    painted[edge] = border_color
    return Image.fromarray(np.clip(painted.round(), 0, 255).astype(np.uint8))
