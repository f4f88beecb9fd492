"""The accuracy-throughput frontier: every token-reduction setting of every chosen backbone, on the user's own
images and hardware.

Accuracy: top-1 against folder labels, or, without labels, top-1 agreement with the backbone's unreduced model
(labelled "agreement, not accuracy"). One pass over the images per backbone: each batch runs the unreduced model
once and every setting once (``FrontierTask``, the same accumulator in the app and under ``analysis.run``).
Throughput: the interleaved harness of ``analysis.timing.harness`` on the local device. Every point carries a Wilson
95 % interval: with 200 images, one point of accuracy is noise.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from analysis.data.folders import NO_LABEL
from analysis.runs.common import (
    DatasetTask,
    TaskModel,
    TaskOptions,
    add_sum,
    device_of,
    zeros,
)
from analysis.timing.harness import BenchSettings, Runner, benchmark
from analysis.timing.runners import image_inputs
from models.loading import LoadedModel
from models.methods import METHODS, Method, method_of, methods_for
from models.registry import REGISTRY, get_spec
from models.variants import (
    Variant,
    forward_for,
    parse_settings,
    parse_variant,
    settings_text,
)

FRONTIER = "frontier"
UNREDUCED = "unreduced"
UNTRAINED_PREDICTORS = "untrained predictors"
ACCURACY, AGREEMENT = "top-1 accuracy", "top-1 agreement with the unreduced model (not accuracy)"


@dataclass(frozen=True)
class FrontierSetting:
    """One point of one backbone: a method (or none) at one value of its main setting, with any of its other
    settings given (the rest at their defaults)."""

    method: str  # UNREDUCED or a key of models.methods.METHODS
    value: Any = None
    # A method whose trained parts the backbone lacks (DynamicViT on a plain DeiT): freshly initialised score
    # predictors on the backbone's weights (not learned).
    untrained_predictors: bool = False
    others: tuple[tuple[str, Any], ...] = ()  # the method's other settings given: (("fuse", False),)

    @property
    def settings(self) -> dict[str, Any]:
        """Every given setting by key, main first, as a variant name holds them."""
        return {METHODS[self.method].main_setting.key: self.value, **dict(self.others)}

    @property
    def label(self) -> str:
        if self.method == UNREDUCED:
            return UNREDUCED
        method = METHODS[self.method]
        text = f"{method.label} {method.main_setting.symbol}={self.value}"
        text += f", {method.describe(dict(self.others))}" if self.others else ""
        return text + (f" ({UNTRAINED_PREDICTORS})" if self.untrained_predictors else "")

    def variant(self, model: str) -> str:
        return model if self.method == UNREDUCED else Variant(model, self.settings).label

    @staticmethod
    def parse(text: str) -> "FrontierSetting":
        """``unreduced``, or a method's settings as a variant name writes them after its ``@`` (``tome=8``,
        ``tome=decreasing:13``, ``evit=0.7,fuse=off``; the main one at its default when not given), and
        ``:untrained`` at the end for untrained parts attached (``rho=0.7:untrained`` on a plain DeiT)."""
        if text == UNREDUCED:
            return FrontierSetting(UNREDUCED)
        untrained = text.endswith(":untrained")
        settings = parse_settings(text.removesuffix(":untrained"))
        if not settings or "" in settings.values():
            known = ", ".join(dict.fromkeys(m.main_setting.key for m in METHODS.values()))
            raise ValueError(f"Setting {text!r}: write unreduced or KEY=VALUE[,KEY=VALUE] with KEY one of {known} "
                             f"(and the method's other settings).")
        try:
            method = method_of(settings)
        except ValueError as exc:
            raise ValueError(f"Setting {text!r}: {exc}") from None
        order = [s.key for s in method.settings] + [method.paper_flag]
        parsed = {}
        for key, value in sorted(settings.items(), key=lambda item: order.index(item[0])):
            setting = next((s for s in method.settings if s.key == key), None)
            try:
                parsed[key] = setting.parse(value) if setting else value
            except ValueError:
                raise ValueError(f"Setting {text!r}: {key}={value} is not a {setting.label}.") from None
        main = method.main_setting
        value = parsed.pop(main.key, main.default)
        return FrontierSetting(method.key, value, untrained, tuple(parsed.items()))

    def text(self) -> str:
        if self.method == UNREDUCED:
            return UNREDUCED
        return settings_text(self.settings) + (":untrained" if self.untrained_predictors else "")


def settings_methods(model_name: str) -> list[Method]:
    """Methods that give points for a backbone: those of its family, and those that run on it with untrained parts
    attached (the method table's ``attachable_to``: DynamicViT's predictors on a DeiT)."""
    spec = get_spec(model_name)
    return methods_for(spec) + [m for m in METHODS.values() if m.needs_attachment(spec)]


def setting_points(model_name: str, values: dict[str, Sequence[Any]] | None = None,
                   schedules: Sequence[str] = ()) -> list[FrontierSetting]:
    """The unreduced model plus each of its methods at ``values[method.key]`` (default: the main setting's
    ``picks``), each value also in every other form named in ``schedules`` that the setting has (ToMe's
    decreasing schedule). A method that needs untrained parts attached says so in its points."""
    spec = get_spec(model_name)
    points = [FrontierSetting(UNREDUCED)]
    for method in settings_methods(model_name):
        setting = method.main_setting
        untrained = method.needs_attachment(spec)
        for value in (values or {}).get(method.key, setting.picks or setting.choices[:3]):
            points.append(FrontierSetting(method.key, value, untrained))
            points += [FrontierSetting(method.key, setting.scheduled(value, form), untrained)
                       for form in setting.schedules[1:] if form in schedules]
    return points


def default_settings(model_name: str) -> list[FrontierSetting]:
    """The unreduced model plus each applicable method at its default picks (the CLI's points)."""
    return setting_points(model_name)


# ----------------------------------------------------------------------------- forwards for the settings

@functools.lru_cache(maxsize=8)
def _with_untrained_parts(method_key: str, backbone: nn.Module) -> nn.Module:
    return METHODS[method_key].with_untrained_parts(backbone, seed=0)


def setting_forward(model: nn.Module, model_name: str, setting: FrontierSetting) -> Callable[[torch.Tensor], Any]:
    """The forward of ``setting`` on ``model``, which is never changed (untrained parts go on a copy)."""
    if setting.method == UNREDUCED:
        return model
    method = METHODS[setting.method]
    if setting.untrained_predictors:
        return method.bind(_with_untrained_parts(method.key, model), setting.settings)
    if method.needs_attachment(get_spec(model_name)):
        raise ValueError(f"{setting.text()} needs a {method.label} model, and {model_name} is a plain backbone: write "
                         f"{setting.text()}:untrained to attach untrained (seeded) score predictors to it.")
    return forward_for(model, model_name, parse_variant(setting.variant(model_name)))


def _is_neutral(setting: FrontierSetting) -> bool:
    if setting.method == UNREDUCED:
        return True
    method = METHODS[setting.method]
    return method.arguments(setting.settings) == method.neutral_arguments


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


# ----------------------------------------------------------------------------- the accumulator

@dataclass
class FrontierRecord:
    """Per setting of one backbone: images seen, correct top-1 (labelled images only), agreement with unreduced."""

    model: str
    weights: str  # the weights source, e.g. "local file .../deit_tiny_patch16_224.safetensors" or RANDOM
    settings: list[FrontierSetting]
    images: int
    labelled: int
    correct: np.ndarray  # [settings]
    agree: np.ndarray  # [settings]

    @property
    def kind(self) -> str:
        return ACCURACY if self.labelled else AGREEMENT

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for i, s in enumerate(self.settings):
            hits, total = (int(self.correct[i]), self.labelled) if self.labelled else (int(self.agree[i]), self.images)
            low, high = wilson_interval(hits, total)
            rows.append({"model": self.model, "weights": self.weights, "setting": s.label,
                         "setting_key": s.text(), "method": s.method, "value": s.value, "metric": self.kind,
                         "hits": hits, "images": total, "score": hits / total if total else np.nan,
                         "ci_low": low, "ci_high": high,
                         "agreement": self.agree[i] / self.images if self.images else np.nan})
        return pd.DataFrame(rows)


class FrontierTask(DatasetTask):
    """Top-1 per setting of one backbone, all settings evaluated on each batch of one pass over the images."""

    name = FRONTIER
    files = ("frontier.csv",)

    def __init__(self, model: nn.Module, model_name: str, settings: Sequence[FrontierSetting], note: str = "",
                 weights: str = "") -> None:
        super().__init__(model_name, note)
        self.model = model
        self.weights = weights or note
        self.points = list(settings)
        # The unreduced logits serve every setting that reduces nothing (ToMe r = 0, rho = 1): no second forward.
        self.forwards = [None if _is_neutral(s) else setting_forward(model, model_name, s) for s in self.points]
        device = device_of(model)
        n = len(self.points)
        self.sums = {"images": zeros(device=device), "labelled": zeros(device=device),
                     "correct": zeros(n, device=device), "agree": zeros(n, device=device)}

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        return {"frontier_settings": list(options.frontier_settings)}

    @classmethod
    def build(cls, subject: TaskModel, options: TaskOptions) -> "FrontierTask":
        points = ([FrontierSetting.parse(t) for t in options.frontier_settings] if options.frontier_settings
                  else default_settings(subject.name))
        return cls(subject.model, subject.name, points, subject.note, subject.weights)

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(images.device)
        has_label = labels != NO_LABEL
        correct = torch.zeros(len(self.points), dtype=torch.float64)
        agree = torch.zeros(len(self.points), dtype=torch.float64)
        with torch.inference_mode():
            reference = _logits(self.model(images)).argmax(-1)
            for i, forward in enumerate(self.forwards):
                predicted = reference if forward is None else _logits(forward(images)).argmax(-1)
                correct[i] = float(((predicted == labels) & has_label).sum())
                agree[i] = float((predicted == reference).sum())
        add_sum(self.sums, "correct", correct)
        add_sum(self.sums, "agree", agree)
        add_sum(self.sums, "images", images.shape[0])
        add_sum(self.sums, "labelled", float(has_label.sum()))

    def result(self, sums: dict[str, torch.Tensor]) -> FrontierRecord:
        return FrontierRecord(self.model_name, self.weights, self.points, int(sums["images"].item()),
                              int(sums["labelled"].item()), sums["correct"].cpu().numpy(),
                              sums["agree"].cpu().numpy())

    @staticmethod
    def write(record: FrontierRecord | pd.DataFrame, out: Path) -> list[str]:
        """The record's points (or the points ``load`` read back) as frontier.csv."""
        frame = record if isinstance(record, pd.DataFrame) else record.to_frame()
        frame.to_csv(out / "frontier.csv", index=False)
        return list(FrontierTask.files)

    @staticmethod
    def load(folder: Path, run: dict) -> pd.DataFrame:
        frame = pd.read_csv(folder / "frontier.csv")
        unknown = sorted(set(frame["method"].astype(str)) - {UNREDUCED, *METHODS})
        if unknown:  # the chart names each series from the method table
            raise ValueError(f"its method column names {', '.join(map(repr, unknown))}, which the method table does "
                             f"not know ({', '.join([UNREDUCED, *METHODS])})")
        return frame

    @staticmethod
    def figures(frame: pd.DataFrame) -> dict[str, go.Figure]:
        return {"frontier": frontier_figure(frame)}


def evaluate(loaded: LoadedModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             settings: Sequence[FrontierSetting], progress: Callable[[float, str], None] | None = None,
             total: int | None = None) -> FrontierRecord:
    """The in-app run of ``FrontierTask``: ``batches`` of (images, labels with NO_LABEL where none)."""
    task = FrontierTask(loaded.model, loaded.name, settings, "random weights" if loaded.weights.is_random else "",
                        loaded.weights.description)
    device = device_of(loaded.model)
    for done, (images, labels) in enumerate(batches, start=1):
        task.update(images.to(device), labels)
        if progress:
            progress(done / total if total else 0.0, f"{loaded.name}: batch {done}" + (f"/{total}" if total else ""))
    return task.result(task.sums)


# ----------------------------------------------------------------------------- statistics

def wilson_interval(hits: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy); (nan, nan) for no trials."""
    from scipy.stats import binomtest  # here, not at the top: scipy.stats is 0.8 s of every dataset run's start

    if total <= 0:
        return float("nan"), float("nan")
    interval = binomtest(int(hits), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def pareto_front(frame: pd.DataFrame, x: str = "img_per_s", y: str = "score") -> pd.DataFrame:
    """Points no other point beats on both axes (higher is better on both), sorted by ``x``."""
    data = frame.dropna(subset=[x, y]).sort_values([x, y], ascending=[False, False])
    best_y, keep = -np.inf, []
    for index, row in data.iterrows():
        if row[y] > best_y:
            keep.append(index)
            best_y = row[y]
    return data.loc[keep].sort_values(x)


# ----------------------------------------------------------------------------- throughput of the settings

def setting_runners(loaded: LoadedModel, settings: Sequence[FrontierSetting]) -> list[Runner]:
    make_inputs = image_inputs(loaded)
    return [Runner(name=f"{loaded.name} | {s.label}", forward=setting_forward(loaded.model, loaded.name, s),
                   make_inputs=make_inputs, params=loaded.num_params, weights=loaded.weights.description)
            for s in settings]


def score_interval(group: pd.DataFrame) -> dict:
    """Plotly error bars from a frame's ``ci_low`` / ``ci_high`` around its ``score``."""
    return dict(type="data", symmetric=False, array=group["ci_high"] - group["score"],
                arrayminus=group["score"] - group["ci_low"], thickness=1)


def add_pareto_trace(fig: go.Figure, data: pd.DataFrame, x_col: str) -> None:
    """The measured Pareto frontier of ``score`` against ``x_col`` as a dotted line."""
    front = pareto_front(data, x_col, "score")
    fig.add_trace(go.Scatter(x=front[x_col], y=front["score"], mode="lines", name="Pareto frontier (measured)",
                             line=dict(color="black", dash="dot", width=2), hoverinfo="skip"))


def measure_throughput(loaded: LoadedModel, settings: Sequence[FrontierSetting], bench: BenchSettings,
                       progress: Callable[[float, str], None] | None = None) -> pd.DataFrame:
    """img/s (median of interleaved rounds, with its interquartile range), ms per batch and GFLOPs per image of
    each setting, and the timing environment (``env_*`` columns)."""
    runners = setting_runners(loaded, settings)
    rows = benchmark(runners, bench, progress=progress)
    return pd.DataFrame({"model": loaded.name, "setting_key": [s.text() for s in settings],
                         "img_per_s": [r.img_per_s for r in rows], "ms_per_batch": [r.ms_per_batch for r in rows],
                         "img_per_s_q1": [r.img_per_s_q1 for r in rows], "img_per_s_q3": [r.img_per_s_q3 for r in rows],
                         "batch": bench.batch, "device": bench.device,
                         "gflops": [r.gflops for r in rows],
                         **{f"env_{k}": v for k, v in rows[0].environment.items()}})


def join_points(accuracy: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    return accuracy.merge(speed, on=["model", "setting_key"], how="left")


# ----------------------------------------------------------------------------- published points

def paper_points() -> pd.DataFrame:
    """Registry models with a published ImageNet top-1 and V100 img/s (the papers' own hardware)."""
    rows = [{"model": name, "score": spec.top1 / 100.0, "img_per_s": spec.paper_img_s,
             "source": f"{spec.reference}" if spec.reference else "paper"}
            for name, spec in REGISTRY.items() if spec.top1 and spec.paper_img_s]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the chart

def _method_name(row: pd.Series) -> str:
    """The series of a point: backbone, method and the method's other settings (a line runs through its main one)."""
    method = "none" if row["method"] == UNREDUCED else METHODS[row["method"]].label
    others = str(row["setting_key"]).partition(",")[2].removesuffix(":untrained")  # as ``FrontierSetting.text``
    return f"{row['model']} · {method}" + (f" ({others})" if others else "")


PAPERS_PANEL = "The papers: ImageNet top-1 on a V100"


def log_ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """Readable ticks for a log axis from ``low`` to ``high``: 1, 2, 5 per decade (finer on a short range),
    written 0.5, 300, 1k, 20k (plotly's own on a short log range read '2 3 4 5 6 7 8 9 1 2')."""
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 7), tuple(range(1, 10))):
        values = [float(f"{m * 10.0 ** e:.6g}")
                  for e in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
                  for m in mantissas if low <= m * 10.0 ** e <= high]
        if len(values) >= 3:
            break
    texts = [f"{v / 1000:g}k" if v >= 1000 else f"{v:g}" for v in values]
    return values, texts


