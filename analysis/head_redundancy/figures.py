"""Head-redundancy figures: similarity heatmaps, redundancy over depth, the head embedding and what an
untrained model's figures do not show."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from analysis.head_redundancy.clustering import cluster_order
from analysis.head_redundancy.records import ATTENTION, FEATURE, RedundancyResult
from models.attention_recording import CGA


def similarity_heatmaps(result: RedundancyResult, metric: str = ATTENTION, columns: int = 4) -> go.Figure:
    """One heat map per block of head-to-head similarity, heads reordered by hierarchical clustering."""
    rows = -(-len(result.blocks) // columns)
    titles = [f"block {b.block}" + (f" (stage {b.stage})" if result.kind == CGA else "") for b in result.blocks]
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=titles,
                        horizontal_spacing=0.04, vertical_spacing=0.08 if rows > 1 else 0.1)
    for i, b in enumerate(result.blocks):
        sim = b.similarity(metric)
        order = cluster_order(sim)
        labels = [f"h{h}" for h in order]
        fig.add_trace(go.Heatmap(
            z=sim[np.ix_(order, order)], x=labels, y=labels, zmin=0, zmax=1,
            coloraxis="coloraxis", hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
        ), row=i // columns + 1, col=i % columns + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=dict(text=f"{result.label}: " + ("cosine similarity of attention maps" if metric == ATTENTION
                                                else "linear CKA of head outputs")
                   + f"<br><sup>{result.num_images} image{'s' if result.num_images != 1 else ''}; "
                     "heads reordered by clustering; one panel per block</sup>"),
        coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1),
        height=260 * rows + 80,
    )
    return fig


METRIC_WORDS = {ATTENTION: "max cosine of attention maps to another head",
                FEATURE: "max linear CKA of head outputs to another head"}


def redundancy_vs_depth(results: Sequence[RedundancyResult], metric: str = ATTENTION) -> go.Figure:
    """Mean head redundancy per block against relative depth; MHSA models left, cascaded group attention right. A
    panel only for a kind that has a model here: no empty EfficientViT panel when it could not be loaded."""
    panels = [is_cga for is_cga in (False, True) if any((r.kind == CGA) == is_cga for r in results)] or [False]
    titles = {False: "Multi-head self-attention (ViT / DeiT)", True: "Cascaded group attention (EfficientViT)"}
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, subplot_titles=[titles[p] for p in panels])
    for r in results:
        is_cga = r.kind == CGA
        lows = [np.nanmin(b.redundancy(metric)) for b in r.blocks]
        highs = [np.nanmax(b.redundancy(metric)) for b in r.blocks]
        mean = r.mean_redundancy(metric)
        fig.add_trace(go.Scatter(
            x=[b.relative_depth for b in r.blocks], y=mean, name=r.label, mode="lines+markers",
            line=dict(dash="dash" if is_cga else "solid"),
            marker=dict(symbol="diamond" if is_cga else "circle", size=8),
            error_y=dict(type="data", symmetric=False, array=np.subtract(highs, mean),
                         arrayminus=np.subtract(mean, lows), thickness=1),
            customdata=[[b.block, b.stage] for b in r.blocks],
            hovertemplate="block %{customdata[0]} (stage %{customdata[1]})<br>mean %{y:.3f}<extra>%{fullData.name}</extra>",
        ), row=1, col=panels.index(is_cga) + 1)
    fig.update_xaxes(title_text="relative depth (0 = first block, 1 = last)", range=[-0.05, 1.05])
    fig.update_yaxes(title_text=f"head redundancy: {METRIC_WORDS[metric]}", row=1, col=1)
    fig.update_layout(title="Head redundancy vs depth (mean over heads; bars span min-max)", height=450)
    return fig


EMBEDDING_NOISE = 1e-4  # offset profiles are distributions: an MDS axis spanning less than this is rounding noise
ALIKE_HEADS = 0.9  # every pair of heads at least this similar in every block: nothing to conclude


def embedding_noise_axes(result: RedundancyResult) -> list[bool]:
    """Per MDS axis: whether its spread is below ``EMBEDDING_NOISE`` (then it shows rounding, not structure)."""
    spread = np.ptp(result.embedding, axis=0) if len(result.embedding) else np.zeros(2)
    return [bool(s < EMBEDDING_NOISE) for s in spread]


def _lowest_similarity_text(lowest: float) -> str:
    """'identical attention maps', or the lowest similarity rounded down (0.9997 rounded to 1.000 is no lower
    bound)."""
    if lowest >= 1 - 1e-6:
        return "identical attention maps (cosine similarity 1 to six decimals)"
    return f"attention maps with cosine similarity ≥ {math.floor(lowest * 1000 + 1e-9) / 1000:.3f}"


def untrained_notes(result: RedundancyResult) -> list[str]:
    """Why a result supports no conclusion (heads alike everywhere, an MDS of noise); empty when it does."""
    notes = []
    lowest = min((b.attention_similarity[~np.eye(b.num_heads, dtype=bool)].min() for b in result.blocks
                  if b.num_heads > 1), default=None)
    if lowest is not None and lowest >= ALIKE_HEADS:
        notes.append(f"{result.label}: every pair of heads has {_lowest_similarity_text(lowest)} in every block, "
                     "as when attention is (nearly) uniform: redundancy near 1 here reflects the weights "
                     "(untrained heads all look everywhere), not a property of the architecture.")
    noise = embedding_noise_axes(result)
    if all(noise):
        notes.append(f"{result.label}: the heads' attention-offset profiles differ by less than "
                     f"{EMBEDDING_NOISE:g}, so their MDS layout would only show rounding noise; it is not drawn.")
    elif any(noise):
        notes.append(f"{result.label}: the second MDS axis spans less than {EMBEDDING_NOISE:g} (rounding noise) "
                     "and is drawn flat.")
    return notes


def head_embedding_figure(result: RedundancyResult, weights: str = "") -> go.Figure:
    """2-D MDS embedding of every head of a model, coloured by depth; an axis of pure rounding noise is drawn flat."""
    noise = embedding_noise_axes(result)
    embedding = np.where(noise, 0.0, result.embedding) if len(result.embedding) else result.embedding
    fig = go.Figure()
    offset = 0
    # One colour per block from its depth (a scalar colour with a colorscale falls back to plotly's ten-colour
    # cycle, which gave blocks 0 and 10 one colour); head names in the hover only, where they cannot overlap.
    colours = sample_colorscale("Plasma", [0.9 * b.relative_depth for b in result.blocks])
    for b, colour in zip(result.blocks, colours):
        xy = embedding[offset: offset + b.num_heads]
        offset += b.num_heads
        fig.add_trace(go.Scatter(
            x=xy[:, 0], y=xy[:, 1], mode="markers", name=f"block {b.block}",
            text=[f"b{b.block}h{h}" for h in range(b.num_heads)],
            marker=dict(size=9, color=colour, line=dict(width=0.5, color="white")),
            customdata=b.attention_redundancy,
            hovertemplate="block %{text}<br>redundancy %{customdata:.3f}<extra></extra>",
        ))
    subtitle = f"weights: {weights}" if weights else ""
    fig.update_layout(title=dict(text=f"{result.label}: heads placed by where they attend (MDS, colour = depth)"
                                      + (f"<br><sup>{subtitle}</sup>" if subtitle else "")),
                      xaxis_title="MDS 1 (unitless)", yaxis_title="MDS 2 (unitless)", height=480,
                      xaxis=dict(tickformat=".2f"), yaxis=dict(tickformat=".2f"))
    if noise[1]:
        fig.update_yaxes(range=[-1, 1])
    return fig
