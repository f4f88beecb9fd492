"""Token reduction side by side: DynamicViT pruning and ToMe merging on the same backbone and images.

``compare_reductions`` is the one computation behind the token-reduction page; the other functions
turn its record into figures (plotly), images (PIL) and tables (pandas). Nothing here imports
streamlit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from PIL import Image, ImageDraw
from timm.models.vision_transformer import VisionTransformer

from analysis.data.images import imagenet_label
from analysis.provenance import with_title
from analysis.tome_agreement import top1_agreement, top5_overlap
from models.dynamicvit import DynamicViT, DynamicViTTrace, dynamicvit_forward, dynamicvit_from_backbone
from models.tome import ToMeTrace, tome_forward

NO_REDUCTION, DYNAMICVIT, TOME = "no reduction", "DynamicViT pruning", "ToMe merging"


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------
@dataclass
class ReductionComparison:
    """Logits (CPU) of the unreduced model, DynamicViT pruning and ToMe merging on one batch, with traces.

    The DynamicViT fields are None when the model has no score predictors (a plain ViT).
    """

    image_names: list[str]
    num_tokens: int
    depth: int
    reference_logits: torch.Tensor
    tome_logits: torch.Tensor
    tome_trace: ToMeTrace
    r: int | Sequence[int] | str
    keep_ratio: float | None = None
    dynamicvit_logits: torch.Tensor | None = None
    dynamicvit_trace: DynamicViTTrace | None = None

    def logits_by_method(self) -> dict[str, torch.Tensor]:
        methods = {NO_REDUCTION: self.reference_logits}
        if self.dynamicvit_logits is not None:
            methods[DYNAMICVIT] = self.dynamicvit_logits
        methods[TOME] = self.tome_logits
        return methods


def reference_logits(model: VisionTransformer, batch: torch.Tensor) -> torch.Tensor:
    """Logits (CPU, float) of the model without any reduction."""
    with torch.inference_mode():
        return model(batch.to(next(model.parameters()).device)).float().cpu()


def tome_run(model: VisionTransformer, batch: torch.Tensor, r: int | Sequence[int] | str = 13,
             proportional_attention: bool = True) -> tuple[torch.Tensor, ToMeTrace]:
    """ToMe's logits (CPU) and merge trace on ``batch``."""
    with torch.inference_mode():
        logits, trace = tome_forward(model, batch.to(next(model.parameters()).device), r=r,
                                     proportional_attention=proportional_attention, return_trace=True)
    return logits.float().cpu(), trace


def dynamicvit_run(model: DynamicViT, batch: torch.Tensor, keep_ratio: float = 0.7) -> tuple[torch.Tensor, DynamicViTTrace]:
    """DynamicViT's logits (CPU) and pruning trace on ``batch`` at ``keep_ratio``."""
    with torch.inference_mode():
        logits, trace = dynamicvit_forward(model, batch.to(next(model.parameters()).device), keep_ratio,
                                           return_trace=True)
    return logits.float().cpu(), trace


def combine_runs(model: VisionTransformer, image_names: Sequence[str], reference: torch.Tensor,
                 tome: tuple[torch.Tensor, ToMeTrace], r: int | Sequence[int] | str,
                 dynamicvit: tuple[torch.Tensor, DynamicViTTrace] | None = None,
                 keep_ratio: float | None = None) -> ReductionComparison:
    """The comparison record from separately computed runs (so each can be cached by its own setting)."""
    return ReductionComparison(
        image_names=list(image_names),
        num_tokens=model.patch_embed.num_patches + model.num_prefix_tokens,
        depth=len(model.blocks),
        reference_logits=reference,
        tome_logits=tome[0],
        tome_trace=tome[1],
        r=r,
        keep_ratio=keep_ratio if dynamicvit is not None else None,
        dynamicvit_logits=None if dynamicvit is None else dynamicvit[0],
        dynamicvit_trace=None if dynamicvit is None else dynamicvit[1],
    )


def compare_reductions(
    model: VisionTransformer,
    batch: torch.Tensor,
    image_names: Sequence[str],
    keep_ratio: float = 0.7,
    r: int | Sequence[int] | str = 13,
    proportional_attention: bool = True,
) -> ReductionComparison:
    """Run the model unreduced, with DynamicViT pruning (if it is a DynamicViT) and with ToMe, on ``batch``.

    The model is only read (inference mode, no attribute set): it may be a shared cached model.
    """
    dynamicvit = dynamicvit_run(model, batch, keep_ratio) if isinstance(model, DynamicViT) else None
    return combine_runs(model, image_names, reference_logits(model, batch),
                        tome_run(model, batch, r, proportional_attention), r, dynamicvit, keep_ratio)


def dynamicvit_with_untrained_predictors(backbone: VisionTransformer, seed: int = 0) -> DynamicViT:
    """A DynamicViT on a copy of ``backbone``'s weights with freshly initialised (untrained) score predictors.

    The predictors are seeded for reproducibility without disturbing the global random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dynamicvit_from_backbone(backbone).eval()


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
# Tokens per block
# --------------------------------------------------------------------------------------------
def tome_tokens_entering_blocks(trace: ToMeTrace, num_tokens: int) -> list[int]:
    """Tokens entering each block's attention under ToMe (merging happens inside the block)."""
    return [num_tokens] + trace.tokens_per_layer[:-1]


