"""Attention overlays: where one query looks, per head, drawn over the image, and a montage of such pictures."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from analysis.data.images import denormalize
from models.attention_recording import MHSA, BlockAttention, record_attention


def grid_query(block: BlockAttention, yx: tuple[float, float] | None) -> tuple[int, int] | None:
    """Map a position given as fractions (y, x) in [0, 1) of the input image onto the block's token grid."""
    if yx is None:
        return None
    rows, cols = block.grid
    return min(rows - 1, int(yx[0] * rows)), min(cols - 1, int(yx[1] * cols))


def query_attention_grid(block: BlockAttention, image: int, head: int, query: tuple[int, int] | None) -> torch.Tensor:
    """One query's attention over the block's patch grid, [rows, cols]; CGA windows are stitched back in place.

    ``query`` is (row, col) on the block's grid. None means the CLS token for MHSA; for CGA and ViTs without a
    CLS token it means the attention each position receives, averaged over the queries (of its window).
    """
    if block.maps is None:
        raise ValueError("This record kept no attention maps (store_maps=False).")
    rows, cols = block.grid
    if block.kind == MHSA:
        p = block.num_prefix_tokens
        if query is None and not block.has_class_token:
            return block.maps[image, head, p:, p:].mean(dim=0).reshape(rows, cols)
        token = 0 if query is None else p + query[0] * cols + query[1]
        return block.maps[image, head, token, p:].reshape(rows, cols)
    ws, (n_rows, n_cols) = block.window, block.windows
    first = image * block.windows_per_image
    maps = block.maps[first: first + block.windows_per_image, head]  # [windows, n, n]
    if query is None:
        per_window = maps.mean(dim=1)
    else:
        window = (query[0] // ws) * n_cols + query[1] // ws
        per_window = torch.zeros(maps.shape[0], maps.shape[-1])
        per_window[window] = maps[window, (query[0] % ws) * ws + query[1] % ws]
    tiles = per_window.view(n_rows, n_cols, ws, ws).transpose(1, 2).reshape(n_rows * ws, n_cols * ws)
    return tiles[:rows, :cols]


def _colour_table(colorscale: str = "Inferno") -> np.ndarray:
    from plotly.colors import sample_colorscale, unlabel_rgb

    return np.array([unlabel_rgb(c) for c in sample_colorscale(colorscale, np.linspace(0, 1, 256))], dtype=np.uint8)


def overlay_heatmap(picture: Image.Image, grid: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """Upsample a [rows, cols] map to the picture (bilinear), scale it to [0, 1] and blend it in colour."""
    width, height = picture.size
    up = F.interpolate(grid.float()[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
    colours = _colour_table()[(up.numpy() * 255).round().astype(np.int64)]
    return Image.blend(picture.convert("RGB"), Image.fromarray(colours), alpha)


def mark_query(picture: Image.Image, block: BlockAttention, query: tuple[int, int]) -> Image.Image:
    """Outline the query's grid cell on the picture."""
    from PIL import ImageDraw

    rows, cols = block.grid
    cell_w, cell_h = picture.width / cols, picture.height / rows
    marked = picture.copy()
    ImageDraw.Draw(marked).rectangle(
        [query[1] * cell_w, query[0] * cell_h, (query[1] + 1) * cell_w - 1, (query[0] + 1) * cell_h - 1],
        outline=(0, 255, 255), width=2)
    return marked


def whole_image_query_label(model: nn.Module) -> str:
    """What the query None of :func:`query_attention_grid` is on ``model``: its CLS token, or (EfficientViT, ViTs
    pooled without one) the mean attention each position receives."""
    return "CLS token" if getattr(model, "cls_token", None) is not None else "mean attention received (no CLS token)"


def attention_overlays(model: nn.Module, image: torch.Tensor, block: int, mean: Sequence[float],
                       std: Sequence[float], query_yx: tuple[float, float] | None = None,
                       alpha: float = 0.6) -> list[Image.Image]:
    """Per-head attention of one block on one preprocessed image [3, H, W], overlaid on that image.

    Records only ``block`` (one forward). ``query_yx`` is the query position as fractions of the image
    (None: CLS token for MHSA, mean received attention for CGA). Each map is scaled to its own maximum.
    """
    device = next(model.parameters()).device
    _, record = record_attention(model, image[None].to(device), [block], store_head_outputs=False)
    recorded = record.blocks[0]
    picture = denormalize(image, mean, std)
    query = grid_query(recorded, query_yx)
    overlays = []
    for head in range(recorded.num_heads):
        overlay = overlay_heatmap(picture, query_attention_grid(recorded, 0, head, query), alpha)
        overlays.append(mark_query(overlay, recorded, query) if query is not None else overlay)
    return overlays


def montage(images: Sequence[Image.Image], labels: Sequence[str] | None = None, columns: int = 4) -> Image.Image:
    """Tile images (same size) in a grid with an optional label on each, e.g. for one PNG download."""
    from PIL import ImageDraw

    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, im in enumerate(images):
        tile = im.copy()
        if labels:
            draw = ImageDraw.Draw(tile)
            draw.rectangle([0, 0, 8 * len(labels[i]) + 8, 16], fill=(0, 0, 0))
            draw.text((4, 2), labels[i], fill=(255, 255, 255))
        sheet.paste(tile, ((i % columns) * width, (i // columns) * height))
    return sheet
