"""Token reduction side by side: every method of the method table that runs on a model, on the same images.

``compare_reductions`` is the one computation behind the token-reduction page (the page runs its parts,
``reference_run`` and one ``method_run`` per method, separately so each is cached by its own settings); the other
functions turn its record into figures (plotly), images (PIL) and tables (pandas). Which models the page offers and
which methods run on each come from the registry and the method table (``models.methods``): nothing here names a
method. Each method's figures are found by the type of its trace (``FIGURES`` at the end of this module): a new
method is its forward, its record in the table and its figures here. Nothing here imports streamlit.

Every DynamicViT family's trace is read as a ``DynamicStageTrace``: each pruning stage has its own grid and
its maps are drawn on the image with cells of ``image size / grid`` pixels. Two kinds of trace exist:
* nested (DeiT, LV-ViT): dropped tokens leave the sequence for good; a map shows the tokens still there.
* structured (ConvNeXt, Swin, ``nested`` False): the feature map stays whole; a map shows the positions that
  take the block's full (MLP) path, the others take the cheap fast path. Each stage picks its own set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from PIL import Image, ImageDraw
from timm.models.vision_transformer import VisionTransformer

from analysis.data.images import imagenet_label
from analysis.provenance import UNTRAINED_PREDICTORS, file_name, label_rows, title_line, with_title
from analysis.tome_agreement import count_gflops, top1_agreement, top5_overlap
from models.dynamic_zoo import DynamicStageTrace, as_stage_trace, linear_targets
from models.dynamicvit import DynamicViTTrace
from models.evit import EViTTrace
from models.methods import METHODS, Method, Setting
from models.registry import FAMILY_LABELS, IMAGE_CLASSIFICATION, REGISTRY, ModelSpec, get_spec
from models.tome import ToMeTrace
from models.vit_forward import token_count

NO_REDUCTION = "no reduction"


# --------------------------------------------------------------------------------------------
# Which models, which methods (registry + method table)
# --------------------------------------------------------------------------------------------
def methods_running_on(spec: ModelSpec) -> list[Method]:
    """The table's methods that run on the model as released: its family's first, then its backbone's."""
    return sorted((m for m in METHODS.values() if m.runs_on(spec)), key=lambda m: not m.applies_to(spec))


def absent_methods_note(spec: ModelSpec, shown: Sequence[Method]) -> str | None:
    """One sentence naming the image methods of the table not shown for this model, and why (None: all shown)."""
    missing = [m for m in METHODS.values() if m not in shown and not m.plain_for and m.label not in
               {s.label for s in shown}]
    if not missing:
        return None
    parts = [f"{m.label} applies to {', '.join(FAMILY_LABELS.get(f, f) for f in sorted(m.families))}" for m in missing]
    return (f"Not shown for {spec.name} ({spec.family_label}): " + "; ".join(parts) + ".")


class ModelChoice(NamedTuple):
    name: str                     # registry (or timm) name of what is loaded
    attached: Method | None = None  # a method whose untrained parts (score predictors) are attached first

    @property
    def untrained_predictors(self) -> bool:
        return self.attached is not None

    def methods(self) -> list[Method]:
        """The methods run on this choice: the attached one first, then every method that runs on the model."""
        return ([self.attached] if self.attached else []) + methods_running_on(get_spec(self.name))


def untrained_choice_label(name: str, method: Method) -> str:
    return f"{name} + UNTRAINED {method.label} predictors"


def model_choices(extra: Sequence[str] = ()) -> dict[str, ModelChoice]:
    """The token-reduction page's models, by label: each plain backbone with a method's untrained parts attached,
    then every image classifier (registry, then ``extra`` names) on which at least one method runs. Models of
    other tasks (PuMer's vision-language models, which have their own page) are not offered."""
    names = [n for n in list(REGISTRY) + [n for n in extra if n not in REGISTRY]
             if get_spec(n).task == IMAGE_CLASSIFICATION]
    choices: dict[str, ModelChoice] = {}
    for name in names:
        spec = get_spec(name)
        for method in METHODS.values():
            if method.needs_attachment(spec):
                choices[untrained_choice_label(name, method)] = ModelChoice(name, method)
    for name in names:
        if methods_running_on(get_spec(name)):
            choices[name] = ModelChoice(name)
    return choices


