"""The maps drawn on the image: DynamicViT-family stage maps and keep scores, ToMe merge maps, EViT stage maps and
attention, and the strip that puts panels side by side."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image, ImageDraw
from plotly.subplots import make_subplots

from analysis.provenance import with_title
from models.dynamic_zoo import DynamicStageTrace, as_stage_trace, linear_targets
from models.evit import EViTTrace
from models.tome import ToMeTrace


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
