"""The vision-language frontier's variants (from the method table), its points with bootstrap intervals, its
per-question answers and its chart (``analysis.runs.vqa_frontier`` runs them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.runs.frontier import add_pareto_trace, json_records, log_ticks, score_interval
from models.methods import (
    METHODS,
    MODEL_SETTING_KEYS,
    SIZE_KEY,
    Method,
    method_of,
    methods_for,
)
from models.registry import get_spec
from models.variants import parse_settings, parse_variant, settings_text

UNREDUCED = "unreduced"
ACCURACY = "VQA accuracy"
AGREEMENT = "agreement with the unreduced model's answer (not accuracy)"
RESAMPLES, CONFIDENCE, SEED = 1000, 0.95, 0
INTERVAL = (f"{CONFIDENCE:.0%} percentile bootstrap over the questions ({RESAMPLES} resamples, seed {SEED}); drops: "
            f"paired (the same resampled questions for the variant and the unreduced model)")
CLAIM = 0.01  # PuMer: within 1 point of the unreduced model's VQA accuracy


@dataclass(frozen=True)
class VQAVariant:
    """One point: a variant name of the method table and how the chart and tables name it."""

    name: str  # "vilt_b32_vqa" (unreduced) or "vilt_b32_vqa@pumer,prune=0"
    method: str  # UNREDUCED or a key of models.methods.METHODS
    label: str  # "PuMer (paper setting)", "PuMer: merging only", "ToMe r=8"
    series: str  # the chart's series: "unreduced", "PuMer", "PuMer ablations", ...


def _describe(method: Method, settings: dict[str, Any]) -> tuple[str, str]:
    """(label, series) of a method's settings: one of its ablations, its paper setting, or the settings in words;
    at another input size (a model setting), "at 320 px" added and a series of its own."""
    size = settings.get(SIZE_KEY)
    if method.model_setting:
        return f"{method.label} {size} px", method.label
    if size is not None:
        label, series = _describe(method, {k: v for k, v in settings.items() if k not in MODEL_SETTING_KEYS})
        return f"{label} at {size} px", f"{series} at {size} px"
    for name, text in method.ablations:
        if parse_settings(text) == settings:
            return f"{method.label}: {name}", f"{method.label} ablations"
    paper = method.paper_flag is not None and method.paper_flag in settings
    others = {k: v for k, v in settings.items() if k != method.paper_flag}
    if paper and not others:
        return f"{method.label} (paper setting)", method.label
    words = method.describe(others)
    return (f"{method.label} paper setting, {words}" if paper else f"{method.label} {words}"), method.label


def variant_of(model_name: str, text: str) -> VQAVariant:
    """A variant of ``model_name`` from its name (``NAME@settings``), the part after ``@`` alone, or ``unreduced``;
    ValueError naming what is wrong (another model, settings of no method, a method that does not apply)."""
    text = text.strip()
    name = model_name if text in (UNREDUCED, model_name) else (text if "@" in text else f"{model_name}@{text}")
    try:
        variant = parse_variant(name)
    except KeyError as exc:
        raise ValueError(f"Variant {text!r}: {exc.args[0] if exc.args else exc}") from None
    if variant.model != model_name:
        raise ValueError(f"Variant {text!r} is of {variant.model}, and this run answers with {model_name}.")
    if not variant.settings:
        return VQAVariant(model_name, UNREDUCED, UNREDUCED, UNREDUCED)
    spec = get_spec(model_name)
    method = method_of(variant.settings, spec)
    if not method.applies_to(spec):
        raise ValueError(f"Variant {text!r}: {method.label} does not apply to {model_name} ({spec.family}).")
    try:
        method.arguments(variant.settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Variant {text!r}: a setting's value does not parse ({exc}).") from None
    label, series = _describe(method, variant.settings)
    return VQAVariant(variant.label, method.key, label, series)


def _arguments(variant: VQAVariant) -> tuple:
    if variant.method == UNREDUCED:
        return (UNREDUCED,)
    parsed = parse_variant(variant.name)
    arguments = METHODS[variant.method].arguments(parsed.settings)
    return (variant.method, parsed.input_size, *sorted(arguments.items()))  # the size: a setting of no forward


def default_variants(model_name: str) -> list[VQAVariant]:
    """The unreduced model, then each method of the table that runs on the model: its paper setting (where it has
    one), its main setting's picks (on top of the paper setting) and its ablations; a variant whose forward
    arguments repeat an earlier one's is left out."""
    texts = [UNREDUCED]
    for method in methods_for(get_spec(model_name)):
        base = [method.paper_flag] if method.paper_flag else []
        setting = method.main_setting
        texts += base + [",".join(base + [f"{setting.key}={value}"])
                         for value in (setting.picks or setting.choices[:3])]
        texts += [text for _, text in method.ablations]
    chosen: dict[tuple, VQAVariant] = {}
    for variant in (variant_of(model_name, t) for t in texts):
        chosen.setdefault(_arguments(variant), variant)
    return list(chosen.values())


def variant_text(variant: VQAVariant) -> str:
    """What follows the ``@`` (``unreduced`` for the model itself): how the CLI's --variants and the page write it."""
    settings = parse_variant(variant.name).settings
    return settings_text(settings) if settings else UNREDUCED


# ----------------------------------------------------------------------------- statistics

