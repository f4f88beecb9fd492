"""The token-reduction computation and what is read from it: each method's run beside the unreduced model, predictions
and agreement, the settings every export names, tokens per block and the sweep of a method's main setting.

Every fact about a trace (tokens per block, whether it is structured) is asked of the trace itself
(``models.traces.ReductionTrace``): nothing here reads figure code."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from timm.models.vision_transformer import VisionTransformer

from analysis.data.images import imagenet_label
from analysis.provenance import UNTRAINED_PREDICTORS, label_rows, title_line
from analysis.token_reduction.metrics import count_gflops, top1_agreement, top5_overlap
from models.dynamic_zoo import as_stage_trace
from models.dynamicvit import DynamicViTTrace
from models.methods import Method, Setting
from models.vit_forward import token_count

NO_REDUCTION = "no reduction"


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
        return any(run.trace.structured for run in self.runs.values())

    def run_named(self, name: str) -> MethodRun | None:
        return next((run for run in self.runs.values() if run.name == name), None)

    def logits_by_method(self) -> dict[str, torch.Tensor]:
        return {NO_REDUCTION: self.reference_logits, **{run.name: run.logits for run in self.runs.values()}}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepared_trace(trace: Any, image_size: tuple[int, int]) -> Any:
    """A forward's trace as the comparison and its figures read it: DeiT's DynamicViT trace becomes a
    ``DynamicStageTrace``."""
    return as_stage_trace(trace, image_size) if isinstance(trace, DynamicViTTrace) else trace


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
    return logits.float().cpu(), trace.counts_per_block([])


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
        series[run.name] = run.trace.counts_per_block(comparison.unreduced_tokens)
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
            counts = trace.counts_per_block(list(unreduced_tokens))
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