def tokens_per_block(comparison: ReductionComparison) -> dict[str, list[int]]:
    """Tokens entering each block, CLS included, for every method in the comparison."""
    series = {NO_REDUCTION: [comparison.num_tokens] * comparison.depth}
    if comparison.dynamicvit_trace is not None:
        series[DYNAMICVIT] = list(comparison.dynamicvit_trace.tokens_per_block)
    series[TOME] = tome_tokens_entering_blocks(comparison.tome_trace, comparison.num_tokens)
    return series


def tokens_per_block_figure(series: dict[str, list[int]], title: str = "Tokens entering each block") -> go.Figure:
    """Step chart of token counts per block, one line per method."""
    figure = go.Figure()
    for method, counts in series.items():
        figure.add_trace(go.Scatter(x=list(range(len(counts))), y=counts, name=method, mode="lines+markers",
                                    line_shape="hv"))
    figure.update_layout(title=title, xaxis_title="block", yaxis_title="tokens (CLS included)",
                         yaxis_rangemode="tozero", hovermode="x unified")
    return figure


# --------------------------------------------------------------------------------------------
# DynamicViT maps
# --------------------------------------------------------------------------------------------
def fade_dropped_patches(canvas: Image.Image, keep_mask: np.ndarray, grid: tuple[int, int], fade: float = 0.8) -> Image.Image:
    """The canvas with every dropped patch blended towards white by ``fade`` (kept patches unchanged)."""
    patch_w, patch_h = max(1, canvas.size[0] // grid[1]), max(1, canvas.size[1] // grid[0])
    if canvas.size != (grid[1] * patch_w, grid[0] * patch_h):
        canvas = canvas.resize((grid[1] * patch_w, grid[0] * patch_h), Image.BICUBIC)
    pixels = np.asarray(canvas.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    mask = np.asarray(keep_mask, dtype=bool).reshape(grid)
    pixel_mask = np.repeat(np.repeat(mask, height // grid[0], axis=0), width // grid[1], axis=1)
    faded = pixels.copy()
    faded[~pixel_mask] = pixels[~pixel_mask] * (1.0 - fade) + 255.0 * fade
    return Image.fromarray(faded.round().astype(np.uint8))


def dynamicvit_stage_panels(canvas: Image.Image, trace: DynamicViTTrace, image: int) -> list[tuple[str, Image.Image]]:
    """The input and, per pruning stage, the patches still kept (dropped ones faded), with captions."""
    panels = [("input", canvas)]
    for stage, (block, mask) in enumerate(zip(trace.pruning_locations, trace.keep_masks())):
        kept = int(mask[image].sum())
        panels.append((f"stage {stage + 1} (block {block}): {kept} patches",
                       fade_dropped_patches(canvas, mask[image].numpy(), trace.grid_size)))
    return panels


def keep_score_figure(trace: DynamicViTTrace, image: int, title: str = "DynamicViT keep scores per stage") -> go.Figure:
    """Heat maps of the predicted keep probability per patch at each stage (blank = dropped earlier)."""
    stages = len(trace.keep_scores)
    titles = [f"stage {s + 1} (block {b})" for s, b in enumerate(trace.pruning_locations)]
    figure = make_subplots(rows=1, cols=stages, subplot_titles=titles, horizontal_spacing=0.03)
    for stage, scores in enumerate(trace.keep_scores):
        grid = scores[image].reshape(trace.grid_size).numpy()
        figure.add_trace(
            go.Heatmap(z=grid, zmin=0.0, zmax=1.0, colorscale="Viridis", showscale=stage == stages - 1,
                       colorbar=dict(title="keep prob."), hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>"),
            row=1, col=stage + 1,
        )
        figure.update_yaxes(autorange="reversed", scaleanchor=f"x{stage + 1 if stage else ''}", showticklabels=False,
                            row=1, col=stage + 1)
        figure.update_xaxes(showticklabels=False, constrain="domain", row=1, col=stage + 1)
    figure.update_layout(title=title, height=320, margin=dict(t=70, b=10))
    return figure


def keep_frequency(trace: DynamicViTTrace, stage: int = -1) -> np.ndarray:
    """Fraction of the batch's images in which each patch position survives ``stage``: [grid_h, grid_w]."""
    mask = trace.keep_masks()[stage].float()
    return mask.mean(0).reshape(trace.grid_size).numpy()


def keep_frequency_figure(frequency: np.ndarray, title: str) -> go.Figure:
    """Heat map of how often each patch position is kept across images."""
    figure = go.Figure(go.Heatmap(z=frequency, zmin=0.0, zmax=1.0, colorscale="Cividis",
                                  colorbar=dict(title="kept in"), hovertemplate="row %{y}, col %{x}: %{z:.0%}<extra></extra>"))
    figure.update_yaxes(autorange="reversed", scaleanchor="x", title="patch row")
    figure.update_xaxes(constrain="domain", title="patch column")
    figure.update_layout(title=title, height=420)
    return figure


def kept_indices_frame(trace: DynamicViTTrace, image_names: Sequence[str]) -> pd.DataFrame:
    """One row per image and stage: the kept patch indices (row-major over the patch grid), space-separated."""
    rows = []
    for stage, (block, kept) in enumerate(zip(trace.pruning_locations, trace.kept_indices)):
        for image, name in enumerate(image_names):
            indices = kept[image].tolist()
            rows.append({"image": name, "stage": stage + 1, "before block": block, "kept": len(indices),
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
