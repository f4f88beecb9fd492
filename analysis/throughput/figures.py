"""Charts and reference tables for throughput results, and the papers' claims to set beside them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from analysis.timing.engines import engine_of_row, over_eager, variant_of, within_engines
from analysis.timing.harness import LatencyRow, ThroughputRow, rows_to_dataframe
from models.registry import REGISTRY


@dataclass(frozen=True)
class SpeedupClaim:
    model: str  # regular expression over variant labels
    baseline: str
    speedup: str
    hardware: str
    source: str


CLAIMS = [
    SpeedupClaim(r"deit_small_patch16_224@tome=13(,|$)", "deit_small_patch16_224", "1.64x (953 -> 1564 img/s, ViT-S/16)",
                 "V100, off the shelf", "ToMe (ICLR 2023)"),
    SpeedupClaim(r"dynamicvit_deit_small_patch16_224@rho=0\.7$", "deit_small_patch16_224", "1.43-1.54x",
                 "GPU", "DynamicViT (NeurIPS 2021)"),
    SpeedupClaim(r"dynamicvit_deit_small_patch16_224@rho=0\.7$", "dynamicvit_deit_small_patch16_224", "1.43-1.54x",
                 "GPU", "DynamicViT (NeurIPS 2021)"),
    SpeedupClaim(r"vilt_b32_vqa@pumer", "vilt_b32_vqa", "1.7-2.0x, 35-51 % less memory", "GPU", "PuMer (ACL 2023)"),
    SpeedupClaim(r"efficientvit_m5$", "mobilenetv3_large_100", "1.40x GPU / 1.45x CPU", "V100 / Xeon CPU",
                 "EfficientViT (CVPR 2023)"),
]


def _base_name(label: str) -> str:
    return label.split("@", 1)[0]


def claimed_speedup(model: str, baseline: str) -> tuple[str, str, str]:
    """(claim, source, hardware) for a model/baseline pair, or the ratio of published V100 throughputs."""
    for claim in CLAIMS:
        if claim.baseline == baseline and re.search(claim.model, model):
            return claim.speedup, claim.source, claim.hardware
    ours, base = REGISTRY.get(model), REGISTRY.get(baseline)
    if "@" not in model and ours and base and ours.paper_img_s and base.paper_img_s:
        return f"{ours.paper_img_s / base.paper_img_s:.2f}x", "ratio of published img/s", "V100"
    return "", "", ""


def same_hardware(claim_hardware: str, hardware: str) -> bool:
    """Whether a claim measured on ``claim_hardware`` ('V100', 'GPU', 'V100 / Xeon CPU') was measured on the
    kind of machine ``hardware`` names (a GPU name from torch, or 'cpu'/'mps'). A named chip must appear in
    ``hardware``; an unnamed 'GPU' matches any GPU; a CPU claim never matches an unnamed CPU."""
    hardware = hardware.lower()
    on_gpu = hardware not in ("cpu", "mps", "")
    for part in re.split(r"[/,]", claim_hardware):
        words = part.split()
        if not words:
            continue
        chip = words[0].lower()
        if chip == "gpu":
            if on_gpu:
                return True
        elif chip in hardware:
            return True
    return False


def claim_text(claim: str, claim_hardware: str, hardware: str) -> str:
    """The claim with where it was measured, and 'not comparable' unless this run used that hardware."""
    if not claim:
        return ""
    where = claim_hardware.split(",")[0]
    return f"{claim} (paper, {where})" if same_hardware(claim_hardware, hardware) else \
        f"{claim} (paper, {where}, not comparable)"


def results_table(rows: Sequence[ThroughputRow], hardware: str = "cpu") -> pd.DataFrame:
    """Our measurements with the published top-1, V100 img/s and claimed speed-ups beside them; a claim made on
    other hardware than ``hardware`` (the GPU name, or 'cpu') is marked not comparable."""
    df = rows_to_dataframe(rows)
    if df.empty:
        return df
    specs = [REGISTRY.get(_base_name(m)) for m in df["model"]]
    df["published top-1"] = [s.top1 if s and "@" not in m else None for s, m in zip(specs, df["model"])]
    df["paper img/s (V100)"] = [s.paper_img_s if s and "@" not in m else None for s, m in zip(specs, df["model"])]
    df["paper source"] = [s.reference if s and s.paper_img_s and "@" not in m else "" for s, m in zip(specs, df["model"])]
    claims = [claimed_speedup(m, b) if isinstance(b, str) else ("", "", "")
              for m, b in zip(df["model"], df["baseline"])]
    df["claimed speed-up"] = [claim_text(c, where, hardware) for c, _, where in claims]
    df["claim source"] = [f"{source}, {where}" if source else "" for _, source, where in claims]
    first = ["model", "batch", "img_per_s", "img_per_s_q1", "img_per_s_q3", "speedup", "speedup_q1", "speedup_q3",
             "ms_per_batch", "baseline", "claimed speed-up", "claim source",
             "gflops", "params_m", "peak_mem_mib", "published top-1", "paper img/s (V100)", "paper source"]
    return df[first + [c for c in df.columns if c not in first]].round(
        {"img_per_s": 1, "img_per_s_q1": 1, "img_per_s_q3": 1, "ms_per_batch": 1, "speedup": 2, "speedup_q1": 2,
         "speedup_q3": 2, "gflops": 2, "params_m": 2, "peak_mem_mib": 0})


def engine_table(rows: Sequence[ThroughputRow | LatencyRow], baseline: str | None) -> pd.DataFrame:
    """Per variant and engine: its speed-up over the same variant in eager PyTorch, and over ``baseline`` (a variant)
    in the same engine (does a token-reduction variant keep its speed-up there?); both from interleaved rounds."""
    def key(r) -> tuple:
        return r.model, getattr(r, "batch", 1)

    eager = {key(r): r.speedup for r in over_eager(rows)}
    same = {key(r): r.speedup for r in within_engines(rows, baseline, include_reference=True)} if baseline else {}
    records = []
    for r in rows:
        record = dict(variant=variant_of(r), engine=engine_of_row(r).label, batch=getattr(r, "batch", 1))
        record.update({"img/s": r.img_per_s} if isinstance(r, ThroughputRow) else {"median ms": r.median_ms})
        record["speed-up over eager"] = eager.get(key(r))
        if baseline:
            record[f"speed-up over {baseline}, same engine"] = same.get(key(r))
        records.append(record)
    return pd.DataFrame(records).round(2)


def live_figure(measurements: pd.DataFrame) -> go.Figure:
    """img/s as rounds arrive: per model the median so far; with several batches, a line per model."""
    if measurements.empty:
        return go.Figure()
    summary = measurements.groupby(["model", "batch"], as_index=False)["img_per_s"].median()
    if summary["batch"].nunique() > 1:
        fig = px.line(summary, x="batch", y="img_per_s", color="model", markers=True, log_x=True,
                      labels={"img_per_s": "img/s (median of rounds)"})
    else:
        fig = px.bar(summary, x="model", y="img_per_s", color="model", text_auto=".1f",
                     labels={"img_per_s": "img/s (median of rounds)"})
        fig.update_layout(showlegend=False)
    fig.add_trace(go.Scatter(x=measurements["batch"] if summary["batch"].nunique() > 1 else measurements["model"],
                             y=measurements["img_per_s"], mode="markers", name="single rounds",
                             marker=dict(color="rgba(0,0,0,0.35)", size=6)))
    fig.update_layout(height=380, margin=dict(t=30, b=10))
    return fig


def accuracy_figure(table: pd.DataFrame) -> go.Figure:
    """Measured throughput against published ImageNet top-1 (models with a published figure only)."""
    data = table.dropna(subset=["published top-1"])
    if data.empty:
        return go.Figure()
    best = data.sort_values("img_per_s").groupby("model", as_index=False).last()
    families = [REGISTRY[_base_name(m)].family_label for m in best["model"]]
    fig = px.scatter(best, x="img_per_s", y="published top-1", text="model", color=families, log_x=True,
                     hover_data=["paper img/s (V100)", "batch", "gflops"],
                     labels={"img_per_s": "measured img/s on this machine (best batch)", "color": "family"})
    fig.update_traces(textposition="top center", cliponaxis=False)
    # The legend below the plot: at the right it covered the labels of the fastest models.
    fig.update_layout(height=460, margin=dict(t=30, b=10, l=80, r=80),
                      legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    return fig


def accuracy_caption(table: pd.DataFrame) -> str:
    """What ``accuracy_figure`` shows and, by name, each model of ``table`` it leaves out and why."""
    models = list(dict.fromkeys(table["model"]))
    with_top1 = set(table.dropna(subset=["published top-1"])["model"])
    variants = [m for m in models if "@" in m]
    unknown = [m for m in models if "@" not in m and m not in with_top1]
    left_out = [f"{m} (token-reduction variant: no single published top-1)" for m in variants]
    left_out += [f"{m} (no published ImageNet top-1 on record: the app has one only for the models in its Models list)"
                 for m in unknown]
    text = "Throughput against published ImageNet top-1."
    return text + (" Left out: " + "; ".join(left_out) + "." if left_out else "")


def latency_table(rows: Sequence[LatencyRow]) -> pd.DataFrame:
    """Batch-1 latency per model: median and p90 ms per image and the batch-1 speed-up against the baseline."""
    df = rows_to_dataframe(rows)
    if df.empty:
        return df
    first = ["model", "median_ms", "p90_ms", "speedup", "speedup_q1", "speedup_q3", "baseline", "gflops", "params_m"]
    return df[first + [c for c in df.columns if c not in first]].round(
        {"median_ms": 2, "p90_ms": 2, "speedup": 2, "speedup_q1": 2, "speedup_q3": 2, "gflops": 2, "params_m": 2})


def latency_figure(rounds: pd.DataFrame) -> go.Figure:
    """ms per image at batch 1 from single rounds (columns model, ms): the median as a bar, the p90 as a
    diamond and every round as a dot."""
    if rounds.empty:
        return go.Figure()
    grouped = rounds.groupby("model", sort=False)["ms"]
    summary = pd.DataFrame({"median": grouped.median(), "p90": grouped.quantile(0.9)}).reset_index()
    fig = go.Figure(go.Bar(x=summary["model"], y=summary["median"], name="median", text=summary["median"],
                           texttemplate="%{text:.1f}", marker_color="rgba(31,119,180,0.7)"))
    fig.add_trace(go.Scatter(x=summary["model"], y=summary["p90"], mode="markers", name="p90",
                             marker=dict(symbol="diamond", size=11, color="#d62728")))
    fig.add_trace(go.Scatter(x=rounds["model"], y=rounds["ms"], mode="markers", name="single rounds",
                             marker=dict(color="rgba(0,0,0,0.35)", size=6)))
    fig.update_layout(height=380, margin=dict(t=30, b=10), yaxis_title="ms per image (batch 1)")
    return fig