def bootstrap(per_question: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
    """Percentile bootstrap over the questions (columns) of every variant's (row's) mean, and of each variant's
    drop from the first row (paired: the same resampled questions for both). Each key holds one value per row."""
    variants, questions = per_question.shape
    if questions == 0:
        nan = np.full(variants, np.nan)
        return {"ci_low": nan, "ci_high": nan, "drop_ci_low": nan, "drop_ci_high": nan}
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, variants))
    chunk = max(1, 4_000_000 // (questions * variants))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        picks = rng.integers(0, questions, (rows, questions))
        means[start:start + rows] = per_question[:, picks].mean(axis=-1).T
    drops = means[:, :1] - means
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail], axis=0)
    drop_low, drop_high = np.quantile(drops, [tail, 1 - tail], axis=0)
    return {"ci_low": low, "ci_high": high, "drop_ci_low": drop_low, "drop_ci_high": drop_high}


def points_frame(record) -> pd.DataFrame:
    """One row per variant: the score (VQA accuracy or agreement) with its interval, the drop from the unreduced
    model with its paired interval, agreement with the unreduced model, and the timing where it was measured."""
    per_question = record.per_question()
    score = per_question.mean(axis=1) if per_question.shape[1] else np.full(len(record.variants), np.nan)
    intervals = bootstrap(per_question)
    reference = record.predicted[0]
    seen = np.flatnonzero(record.seen)
    agreement = [np.mean([p[i] == reference[i] for i in seen]) if len(seen) else np.nan for p in record.predicted]
    frame = pd.DataFrame({
        "model": record.model, "weights": record.weights, "variant": [v.name for v in record.variants],
        "setting": [v.label for v in record.variants], "series": [v.series for v in record.variants],
        "method": [v.method for v in record.variants], "metric": record.metric,
        "questions": per_question.shape[1], "score": score, "ci_low": intervals["ci_low"],
        "ci_high": intervals["ci_high"], "drop": score[0] - score, "drop_ci_low": intervals["drop_ci_low"],
        "drop_ci_high": intervals["drop_ci_high"], "agreement": agreement, "interval": INTERVAL})
    if record.speed is not None:
        frame = frame.merge(record.speed, on="variant", how="left")
    return frame


def answers_frame(record) -> pd.DataFrame:
    """One row per question: what it asked about which image, the annotators' answers, and each variant's answer
    (and VQA accuracy, where the question has answers)."""
    frame = pd.DataFrame({
        "line": np.arange(1, len(record.questions) + 1), "question_id": [q.question_id for q in record.questions],
        "image": [q.image for q in record.questions], "question": [q.question for q in record.questions],
        "answers": ["|".join(q.answers) for q in record.questions], "scored": record.seen})
    labelled = record.labelled
    for index, variant in enumerate(record.variants):
        frame[f"{variant.name} answer"] = record.predicted[index]
        if labelled.any():
            frame[f"{variant.name} accuracy"] = np.where(labelled, record.scores[index], np.nan)
    return frame


def to_json(points: pd.DataFrame, meta: dict) -> dict:
    return {**meta, "interval": INTERVAL, "points": json_records(points)}


# ----------------------------------------------------------------------------- the chart

def _hover(row: Any, has_speed: bool) -> str:
    text = (f"{row.setting}<br>{row.variant}<br>{row.metric}: {row.score:.1%} [{row.ci_low:.1%}, {row.ci_high:.1%}]"
            f" on {row.questions} questions<br>drop from unreduced: {row.drop:+.1%} "
            f"[{row.drop_ci_low:+.1%}, {row.drop_ci_high:+.1%}]")
    if has_speed:
        text += f"<br>{row.img_per_s:.1f} questions/s" + (f", {row.speedup:.2f}x" if pd.notna(row.speedup) else "")
        if pd.notna(getattr(row, "peak_mem_mib", np.nan)):
            text += f"<br>peak memory {row.peak_mem_mib:.0f} MiB"
    return text


def vqa_frontier_figure(points: pd.DataFrame, title: str = "") -> go.Figure:
    """VQA accuracy (or agreement) against questions per second: one colour per series (the unreduced model, each
    method, its ablations), bootstrap intervals, the measured Pareto frontier, and a line one point below the
    unreduced model (PuMer's claim: within it)."""
    fig = go.Figure()
    if points.empty:
        return fig
    data = points.copy()
    has_speed = "img_per_s" in data and data["img_per_s"].notna().any()
    x_col = "img_per_s" if has_speed else "point"
    data["point"] = np.arange(len(data))
    for series, group in data.groupby("series", sort=False):
        fig.add_trace(go.Scatter(
            x=group[x_col], y=group["score"], mode="markers+text", name=series, text=group["setting"],
            textposition="top center", textfont=dict(size=9), marker=dict(size=10),
            hovertext=[_hover(r, has_speed) for r in group.itertuples()], hoverinfo="text",
            error_y=score_interval(group)))
    if has_speed:
        add_pareto_trace(fig, data, x_col)
    metric = str(data["metric"].iloc[0])
    if metric == ACCURACY:
        fig.add_hline(y=float(data["score"].iloc[0]) - CLAIM, line=dict(color="grey", dash="dash", width=1),
                      annotation_text="1 point below the unreduced model (PuMer: within it)",
                      annotation_position="bottom right")
    fig.update_layout(
        title=title or f"{data['model'].iloc[0]}: {metric} vs throughput on this machine", height=620,
        margin=dict(t=90, b=120), yaxis=dict(title=metric, tickformat=".1%"),
        xaxis=dict(title="questions per second on this machine (log)" if has_speed
                   else "variant (not timed)", type="log" if has_speed else "linear"),
        legend=dict(orientation="h", yanchor="top", y=-0.18))
    if has_speed:
        low, high = data[x_col].min() / 1.3, data[x_col].max() * 1.3
        values, texts = log_ticks(low, high)
        fig.update_layout(xaxis=dict(range=[np.log10(low), np.log10(high)], tickvals=values, ticktext=texts))
    return fig
