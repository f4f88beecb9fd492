"""Similarity and redundancy of heads, pure functions on arrays: cosine of attention maps, linear CKA of head
outputs, redundancy (max similarity to another head), the offset profile that compares heads across blocks."""
from __future__ import annotations

import functools

import numpy as np
import torch

from models.attention_recording import MHSA, BlockAttention


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