def _add_series(fig: go.Figure, data: pd.DataFrame, x_col: str, has_speed: bool) -> None:
    """One line per backbone and method through its settings (from the backbone's unreduced point), with Wilson
    intervals, and the Pareto frontier of the measured points."""
    for series, group in data.groupby("series", sort=False):
        group = group.sort_values(x_col)
        unreduced = data[(data["model"] == group["model"].iloc[0]) & (data["method"] == UNREDUCED)]
        if not group["method"].eq(UNREDUCED).all():
            group = pd.concat([unreduced, group]).drop_duplicates("setting_key").sort_values(x_col)
        hover = [f"{r.model}<br>{r.setting}<br>{r.metric}: {r.score:.1%} [{r.ci_low:.1%}, {r.ci_high:.1%}] "
                 f"of {r.images} images" + (f"<br>{r.img_per_s:.1f} img/s" if has_speed else "")
                 + (f"<br>{r.gflops:.2f} GFLOPs" if "gflops" in group and pd.notna(r.gflops) else "")
                 for r in group.itertuples()]
        fig.add_trace(go.Scatter(
            x=group[x_col], y=group["score"], mode="lines+markers", name=series, hovertext=hover, hoverinfo="text",
            error_y=score_interval(group)))
    if has_speed:
        add_pareto_trace(fig, data, x_col)


