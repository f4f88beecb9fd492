"""Head redundancy (EfficientViT, CVPR 2023): how similar the attention heads of a block are.

For each head, redundancy is the maximum cosine similarity between its attention map and any other head's
map in the same block (similarities averaged over images, and over windows for cascaded group attention).
The same is computed on the heads' outputs, with linear CKA as the similarity. Heads are ordered by hierarchical clustering
(scikit-learn) and embedded in 2-D with MDS (scikit-learn) on a descriptor comparable across blocks.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from PIL import Image
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from torch import nn

from analysis.data.images import denormalize
from models.attention_recording import CGA, MHSA, AttentionRecord, BlockAttention, record_attention

Progress = Callable[[float, str], None]
ATTENTION, FEATURE = "attention", "feature"


# ----------------------------------------------------------------------------- metrics (pure, on arrays)

def pairwise_head_cosine(per_head: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[M, H, ...] -> [M, H, H]: cosine similarity between every two heads, separately for each of the M items."""
    flat = torch.as_tensor(per_head, dtype=torch.float32).flatten(2)
    dots = flat @ flat.transpose(1, 2)  # one batched matmul for all head pairs; norms come from its diagonal
    norms = dots.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(1e-12)
    return dots / (norms[:, :, None] * norms[:, None, :])


def head_similarity(per_head: np.ndarray | torch.Tensor) -> np.ndarray:
    """[M, H, ...] (M = images, or images x windows) -> [H, H] cosine similarity averaged over the M items."""
    return pairwise_head_cosine(per_head).mean(dim=0).numpy()