def choice_text(label: str, choice: ModelChoice) -> str:
    """How the model picker shows a choice: its methods, a release's with the value it was trained for."""
    if choice.untrained_predictors:
        return label
    spec = get_spec(choice.name)
    parts = []
    for method in choice.methods():
        trained = method.trained_value(spec)
        parts.append(method.label + (f", trained at {method.main_setting.symbol} {trained:g}" if trained else ""))
    return f"{label} ({'; '.join(dict.fromkeys(parts))})"


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------
@dataclass
class MethodRun:
    """One method's logits (CPU) and trace on a batch, at its settings (keys of the method table's settings)."""

    method: Method
    settings: dict[str, Any]
    logits: torch.Tensor
    trace: Any
    untrained_predictors: bool = False

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def figures(self) -> "MethodFigures":
        return figures_for(self.trace)

    @property
    def main_value(self) -> Any:
        return self.settings.get(self.method.main_setting.key)

    def setting_text(self) -> str:
        text = self.method.describe(self.settings)
        return text + (f", {UNTRAINED_PREDICTORS}" if self.untrained_predictors else "")


@dataclass
class ReductionComparison:
    """Logits (CPU) of the unreduced model and of each method that ran on one batch, keyed by method key.

    ``unreduced_tokens`` counts, per block, what enters it without reduction: tokens with CLS for a ViT,
    feature-map positions for a hierarchical model.
    """

    image_names: list[str]
    reference_logits: torch.Tensor
    unreduced_tokens: list[int]
    runs: dict[str, MethodRun] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.unreduced_tokens[0]

    @property
    def depth(self) -> int:
        return len(self.unreduced_tokens)

    @property
    def structured(self) -> bool:
        """Whether a method kept the feature map whole (ConvNeXt, Swin) rather than dropping tokens."""
        return any(run.figures.structured(run.trace) for run in self.runs.values())

    def run_named(self, name: str) -> MethodRun | None:
        return next((run for run in self.runs.values() if run.name == name), None)

    def logits_by_method(self) -> dict[str, torch.Tensor]:
        return {NO_REDUCTION: self.reference_logits, **{run.name: run.logits for run in self.runs.values()}}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def reference_run(model: torch.nn.Module, batch: torch.Tensor, methods: Sequence[Method] = ()
                  ) -> tuple[torch.Tensor, list[int]]:
    """Logits (CPU, float) without any reduction and what enters each block.

    A ViT runs ``model(x)`` and counts its tokens; another model (ConvNeXt, Swin) runs its own method's forward at
    the neutral setting (equal to ``model(x)``), whose trace counts its positions per block.
    """
    with torch.inference_mode():
        x = batch.to(_device(model))
        if isinstance(model, VisionTransformer) or not methods:
            counts = [token_count(model)] * len(model.blocks)
            return model(x).float().cpu(), counts
        logits, trace = methods[0].bind_neutral(model)(x, return_trace=True)
    trace = prepared_trace(trace, tuple(batch.shape[-2:]))
    return logits.float().cpu(), figures_for(trace).tokens_per_block(trace, [])


def method_run(model: torch.nn.Module, batch: torch.Tensor, method: Method, settings: dict[str, Any]
               ) -> tuple[torch.Tensor, Any]:
    """Logits (CPU) and trace of ``method`` at ``settings`` on ``batch``. ValueError for settings the model's
    schedule cannot run (hierarchical models need rho > 0.4) or a model the method does not apply to."""
    with torch.inference_mode():
        logits, trace = method.bind(model, settings)(batch.to(_device(model)), return_trace=True)
    return logits.float().cpu(), prepared_trace(trace, tuple(batch.shape[-2:]))


def combine_runs(image_names: Sequence[str], reference: tuple[torch.Tensor, list[int]],
                 runs: Sequence[tuple[Method, dict[str, Any], tuple[torch.Tensor, Any]]] = (),
                 untrained_predictors: Method | None = None) -> ReductionComparison:
    """The comparison record from separately computed runs (so each can be cached by its own settings)."""
    return ReductionComparison(
        image_names=list(image_names), reference_logits=reference[0], unreduced_tokens=list(reference[1]),
        runs={method.key: MethodRun(method, dict(settings), result[0], result[1], method is untrained_predictors)
              for method, settings, result in runs})