def _add_papers_panel(fig: go.Figure, papers: pd.DataFrame) -> None:
    """The papers' points on their own panel: another metric (ImageNet top-1, not agreement) on other hardware
    (V100, not this machine). Labels point inwards, so that none runs off the panel."""
    low, high = papers["img_per_s"].min() / 1.6, papers["img_per_s"].max() * 1.6
    middle = np.sqrt(low * high)
    fig.add_trace(go.Scatter(
        x=papers["img_per_s"], y=papers["score"], mode="markers+text", xaxis="x2", yaxis="y2",
        name="papers: ImageNet top-1 vs V100 img/s (right panel)", text=papers["model"],
        textposition=["middle left" if x > middle else "middle right" for x in papers["img_per_s"]],
        textfont=dict(size=10, color="grey"),
        marker=dict(symbol="circle-open", size=11, line=dict(width=2), color="grey"), visible=True,
        hovertext=[f"{r.model}: {r.score:.1%} top-1, {r.img_per_s:.0f} img/s<br>{r.source} (not this machine)"
                   for r in papers.itertuples()], hoverinfo="text"))
    values, texts = log_ticks(low, high)
    fig.update_layout(
        xaxis2=dict(title="papers' img/s (V100, not this machine)", type="log",
                    range=[np.log10(low), np.log10(high)], tickvals=values, ticktext=texts),
        yaxis2=dict(title="ImageNet top-1 (papers)", tickformat=".0%"))


