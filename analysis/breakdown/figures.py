"""Figures of ``analysis.breakdown`` records: stacked runtime shares, component savings, memory-bound time per
engine, the roofline."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.breakdown.operators import COMPONENT_ORDER, MEMORY_CLASSES, OP_CLASSES
from analysis.breakdown.records import Breakdown
from analysis.breakdown.tables import block_shares, engine_comparison
from analysis.timing.engines import engine as engine_named
from analysis.timing.roofline import Roofline, points


CLASS_COLOURS = {"compute": "#4c78a8", "data movement": "#f58518", "element-wise": "#e45756",
                 "normalisation": "#72b7b2", "softmax": "#eeca3b", "token-reduction bookkeeping": "#b279a2",
                 "other": "#bab0ac"}


def _label(b: Breakdown) -> str:
    """The variant, its engine once (none for eager) and the batch: 'deit_tiny_patch16_224 [onnxruntime] b1'."""
    return f"{engine_named(b.engine).tag(b.model)} b{b.batch}"


def share_figure(results: Sequence[Breakdown], by: str = "op_class", title: str | None = None) -> go.Figure:
    """Stacked bars: the share of each model's forward time per operator class (or component)."""
    order = OP_CLASSES if by == "op_class" else COMPONENT_ORDER
    fig = go.Figure()
    labels = [_label(b) for b in results]
    shares = [b.shares(by) for b in results]
    for key in order:
        values = [s.get(key, 0.0) for s in shares]
        if not any(values):
            continue
        fig.add_bar(x=labels, y=values, name=key, marker_color=CLASS_COLOURS.get(key),
                    hovertemplate="%{x}<br>" + key + ": %{y:.1%}<extra></extra>")
    fig.update_layout(barmode="stack", yaxis_tickformat=".0%", yaxis_title="share of forward time",
                      title=title or ("Runtime share per operator class" if by == "op_class"
                                      else "Runtime share per component"), legend_title=by.replace("_", " "))
    return fig


def savings_figure(savings: Sequence[dict]) -> go.Figure:
    """Per token-reduction variant and batch: ms saved per component against its unreduced model (negative: its
    own machinery, which is pure cost)."""
    frame = pd.DataFrame(savings)
    fig = go.Figure()
    if frame.empty:
        return fig
    frame["label"] = frame["variant"] + " b" + frame["batch"].astype(str)
    for component in COMPONENT_ORDER:
        part = frame[frame["component"] == component]
        if part.empty:
            continue
        fig.add_bar(x=part["label"], y=part["saved_ms"], name=component,
                    hovertemplate="%{x}<br>" + component + ": %{y:.2f} ms saved<extra></extra>")
    fig.update_layout(barmode="relative", yaxis_title="ms saved per forward vs unreduced",
                      title="Where token reduction saves time, and what its machinery costs")
    return fig


def engine_figure(results: Sequence[Breakdown]) -> go.Figure:
    """Per model and batch, one stacked bar per engine: the plain forward's ms by operator class (memory-bound
    classes in their colours above compute), labelled with the memory-bound share and the speed-up over eager."""
    rows = engine_comparison(results)
    fig = go.Figure()
    if not rows:
        return fig
    x = [[f"{r['model']} b{r['batch']}" for r in rows], [r["engine"] for r in rows]]
    for kind in tuple(k for k in OP_CLASSES if k not in MEMORY_CLASSES) + MEMORY_CLASSES:
        values = [r[f"{kind} ms"] for r in rows]
        if not any(values):
            continue
        group = "memory-bound" if kind in MEMORY_CLASSES else "compute and other"
        fig.add_bar(x=x, y=values, name=kind, marker_color=CLASS_COLOURS.get(kind), legendgroup=group,
                    legendgrouptitle_text=group, hovertemplate="%{x}<br>" + kind + ": %{y:.2f} ms<extra></extra>")
    text = [f"{r['memory_bound_share']:.0%} mem-bound" + (f"<br>{r['speedup_over_eager']:.2f}x eager"
                                                          if r["speedup_over_eager"] is not None else "")
            for r in rows]
    fig.add_scatter(x=x, y=[r["plain_ms"] for r in rows], text=text, mode="text", textposition="top center",
                    showlegend=False, hoverinfo="skip")
    fig.update_layout(barmode="stack", yaxis_title="ms per forward (plain), split by the profile's shares",
                      title="How much memory-bound time each engine removes", legend_title="operator class")
    return fig


BLOCK_PARTS = {"attention compute": "#4c78a8", "attention memory-bound": "#9ecae9",
               "FFN compute": "#e45756", "FFN memory-bound": "#ff9d98"}