def compare_reductions(model: torch.nn.Module, batch: torch.Tensor, image_names: Sequence[str],
                       methods: Sequence[Method], settings: dict[str, dict[str, Any]] | None = None,
                       untrained_predictors: Method | None = None) -> ReductionComparison:
    """Run the model unreduced and with each of ``methods`` at ``settings[method.key]`` (default: the table's
    defaults) on ``batch``; ``untrained_predictors`` names the method whose parts were attached untrained.

    The model is only read (inference mode, no attribute set): it may be a shared cached model.
    """
    settings = settings or {}
    runs = [(m, settings.get(m.key, m.defaults()), method_run(model, batch, m, settings.get(m.key, m.defaults())))
            for m in methods]
    return combine_runs(image_names, reference_run(model, batch, methods), runs, untrained_predictors)


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
PREDICTORS_COLUMN = "predictors"


def reduction_settings(comparison: ReductionComparison) -> dict[str, Any]:
    """Every setting behind ``comparison``, as export columns (``Setting.column``), from each method that ran; a
    method that can carry untrained predictors also says whether its were trained."""
    columns: dict[str, Any] = {}
    for run in comparison.runs.values():
        for setting in run.method.settings:
            value = run.settings.get(setting.key)
            columns[setting.column] = None if value is None else (str(value) if setting.schedules else value)
        if run.method.attach is not None:
            columns[PREDICTORS_COLUMN] = "untrained" if run.untrained_predictors else "trained"
    return columns


def method_setting(comparison: ReductionComparison, method_name: str) -> str:
    """One method's settings in words: 'rho=0.7, untrained predictors', 'r=13 (constant schedule), ...'."""
    run = comparison.run_named(method_name)
    return "none" if run is None else run.setting_text()


def method_weights(comparison: ReductionComparison, method_name: str, weights: str) -> str:
    """The weights behind one method's row: the backbone's, plus untrained predictors where they were attached."""
    run = comparison.run_named(method_name)
    return f"{weights} + {UNTRAINED_PREDICTORS}" if run is not None and run.untrained_predictors else weights


def export_frame(frame: pd.DataFrame, comparison: ReductionComparison, model: str, weights: str,
                 image: str | Sequence[str] | None = None) -> pd.DataFrame:
    """``frame`` as the page exports it: model, weights, image(s) and every setting on each row. A frame with a
    ``method`` column also gets each row's own setting and weights (``weights`` is the backbone's: only the rows of
    a method with attached untrained predictors name them)."""
    settings = reduction_settings(comparison)
    if "method" in frame.columns:
        methods = frame["method"].tolist()
        settings = {"setting": [method_setting(comparison, m) for m in methods], **settings}
        weights = [method_weights(comparison, m, weights) for m in methods]
    return label_rows(frame, model, weights, image, settings)


def run_title(run: MethodRun, model: str, weights: str, image: str) -> str:
    """A picture's title line: the method and its settings, then model, weights and image."""
    return f"{run.name} {run.setting_text()} | " + title_line(model, weights, image)


# --------------------------------------------------------------------------------------------
# Tokens per block
# --------------------------------------------------------------------------------------------
def tokens_per_block(comparison: ReductionComparison) -> dict[str, list[int]]:
    """Per block and method: tokens entering it (CLS included) or, for a structured model, the positions
    that take its full path."""
    series = {NO_REDUCTION: list(comparison.unreduced_tokens)}
    for run in comparison.runs.values():
        series[run.name] = run.figures.tokens_per_block(run.trace, comparison.unreduced_tokens)
    return series


# --------------------------------------------------------------------------------------------
# Agreement as the main setting changes (any method)
# --------------------------------------------------------------------------------------------
def sweep_values(setting: Setting, largest: Any = None) -> list[Any]:
    """The values a sweep of ``setting`` runs: whole numbers from 0 to ``largest``; otherwise its choices and the
    value that reduces nothing (1.0), from least to most reduction."""
    if all(isinstance(c, int) for c in setting.choices):
        return list(range(0, int(largest if largest is not None else max(setting.choices)) + 1))
    return sorted(set(setting.choices) | {1.0}, reverse=True)