def centered_gram(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[M, H, N, d] -> [M, H, N, N]: token-by-token Gram matrix of each head's outputs, centred over tokens."""
    x = torch.as_tensor(features, dtype=torch.float32)
    x = x - x.mean(dim=-2, keepdim=True)
    return x @ x.transpose(-2, -1)


def head_feature_similarity(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """[M, H, N, d] -> [H, H] linear CKA between head outputs, averaged over the M items.

    Raw outputs of different heads live in unrelated bases (their own slices of V), so their plain cosine is
    near 0 whatever they compute; linear CKA (Kornblith et al. 2019) is the cosine of the centred Gram
    matrices and compares what the heads represent independently of basis.
    """
    return head_similarity(centered_gram(features))


def head_redundancy(similarity: np.ndarray) -> np.ndarray:
    """[H, H] -> [H]: each head's largest similarity to another head (NaN when the block has one head)."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.shape[0] < 2:
        return np.full(sim.shape[0], np.nan)
    off_diagonal = np.where(np.eye(sim.shape[0], dtype=bool), -np.inf, sim)
    return off_diagonal.max(axis=1)


@functools.lru_cache(maxsize=32)
def offset_bins(rows: int, cols: int, reach: int) -> torch.Tensor:
    """[n*n] bin of each (query, key) pair on a rows x cols grid: (2r+1)^2 offset bins, then one 'far' bin."""
    positions = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).view(-1, 2)
    delta = positions[None, :, :] - positions[:, None, :]
    near = (delta.abs() <= reach).all(dim=-1)
    side = 2 * reach + 1
    index = (delta[..., 0] + reach) * side + (delta[..., 1] + reach)
    return torch.where(near, index, side * side).flatten()


def offset_profile(block: BlockAttention, reach: int = 3) -> np.ndarray:
    """[H, (2r+1)^2 + 2]: mean attention mass at each query->key grid offset, then 'far', then prefix (CLS) tokens.

    Unlike the maps themselves this is comparable across blocks and stages (different token counts and
    windows), so it describes every head of a model in one space for the embedding.
    """
    maps = block.maps
    if block.kind == MHSA:
        p = block.num_prefix_tokens
        rows, cols = block.grid
        prefix_mass = maps[:, :, p:, :p].sum(-1).mean(dim=(0, 2))
        maps = maps[:, :, p:, p:]
    else:
        rows = cols = block.window
        prefix_mass = torch.zeros(maps.shape[1])
    bins = offset_bins(rows, cols, reach)
    n_bins = (2 * reach + 1) ** 2 + 1
    mean_map = maps.float().mean(dim=0)  # [H, queries, keys]
    profile = torch.zeros(maps.shape[1], n_bins).index_add_(1, bins, mean_map.flatten(1)) / mean_map.shape[1]
    return torch.cat([profile, prefix_mass[:, None]], dim=1).numpy()


def cluster_order(similarity: np.ndarray) -> np.ndarray:
    """Heads ordered so that similar heads sit together: leaves of an average-linkage tree on 1 - similarity."""
    from sklearn.cluster import AgglomerativeClustering

    n = similarity.shape[0]
    if n < 3:
        return np.arange(n)
    distance = np.clip(1.0 - np.asarray(similarity, dtype=np.float64), 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = AgglomerativeClustering(n_clusters=1, metric="precomputed", linkage="average",
                                   compute_full_tree=True).fit(distance)
    return _leaf_order(tree.children_, n)


def _leaf_order(children: np.ndarray, n_leaves: int) -> np.ndarray:
    """Left-to-right leaves of scikit-learn's merge tree (it exposes the tree but no leaf order)."""
    order, stack = [], [n_leaves + len(children) - 1]
    while stack:
        node = stack.pop()
        if node < n_leaves:
            order.append(node)
        else:
            left, right = children[node - n_leaves]
            stack.extend([right, left])
    return np.asarray(order)


def head_embedding(profiles: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """[sum H, 2]: MDS of all heads of a model, with 1 - cosine similarity of their offset profiles as dissimilarity."""
    from sklearn.manifold import MDS

    stacked = torch.as_tensor(np.concatenate(profiles), dtype=torch.float32)
    if stacked.shape[0] < 3:
        return np.zeros((stacked.shape[0], 2))
    unit = F.normalize(stacked, dim=-1)
    distance = (1.0 - unit @ unit.T).clamp_min(0).double().numpy()
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0.0)
    return MDS(n_components=2, random_state=seed, **_mds_precomputed_kwargs()).fit_transform(distance)


def _mds_precomputed_kwargs() -> dict:
    """scikit-learn renamed MDS's 'dissimilarity' to 'metric' in 1.8; requirements allow >= 1.5."""
    params = inspect.signature(__import__("sklearn.manifold", fromlist=["MDS"]).MDS).parameters
    if "metric_mds" in params:
        return dict(metric="precomputed", metric_mds=True, init="classical_mds")
    return dict(dissimilarity="precomputed", n_init=4)


# ----------------------------------------------------------------------------- records

@dataclass
class BlockRedundancy:
    """Similarity and redundancy of the heads of one attention block."""

    block: int
    stage: int
    relative_depth: float
    attention_similarity: np.ndarray  # [H, H]
    feature_similarity: np.ndarray  # [H, H]
    offset_profile: np.ndarray  # [H, D]
    attention_redundancy: np.ndarray = field(init=False)  # [H]
    feature_redundancy: np.ndarray = field(init=False)  # [H]
    head_order: np.ndarray = field(init=False)  # clustering order of the attention similarity

    def __post_init__(self) -> None:
        self.attention_redundancy = head_redundancy(self.attention_similarity)
        self.feature_redundancy = head_redundancy(self.feature_similarity)
        self.head_order = cluster_order(self.attention_similarity)

    @property
    def num_heads(self) -> int:
        return self.attention_similarity.shape[0]

    def similarity(self, metric: str) -> np.ndarray:
        return self.attention_similarity if metric == ATTENTION else self.feature_similarity

    def redundancy(self, metric: str) -> np.ndarray:
        return self.attention_redundancy if metric == ATTENTION else self.feature_redundancy


@dataclass
class RedundancyResult:
    """Head redundancy of one model on a set of images."""

    model: str
    kind: str  # "mhsa" or "cga"
    num_images: int
    random_weights: bool
    blocks: list[BlockRedundancy]
    embedding: np.ndarray  # [total heads, 2], heads in block order

    @property
    def label(self) -> str:
        return self.model + (" (random weights)" if self.random_weights else "")

    def mean_redundancy(self, metric: str = ATTENTION) -> np.ndarray:
        """[blocks]: mean over heads of each block's redundancy."""
        return np.array([np.nanmean(b.redundancy(metric)) for b in self.blocks])


class HeadSimilaritySums:
    """Per-block running float64 sums of head-by-head similarity: the one accumulator behind ``analyze_model``
    (the page) and ``analysis.run head-similarity``.

    Sized from one recording (any batch, e.g. a blank image) so that every process of a distributed run holds
    the same names and shapes before it sees data; ``sums`` is a flat dict of tensors that add up across
    processes and batches. ``update`` adds a recording, ``result`` turns (all-reduced) sums into the record.
    """

    def __init__(self, layout: AttentionRecord, device: torch.device | str = "cpu", reach: int = 3) -> None:
        self.kind, self.stage_of_block, self.reach = layout.kind, layout.stage_of_block, reach
        self.blocks = [b.block for b in layout.blocks]
        self.relative_depth = {b: layout.relative_depth(b) for b in self.blocks}
        width = (2 * reach + 1) ** 2 + 2  # offset bins, 'far', prefix tokens: see offset_profile

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.sums: dict[str, torch.Tensor] = {"images": zeros()}
        for block in layout.blocks:
            heads, key = block.num_heads, f"b{block.block}"
            self.sums.update({f"{key}.attention": zeros(heads, heads), f"{key}.feature": zeros(heads, heads),
                              f"{key}.profile": zeros(heads, width), f"{key}.items": zeros(),
                              f"{key}.batches": zeros()})

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        total = self.sums[name]
        value = torch.as_tensor(value, dtype=torch.float64).to(total.device)
        if value.shape != total.shape:
            raise ValueError(f"{name}: adding shape {tuple(value.shape)} to a sum of shape {tuple(total.shape)}.")
        total += value

    def update(self, record: AttentionRecord) -> None:
        """Add one recorded batch (every block of the layout, with maps and head outputs)."""
        for block in record.blocks:
            key = f"b{block.block}"
            self._add(f"{key}.attention", pairwise_head_cosine(block.maps).double().sum(0))
            self._add(f"{key}.feature", pairwise_head_cosine(centered_gram(block.head_outputs)).double().sum(0))
            profile = torch.from_numpy(offset_profile(block, self.reach)).double()
            self._add(f"{key}.profile", profile * block.batch_size)
            self._add(f"{key}.items", block.maps.shape[0])
            self._add(f"{key}.batches", block.batch_size)
        self._add("images", record.blocks[0].batch_size)

    def result(self, model: str, random_weights: bool = False,
               sums: dict[str, torch.Tensor] | None = None) -> RedundancyResult:
        """The record from ``sums`` (this accumulator's own by default, or all-reduced ones)."""
        sums = self.sums if sums is None else sums
        blocks = []
        for b in self.blocks:
            items, batches = sums[f"b{b}.items"].item(), sums[f"b{b}.batches"].item()
            blocks.append(BlockRedundancy(
                b, self.stage_of_block[b], self.relative_depth[b],
                (sums[f"b{b}.attention"] / max(items, 1)).cpu().numpy(),
                (sums[f"b{b}.feature"] / max(items, 1)).cpu().numpy(),
                (sums[f"b{b}.profile"] / max(batches, 1)).cpu().numpy()))
        embedding = head_embedding([b.offset_profile for b in blocks])
        return RedundancyResult(model, self.kind, int(sums["images"].item()), random_weights, blocks, embedding)


def analyze_model(model: nn.Module, batch: torch.Tensor, name: str, *, random_weights: bool = False,
                  chunk: int = 8, progress: Progress | None = None) -> RedundancyResult:
    """Record every attention block on ``batch`` (in chunks of ``chunk`` images) and compute all metrics."""
    sums: HeadSimilaritySums | None = None
    device = next(model.parameters()).device
    for start in range(0, batch.shape[0], chunk):
        _, record = record_attention(model, batch[start: start + chunk].to(device))
        sums = sums or HeadSimilaritySums(record)
        sums.update(record)
        if progress:
            progress(min(1.0, (start + chunk) / batch.shape[0]), f"{name}: {min(start + chunk, len(batch))} images")
    return sums.result(name, random_weights)


class LoadedLike(Protocol):
    """What analyze_models needs from models.loading.LoadedModel."""

    name: str
    model: nn.Module
    transform: Callable


def analyze_models(models: Sequence[LoadedLike], images: Sequence[Image.Image],
                   progress: Progress | None = None, chunk: int = 8) -> list[RedundancyResult]:
    """Head redundancy of several loaded models on the same PIL images (each preprocessed by its own transform)."""
    results = []
    for i, loaded in enumerate(models):
        batch = torch.stack([loaded.transform(im) for im in images])
        weights = getattr(loaded, "weights", None)

        def step(fraction: float, message: str, i=i) -> None:
            if progress:
                progress((i + fraction) / len(models), message)

        results.append(analyze_model(loaded.model, batch, loaded.name, chunk=chunk, progress=step,
                                     random_weights=bool(getattr(weights, "is_random", False))))
    return results


# ----------------------------------------------------------------------------- tables

def to_dataframe(results: RedundancyResult | Sequence[RedundancyResult]) -> pd.DataFrame:
    """One row per (model, block, head): redundancy by attention maps and by outputs, cluster rank, embedding."""
    rows = []
    for result in _as_list(results):
        offset = 0
        for b in result.blocks:
            rank = np.argsort(b.head_order)
            for h in range(b.num_heads):
                rows.append(dict(
                    model=result.model, attention_type=result.kind, random_weights=result.random_weights,
                    images=result.num_images, stage=b.stage, block=b.block, relative_depth=b.relative_depth,
                    head=h, attention_redundancy=b.attention_redundancy[h], feature_redundancy=b.feature_redundancy[h],
                    most_similar_head=_most_similar(b.attention_similarity, h), cluster_rank=int(rank[h]),
                    embedding_x=result.embedding[offset + h, 0], embedding_y=result.embedding[offset + h, 1],
                ))
            offset += b.num_heads
    return pd.DataFrame(rows)


def similarity_dataframe(results: RedundancyResult | Sequence[RedundancyResult]) -> pd.DataFrame:
    """One row per (model, block, head i, head j) with both similarity matrices in long form."""
    rows = [
        dict(model=r.model, attention_type=r.kind, random_weights=r.random_weights, stage=b.stage, block=b.block,
             head_i=i, head_j=j, attention_similarity=b.attention_similarity[i, j],
             feature_similarity=b.feature_similarity[i, j])
        for r in _as_list(results) for b in r.blocks for i in range(b.num_heads) for j in range(b.num_heads)
    ]
    return pd.DataFrame(rows)


def _most_similar(similarity: np.ndarray, head: int) -> int:
    others = np.where(np.arange(len(similarity)) == head, -np.inf, similarity[head])
    return int(np.argmax(others)) if len(similarity) > 1 else -1


def _as_list(results) -> list[RedundancyResult]:
    return [results] if isinstance(results, RedundancyResult) else list(results)


# ----------------------------------------------------------------------------- figures

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
    """Mean head redundancy per block against relative depth; MHSA models left, cascaded group attention right."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=(
        "Multi-head self-attention (ViT / DeiT)", "Cascaded group attention (EfficientViT)"))
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
        ), row=1, col=2 if is_cga else 1)
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


# ----------------------------------------------------------------------------- attention overlays

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
