"""Figures of a PuMer run: pruned and merged patches over the image, the question's merged tokens, tokens per layer."""
from __future__ import annotations

import html
import math

import numpy as np
from PIL import Image

from analysis.vision_language.records import PUMER, PuMerProtocol, PuMerResult
from analysis.vision_language.compute import FULL
from analysis.vision_language.tables import _column, counts_frame
from models.vilt_pumer import PuMerTrace


# ----------------------------------------------------------------------------------------------- figures
def _palette() -> list[tuple[int, int, int]]:
    import plotly.colors

    return [tuple(int(c) for c in plotly.colors.hex_to_rgb(h)) for h in plotly.colors.qualitative.Alphabet]


def _cell_boxes(grid_shape: tuple[int, int], patch_size: int):
    grid_w = grid_shape[1]
    for cell in range(grid_shape[0] * grid_w):
        row, col = divmod(cell, grid_w)
        yield cell, (col * patch_size, row * patch_size, (col + 1) * patch_size, (row + 1) * patch_size)


def _paint(image: Image.Image, colours: dict[int, tuple[tuple[int, int, int], float]],
           grid_shape: tuple[int, int], patch_size: int) -> Image.Image:
    """Blend each listed grid cell with its (colour, opacity)."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for cell, (x0, y0, x1, y1) in _cell_boxes(grid_shape, patch_size):
        if cell in colours:
            colour, alpha = colours[cell]
            canvas[y0:y1, x0:x1] = (1 - alpha) * canvas[y0:y1, x0:x1] + alpha * np.asarray(colour, np.float32)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def pruned_overlay(result: PuMerResult, step_index: int, sample: int = 0) -> Image.Image:
    """The image with the patches pruned at this reduce layer faded toward red and those gone earlier faded
    toward white."""
    step, trace = result.trace.steps[step_index], result.trace
    colours = {int(c): ((255, 255, 255), 0.8) for c in np.flatnonzero(step.image_groups[sample] < 0)}
    colours.update({int(c): ((220, 40, 40), 0.6) for c in step.pruned_cells[sample]})
    return _paint(result.image, colours, trace.grid_shape, result.patch_size)


def merge_overlay(result: PuMerResult, step_index: int, sample: int = 0) -> Image.Image:
    """The image after this reduce layer: patches sharing a token have one colour; patches still alone are
    left as they are; patches without a token are faded toward white."""
    groups = result.trace.steps[step_index].image_groups[sample]
    ids, sizes = np.unique(groups[groups >= 0], return_counts=True)
    palette = _palette()
    merged = {int(g): palette[i % len(palette)] for i, g in enumerate(ids[sizes > 1])}
    colours = {}
    for cell, group in enumerate(groups.tolist()):
        if group < 0:
            colours[cell] = ((255, 255, 255), 0.8)
        elif group in merged:
            colours[cell] = (merged[group], 0.55)
    return _paint(result.image, colours, result.trace.grid_shape, result.patch_size)


def text_groups_html(result: PuMerResult, step_index: int, sample: int = 0) -> str:
    """The question's tokens as HTML; tokens merged into one token share a colour and a group number."""
    groups = result.trace.steps[step_index].text_groups[sample][: len(result.text_tokens)]
    ids, sizes = np.unique(groups, return_counts=True)
    palette = _palette()
    colour_of = {int(g): palette[i % len(palette)] for i, g in enumerate(ids[sizes > 1])}
    spans = []
    for token, group in zip(result.text_tokens, groups.tolist()):
        style = "padding:2px 5px;margin:2px;border-radius:4px;display:inline-block;border:1px solid #bbb;"
        if group in colour_of:
            r, g, b = colour_of[group]
            style += f"background:rgba({r},{g},{b},0.45);"
        spans.append(f'<span style="{style}">{html.escape(token)}<sub>{group}</sub></span>')
    return "<div style='line-height:2.2'>" + "".join(spans) + "</div>"


def tokens(count: int, what: str = "token") -> str:
    """'1 image token', '3 image tokens'."""
    return f"{count} {what}{'' if count == 1 else 's'}"


def token_counts_figure(trace: PuMerTrace, subtitle: str = "", sample: int = 0, layer_word: str = "layer"):
    """Tokens per layer (fusion block: ``layer_word``) for each modality, with PuMer (solid) and without
    (dashed); reduce layers marked. ``subtitle`` (model, weights, image) goes under the title."""
    import plotly.graph_objects as go

    frame = counts_frame(trace, sample, layer_word)
    x = frame[_column(layer_word)]
    figure = go.Figure()
    for column, colour in (("text_tokens", "#1f77b4"), ("image_tokens", "#d62728"), ("total_tokens", "#444")):
        name = column.replace("_", " ")
        figure.add_scatter(x=x, y=frame[column], mode="lines+markers", name=f"{name} (PuMer)",
                           line=dict(color=colour, shape="hv"))
        figure.add_scatter(x=x, y=[frame[column].iloc[0]] * len(frame), mode="lines",
                           name=f"{name} (full)", line=dict(color=colour, dash="dash"), opacity=0.5)
    for step in trace.steps:
        figure.add_vline(x=str(step.layer), line=dict(color="#999", dash="dot"))
    title = (f"Tokens entering each {layer_word} (dotted: where PuMer reduces; the MLP there already sees "
             "the reduced count)")
    figure.update_layout(xaxis_title=layer_word, yaxis_title="tokens", xaxis_type="category",
                         title=title + (f"<br><sup>{subtitle}</sup>" if subtitle else ""),
                         legend=dict(orientation="h", y=-0.25), margin=dict(t=70, b=10))
    return figure


def for_display(picture: Image.Image, min_side: int = 320) -> Image.Image:
    """``picture`` enlarged by a whole factor (nearest neighbour, patches stay sharp) until its longer side is
    at least ``min_side``: a small random model's 64-px input stays readable."""
    factor = max(1, math.ceil(min_side / max(picture.size)))
    return picture if factor == 1 else picture.resize((picture.width * factor, picture.height * factor),
                                                      Image.NEAREST)


def protocol_figure(protocol: PuMerProtocol, subtitle: str = "", full_name: str = "full", pumer_name: str = "PuMer"):
    """Samples per second at each batch of the paper's protocol, with and without PuMer (its interquartile range
    over the rounds as error bars); the reported batch marked."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for model, name, colour in ((FULL, full_name, "#444"), (PUMER, pumer_name, "#d62728")):
        rows = [r for r in protocol.rows if r.model == model]
        figure.add_scatter(x=[r.batch for r in rows], y=[r.img_per_s for r in rows], mode="lines+markers", name=name,
                           line=dict(color=colour), error_y=dict(
                               type="data", symmetric=False, array=[r.img_per_s_q3 - r.img_per_s for r in rows],
                               arrayminus=[r.img_per_s - r.img_per_s_q1 for r in rows]))
    if protocol.best_batch is not None:
        figure.add_vline(x=protocol.best_batch, line=dict(color="#999", dash="dot"),
                         annotation_text=f"reported: batch {protocol.best_batch}")
    title = f"Paper's protocol: batch from {protocol.start} in steps of {protocol.step}"
    figure.update_layout(xaxis_title="batch", yaxis_title="samples / s",
                         title=title + (f"<br><sup>{subtitle}</sup>" if subtitle else ""),
                         legend=dict(orientation="h", y=-0.25), margin=dict(t=70, b=10))
    return figure