def block_figure(b: Breakdown) -> go.Figure:
    """Per block: attention and FFN time, each split into compute and memory-bound operators."""
    blocks = block_shares(b)
    fig = go.Figure()
    names = [row["block"] for row in blocks]
    for part, colour in BLOCK_PARTS.items():
        fig.add_bar(x=names, y=[row.get(part, 0.0) for row in blocks], name=part, marker_color=colour,
                    hovertemplate="%{x}<br>" + part + ": %{y:.2f} ms<extra></extra>")
    fig.update_layout(barmode="stack", yaxis_title="ms per forward", xaxis_title="block",
                      title=f"Attention vs FFN per block: {_label(b)}")
    return fig


def _hardware_roof(fig: go.Figure, roof: Roofline, x: np.ndarray) -> None:
    """The hardware's own peak, dashed: its compute roof, and its bandwidth roof where that is known."""
    if not roof.hardware_peak_gflops:
        return
    y = np.full_like(x, roof.hardware_peak_gflops)
    if roof.hardware_bandwidth_gbs:
        y = np.minimum(y, roof.hardware_bandwidth_gbs * x)
    fig.add_scatter(x=x, y=y, mode="lines", name=f"hardware peak {roof.hardware_peak_gflops:.0f} GFLOP/s",
                    line=dict(color="grey", dash="dash"), hovertext=roof.hardware_peak_how, hoverinfo="text+name")


def roofline_figure(results: Sequence[Breakdown], roof: Roofline) -> go.Figure:
    """Achieved GFLOP/s against arithmetic intensity per operator class and model, under this machine's roofs."""
    pts = [dict(p, label=_label(b)) for b in results for p in points(b, roof) if p["flops"] > 0 and p["bytes"] > 0]
    fig = go.Figure()
    lo = min([p["intensity"] for p in pts] + [roof.ridge / 100]) / 2
    hi = max([p["intensity"] for p in pts] + [roof.ridge * 10]) * 2
    x = np.geomspace(lo, hi, 200)
    fig.add_scatter(x=x, y=np.minimum(roof.peak_gflops, roof.bandwidth_gbs * x), mode="lines", name="measured roof",
                    line=dict(color="black"), hoverinfo="skip")
    fig.add_vline(x=roof.ridge, line_dash="dot", annotation_text=f"ridge {roof.ridge:.1f} FLOP/B")
    _hardware_roof(fig, roof, x)
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon"]
    # A point's colour is its operator class, its shape the profile (model, batch, engine) it comes from.
    shape_of = {(b.model, b.batch, b.engine): symbols[i % len(symbols)] for i, b in enumerate(
        {(b.model, b.batch, b.engine): b for b in results}.values())}
    label_of = {(b.model, b.batch, b.engine): _label(b) for b in results}
    for kind in OP_CLASSES:
        part = [p for p in pts if p["op_class"] == kind]
        if not part:
            continue
        fig.add_scatter(
            x=[p["intensity"] for p in part], y=[p["gflops_per_s"] for p in part], mode="markers", name=kind,
            legendgroup="classes", legendgrouptitle_text="colour: operator class",
            marker=dict(color=CLASS_COLOURS.get(kind), size=11,
                        symbol=[shape_of.get((p["model"], p["batch"], p["engine"]), "circle") for p in part]),
            text=[label_of.get((p["model"], p["batch"], p["engine"]), p["model"]) for p in part], customdata=[p["ms"] for p in part],
            hovertemplate="%{text}<br>" + kind + "<br>%{x:.2f} FLOP/byte, %{y:.2f} GFLOP/s<br>%{customdata:.2f} ms"
                          "<extra></extra>")
    drawn = {(p["model"], p["batch"], p["engine"]) for p in pts}
    for key, symbol in shape_of.items():
        if key in drawn:  # legend entries for the shapes: no data, only the marker and the profile's name
            fig.add_scatter(x=[None], y=[None], mode="markers", name=label_of[key], legendgroup="profiles",
                            legendgrouptitle_text="shape: model and batch",
                            marker=dict(symbol=symbol, size=11, color="#555555"), hoverinfo="skip")
    fig.update_layout(
        xaxis=dict(type="log", dtick=1, title="arithmetic intensity (FLOPs per byte of tensors read and written)"),
        yaxis=dict(type="log", dtick=1, title="achieved GFLOP/s"),
        title=f"Roofline of this machine ({roof.hardware}, {roof.threads} threads, {roof.dtype}): "
              f"{roof.peak_gflops:.0f} GFLOP/s, {roof.bandwidth_gbs:.1f} GB/s measured"
              + (f" (hardware peak {roof.hardware_peak_gflops:.0f} GFLOP/s)" if roof.hardware_peak_gflops else ""))
    return fig


__all__ = ["block_figure", "engine_figure", "share_figure", "savings_figure", "roofline_figure"]