def setting_sweep(model: torch.nn.Module, batch: torch.Tensor, method: Method, settings: dict[str, Any],
                  values: Sequence[Any], unreduced_tokens: Sequence[int],
                  progress: Callable[[float, str], None] | None = None, schedule: str | None = None) -> pd.DataFrame:
    """For each value of the method's main setting (its other settings as in ``settings``): top-1 agreement and
    top-5 overlap with the unreduced model, tokens entering the last block, GFLOPs per image. The model is only
    read. Column ``value`` holds the main setting; ``unreduced_tokens`` is the comparison's. A main setting with
    schedules (ToMe's r) runs each value in ``schedule`` (default: its first form), named in column ``schedule``."""
    main = method.main_setting
    schedule = (schedule or main.schedules[0]) if main.schedules else None
    batch = batch.to(_device(model))
    rows = []
    with torch.inference_mode():
        reference, _ = count_gflops(lambda: model(batch))
        for done, value in enumerate(values, start=1):
            run = method.bind(model, {**settings, main.key: main.scheduled(value, schedule)})
            (logits, trace), gflops = count_gflops(lambda: run(batch, return_trace=True))
            trace = prepared_trace(trace, tuple(batch.shape[-2:]))
            counts = figures_for(trace).tokens_per_block(trace, list(unreduced_tokens))
            rows.append({"value": value, **({"schedule": schedule} if schedule else {}),
                         "top1_agreement": top1_agreement(reference, logits),
                         "top5_overlap_mean": top5_overlap(reference, logits), "tokens_last_block": counts[-1],
                         "gflops_per_image": gflops / batch.shape[0]})
            if progress is not None:
                progress(done / len(values), f"{main.symbol} = {value} ({done}/{len(values)})")
    return pd.DataFrame(rows)


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


# --------------------------------------------------------------------------------------------
# EViT maps: the patches still a token of their own after each stage, and the class token's attention
# --------------------------------------------------------------------------------------------
def evit_stage_panels(canvas: Image.Image, trace: EViTTrace, image: int) -> list[tuple[str, Image.Image]]:
    """The input and, per stage, the patches still a token of their own (the others faded: fused or dropped)."""
    panels = [("input", canvas)]
    for block, own in zip(trace.prune_blocks, trace.own_token):
        what = "fused" if trace.fuse else "dropped"
        panels.append((f"block {block}: {int(own[image].sum())} kept, {int((~own[image]).sum())} {what}",
                       fade_dropped_patches(canvas, own[image], trace.grid_size, cell_borders=True)))
    return panels


def evit_attention_figure(trace: EViTTrace, image: int, title: str) -> go.Figure:
    """Per stage, the class token's attention (mean over heads) to each patch's token, on the patch grid (log
    colour scale: a few patches take most of it). Blank: dropped earlier (without fusion)."""
    titles = [f"block {b}: {k} kept" for b, k in zip(trace.prune_blocks, trace.kept_counts)]
    figure = make_subplots(rows=1, cols=len(trace.attention), subplot_titles=titles, horizontal_spacing=0.03)
    for stage, attention in enumerate(trace.attention):
        values = np.log10(np.clip(attention[image].reshape(trace.grid_size), 1e-6, None))
        figure.add_trace(go.Heatmap(z=values, colorscale="Viridis", showscale=stage == len(trace.attention) - 1,
                                    colorbar=dict(title="log10 attn"),
                                    hovertemplate="row %{y}, col %{x}: 10^%{z:.2f}<extra></extra>"),
                         row=1, col=stage + 1)
        figure.update_yaxes(autorange="reversed", scaleanchor=f"x{stage + 1 if stage else ''}", showticklabels=False,
                            row=1, col=stage + 1)
        figure.update_xaxes(showticklabels=False, row=1, col=stage + 1)
    figure.update_annotations(font_size=11)
    figure.update_layout(title=title, height=340, margin=dict(t=80, b=10))
    return figure


