"""Bipartite soft matching (ToMe, Bolya et al. 2023) and the merge by average, shared by ToMe on ViT and
PuMer's merging in ViLT and METER.

Tokens alternate into set A (even positions) and set B (odd positions); each A token picks the B token whose
metric is most similar (cosine); the A tokens with the most similar picks merge into them. Written from the
paper's description; ToMe's own code is not used.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class BipartiteMatch(NamedTuple):
    """Each A token's best B partner, and the A tokens ranked for merging. Indices are into A and B."""

    order: torch.Tensor    # [B, Na]: A positions by descending best similarity; those that cannot merge last
    partner: torch.Tensor  # [B, Na]: the most similar B position of each A token
    best: torch.Tensor     # [B, Na]: that similarity; -inf for an A token that cannot merge


def bipartite_match(metric: torch.Tensor, valid: torch.Tensor | None = None,
                    protect_first: bool = False) -> BipartiteMatch:
    """Match A = even to B = odd tokens of ``metric`` [B, N, D] by cosine similarity.

    ``valid`` [B, N] (padding is False) keeps invalid tokens out of every pair; ``protect_first`` keeps token 0
    (a class token, always in A) from merging.
    """
    batch, count, _ = metric.shape
    num_a, num_b = (count + 1) // 2, count // 2
    if num_b == 0:
        order = torch.arange(num_a, device=metric.device).expand(batch, -1)
        best = metric.new_full((batch, num_a), -math.inf)
        return BipartiteMatch(order, torch.zeros_like(order), best)
    unit = F.normalize(metric, dim=-1)
    similarity = unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)
    if valid is not None:
        similarity = similarity.masked_fill(~(valid[:, 0::2, None] & valid[:, None, 1::2]), -math.inf)
    if protect_first:
        similarity[:, 0, :] = -math.inf
    best, partner = similarity.max(dim=-1)
    return BipartiteMatch(best.argsort(dim=-1, descending=True), partner, best)


def merge_mask(match: BipartiteMatch, r: int | torch.Tensor) -> torch.Tensor:
    """[B, Na] bool: the A tokens that merge when sample b merges ``r`` (int or [B]) pairs, at most as many as can."""
    batch, num_a = match.best.shape
    rank = torch.empty_like(match.order).scatter_(
        1, match.order, torch.arange(num_a, device=match.order.device).expand(batch, -1))
    allowed = torch.minimum(torch.as_tensor(r, device=rank.device), torch.isfinite(match.best).sum(dim=1))
    return rank < allowed.reshape(-1, 1)


def combine_tokens(states: torch.Tensor, sizes: torch.Tensor, destination: torch.Tensor, new_len: int,
                   size_weighted: bool = True):
    """Gather tokens into their groups by average, size-weighted (ToMe) or with equal weights (PuMer's code
    starts every merge from size 1). ``destination`` -1 drops a token. Empty slots (for samples with fewer
    groups) are zero padding of size 1. Returns (states, sizes (the summed sizes of each group), valid)."""
    batch, _, channels = states.shape
    slot = destination.masked_fill(destination < 0, new_len)  # one spare slot collects dropped tokens
    weights = sizes if size_weighted else torch.ones_like(sizes)
    # Row-wise accumulation over the flattened batch (index_add_): on CPU much faster than a scatter_add whose
    # index is expanded over the channels.
    rows = (slot + torch.arange(batch, device=slot.device)[:, None] * (new_len + 1)).reshape(-1)
    total = states.new_zeros(batch * (new_len + 1), channels).index_add_(
        0, rows, (states * weights[..., None]).reshape(-1, channels)).view(batch, new_len + 1, channels)
    new_sizes = sizes.new_zeros(batch, new_len + 1).scatter_add_(1, slot, sizes)[:, :new_len]
    weight = (new_sizes if size_weighted  # the same sum: skip the second scatter
              else weights.new_zeros(batch, new_len + 1).scatter_add_(1, slot, weights)[:, :new_len])
    valid = new_sizes > 0
    return (total[:, :new_len] / weight.masked_fill(~valid, 1.0)[..., None], new_sizes.masked_fill(~valid, 1.0),
            valid)
