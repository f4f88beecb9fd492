"""Each method's figures, found by the type of its trace (``FIGURES``): what the page draws for a run. A new method
adds its figures here; the facts the computation needs come from its trace (``models.traces``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from analysis.provenance import file_name
from analysis.token_reduction.comparison import MethodRun, run_title
from analysis.token_reduction.pictures import (dynamicvit_stage_panels, evit_attention_figure, evit_kept_frame,
                                               evit_stage_panels, fade_dropped_patches, image_strip,
                                               keep_frequency_by_stage_figure, keep_frequency_figure,
                                               keep_score_figure, keep_score_note, kept_indices_frame,
                                               stage_maps_caption, tome_merge_panels)
from models.dynamic_zoo import DynamicStageTrace
from models.evit import EViTTrace
from models.tome import ToMeTrace


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
    summary: Callable[[MethodRun, View], tuple[Image.Image, str]]
    heading: Callable[[MethodRun], str]
    detail: Callable[[MethodRun, View], list]
    over_images: Callable[[MethodRun, Sequence[str], str], list] = lambda run, names, tag: []
    choices: Callable[[MethodRun, int], list[Choice]] = lambda run, depth: []


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
        summary=_pruning_summary, heading=_stage_heading, detail=_pruning_detail, over_images=_pruning_over_images),
    ToMeTrace: MethodFigures(
        summary=_tome_summary, heading=lambda run: f"{run.method.label}: merged tokens per block",
        detail=_tome_detail, choices=_tome_choices),
    EViTTrace: MethodFigures(
        summary=_evit_summary, heading=lambda run: f"{run.method.label}: kept and fused patches per stage",
        detail=_evit_detail, over_images=_evit_over_images),
}


def figures_for(trace: Any) -> MethodFigures:
    try:
        return FIGURES[type(trace)]
    except KeyError:
        raise TypeError(f"No figures for a {type(trace).__name__}: add them to "
                        "analysis.token_reduction.views.FIGURES.") from None