def evit_kept_frame(trace: EViTTrace, image_names: Sequence[str]) -> pd.DataFrame:
    """One row per image and stage: the patches still a token of their own (row-major indices), space-separated."""
    rows = []
    for stage, (block, own) in enumerate(zip(trace.prune_blocks, trace.own_token)):
        for image, name in enumerate(image_names):
            indices = np.flatnonzero(own[image])
            rows.append({"image": name, "stage": stage + 1, "block": block, "kept": len(indices),
                         "fused": trace.fuse and len(indices) < own.shape[1], "kept_indices": " ".join(map(str, indices))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Each method's figures, found by its trace's type: what the page draws for a run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Picture:
    """An image overlay the page shows and offers as a PNG."""
    image: Image.Image
    caption: str
    file: str
    label: str


@dataclass(frozen=True)
class Chart:
    figure: go.Figure
    key: str


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Table:
    """A table the page offers as a CSV, every row labelled with model, weights (the run's) and settings."""
    frame: pd.DataFrame
    file: str
    label: str


@dataclass(frozen=True)
class Choice:
    """A multiselect a method's detail view needs (ToMe: after which blocks to draw merge maps)."""
    name: str
    label: str
    options: list
    default: list


@dataclass(frozen=True)
class View:
    """Where a run's pictures come from: the chosen image (index and name, its canvas at the model's input size),
    the model, the weights of the run (untrained predictors named), the tags its headings carry, the picked
    values of its ``Choice``s."""
    canvas: Image.Image
    image: int
    image_name: str
    model: str
    weights: str
    tag: str = ""
    picked: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodFigures:
    """What a trace type draws. ``summary`` is its side-by-side picture and caption; ``detail`` its section for the
    chosen image; ``over_images`` what it draws over the whole batch."""
    tokens_per_block: Callable[[Any, list[int]], list[int]]
    summary: Callable[[MethodRun, View], tuple[Image.Image, str]]
    heading: Callable[[MethodRun], str]
    detail: Callable[[MethodRun, View], list]
    over_images: Callable[[MethodRun, Sequence[str], str], list] = lambda run, names, tag: []
    choices: Callable[[MethodRun, int], list[Choice]] = lambda run, depth: []
    structured: Callable[[Any], bool] = lambda trace: False


def _value_text(run: MethodRun) -> str:
    value = run.main_value
    return f"{run.method.main_setting.symbol} = {value:.2f}" if isinstance(value, float) else \
        run.method.main_setting.describe(value)


def _pruning_summary(run: MethodRun, view: View) -> tuple[Image.Image, str]:
    trace, last = run.trace, run.trace.kept_counts[-1]
    what = (f"{last} positions on the full MLP path after the last predictor" if not trace.nested
            else f"{last} patches kept after the last stage")
    untrained = " (untrained predictors)" if run.untrained_predictors else ""
    return dynamicvit_stage_panels(view.canvas, trace, view.image)[-1][1], f"{what} ({_value_text(run)}){untrained}"


def _pruning_detail(run: MethodRun, view: View) -> list:
    trace, value = run.trace, run.main_value
    symbol = run.method.main_setting.symbol
    strip = image_strip(dynamicvit_stage_panels(view.canvas, trace, view.image),
                        title=run_title(run, view.model, view.weights, view.image_name))
    items: list = [Picture(strip, stage_maps_caption(trace),
                           file_name("dynamicvit_stages", view.model, f"{symbol}{value:g}", view.image_name),
                           "Download stage maps (PNG)"),
                   Chart(keep_score_figure(trace, view.image, title=f"{run.method.label} keep scores per stage, "
                                           f"{symbol} {value:.2f}: {view.image_name}{view.tag}"), "keep_scores")]
    narrow = keep_score_note(trace, view.image)
    return items + ([Note(narrow)] if narrow else [])


def _pruning_over_images(run: MethodRun, names: Sequence[str], tag: str) -> list:
    trace, symbol = run.trace, run.method.main_setting.symbol
    items: list = []
    if len(names) > 1:
        kept_what = "takes the full path" if not trace.nested else "is kept"
        items.append(Chart(keep_frequency_by_stage_figure(
            trace, f"How often each position {kept_what} at each stage, {symbol} {run.main_value:.2f}, over "
                   f"{len(names)} images{tag}"), "keep_frequency"))
    items.append(Table(kept_indices_frame(trace, names), "dynamicvit_kept_indices.csv",
                       "Download kept indices per image and stage (CSV)"))
    return items


def _tome_summary(run: MethodRun, view: View) -> tuple[Image.Image, str]:
    trace = run.trace
    last = len(trace.tokens_per_layer) - 1
    return (tome_merge_panels(view.canvas, trace, [last], view.image)[-1][1],
            f"merge groups after the last block ({trace.tokens_per_layer[-1]} tokens)")


def _tome_choices(run: MethodRun, depth: int) -> list[Choice]:
    return [Choice("layers", "Show merge maps after blocks", list(range(depth)),
                   sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}))]


