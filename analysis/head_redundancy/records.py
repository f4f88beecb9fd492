"""What one model's head redundancy is (per block and per model), the accumulator behind the page and the
dataset run, and the page's entry points (``analyze_model``, ``analyze_models``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from analysis.head_redundancy.clustering import cluster_order, head_embedding
from analysis.head_redundancy.similarity import (
    centered_gram,
    head_redundancy,
    offset_profile,
    pairwise_head_cosine,
)
from models.attention_recording import AttentionRecord, record_attention

Progress = Callable[[float, str], None]
ATTENTION, FEATURE = "attention", "feature"


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