def frontier_figure(points: pd.DataFrame, papers: pd.DataFrame | None = None, title: str = "") -> go.Figure:
    """Accuracy (or agreement) against img/s: one colour per backbone and method, lines through each method's
    settings, Wilson intervals and the Pareto frontier; the papers' points, when given, on a panel of their own
    (ImageNet top-1 against V100 img/s: another metric on other hardware, never on the measured axes)."""
    from plotly.subplots import make_subplots

    with_papers = papers is not None and not papers.empty
    metrics = points["metric"].unique() if not points.empty else []
    measured = "Measured here: your images, this machine"
    fig = (make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.1,
                         subplot_titles=(measured, PAPERS_PANEL)) if with_papers else go.Figure())
    if points.empty:
        return fig
    data = points.copy()
    has_speed = "img_per_s" in data and data["img_per_s"].notna().any()
    x_col = "img_per_s" if has_speed else "gflops_or_index"
    if not has_speed:
        data[x_col] = np.arange(len(data))
    data["series"] = data.apply(_method_name, axis=1)
    _add_series(fig, data, x_col, has_speed)
    fig.update_layout(
        title=title or "Accuracy vs throughput on this machine", height=640, margin=dict(t=110, b=120),
        xaxis=dict(title="img/s on this machine" if has_speed else "setting (no throughput measured yet)",
                   type="log" if has_speed else "linear"),
        yaxis=dict(title=" / ".join(metrics), tickformat=".0%"),
        legend=dict(orientation="h", yanchor="top", y=-0.2))
    if has_speed:
        low, high = data[x_col].min() / 1.3, data[x_col].max() * 1.3
        values, texts = log_ticks(low, high)
        fig.update_layout(xaxis=dict(range=[np.log10(low), np.log10(high)], tickvals=values, ticktext=texts))
    if with_papers:
        _add_papers_panel(fig, papers)
    return fig


def to_json(points: pd.DataFrame, meta: dict) -> dict:
    return {**meta, "points": json_records(points)}


def json_records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