def _tome_detail(run: MethodRun, view: View) -> list:
    layers = sorted(view.picked.get("layers", []))
    strip = image_strip(tome_merge_panels(view.canvas, run.trace, layers, view.image),
                        title=run_title(run, view.model, view.weights, view.image_name))
    r_text = str(run.main_value)
    return [Picture(strip, "Each group of merged patches in its mean colour",
                    file_name("tome_merge_maps", view.model, f"r{r_text}", view.image_name),
                    "Download merge maps (PNG)")]


def _evit_summary(run: MethodRun, view: View) -> tuple[Image.Image, str]:
    trace = run.trace
    own = trace.own_token[-1][view.image] if trace.own_token else np.ones(np.prod(trace.grid_size), dtype=bool)
    rest = "fused into one token" if trace.fuse else "dropped"
    return (fade_dropped_patches(view.canvas, own, trace.grid_size),
            f"{int(own.sum())} patches still tokens of their own after the last stage, {int((~own).sum())} {rest} "
            f"({_value_text(run)})")


def _evit_detail(run: MethodRun, view: View) -> list:
    trace = run.trace
    if not trace.own_token:
        return [Note(f"At {_value_text(run)} EViT keeps every token.")]
    strip = image_strip(evit_stage_panels(view.canvas, trace, view.image),
                        title=run_title(run, view.model, view.weights, view.image_name))
    rest = ("fused into one extra token, their sum weighted by that attention" if trace.fuse else "dropped")
    caption = (f"In blocks {', '.join(map(str, trace.prune_blocks))} (0-based) the patches the class token attends "
               f"to most stay (bright); the others (faded) are {rest}. No predictor is trained: the ranking is the "
               "pretrained model's own attention.")
    return [Picture(strip, caption, file_name("evit_stages", view.model, f"keep{run.main_value:g}", view.image_name),
                    "Download EViT stage maps (PNG)"),
            Chart(evit_attention_figure(trace, view.image, f"EViT: the class token's attention per stage, keep rate "
                                        f"{run.main_value:.2f}: {view.image_name}{view.tag}"), "evit_attention")]


def _evit_over_images(run: MethodRun, names: Sequence[str], tag: str) -> list:
    trace = run.trace
    items: list = []
    if len(names) > 1 and trace.own_token:
        frequency = trace.own_token[-1].reshape(-1, *trace.grid_size).mean(0)
        items.append(Chart(keep_frequency_figure(frequency, f"How often each patch is still its own token after the "
                                                 f"last EViT stage, over {len(names)} images{tag}"), "evit_frequency"))
    if trace.own_token:
        items.append(Table(evit_kept_frame(trace, names), "evit_kept_indices.csv",
                           "Download EViT's kept patches per image and stage (CSV)"))
    return items


def _stage_heading(run: MethodRun) -> str:
    what = "pruned patches per stage" if run.trace.nested else "positions on the full path per stage"
    return f"{run.method.label}: {what}"


FIGURES: dict[type, MethodFigures] = {
    DynamicStageTrace: MethodFigures(
        tokens_per_block=lambda trace, unreduced: list(trace.tokens_per_block), summary=_pruning_summary,
        heading=_stage_heading, detail=_pruning_detail, over_images=_pruning_over_images,
        structured=lambda trace: not trace.nested),
    ToMeTrace: MethodFigures(
        tokens_per_block=lambda trace, unreduced: [unreduced[0]] + trace.tokens_per_layer[:-1],  # merged in-block
        summary=_tome_summary, heading=lambda run: f"{run.method.label}: merged tokens per block",
        detail=_tome_detail, choices=_tome_choices),
    EViTTrace: MethodFigures(
        tokens_per_block=lambda trace, unreduced: list(trace.tokens_per_block), summary=_evit_summary,
        heading=lambda run: f"{run.method.label}: kept and fused patches per stage", detail=_evit_detail,
        over_images=_evit_over_images),
}


def prepared_trace(trace: Any, image_size: tuple[int, int]) -> Any:
    """A forward's trace as its figures read it: DeiT's DynamicViT trace becomes a ``DynamicStageTrace``."""
    return as_stage_trace(trace, image_size) if isinstance(trace, DynamicViTTrace) else trace


def figures_for(trace: Any) -> MethodFigures:
    try:
        return FIGURES[type(trace)]
    except KeyError:
        raise TypeError(f"No figures for a {type(trace).__name__}: add them to analysis.token_reduction.FIGURES.") \
            from None
