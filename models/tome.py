"""ToMe (Token Merging, Bolya et al., ICLR 2023) as an explicit forward over a timm VisionTransformer.

Between the attention and the MLP of every block, the tokens are split alternately into sets A
(even positions) and B (odd positions); each A token finds its most similar B token by cosine
similarity of the attention keys (averaged over heads); the ``r`` most similar pairs are merged
into their B token by a size-weighted average. The class token is never merged. With
proportional attention, log(size) is added to the attention logits so a merged token counts as
many times as the patches it holds.

Nothing here touches the model: ``r`` and every other setting are call arguments, the model's own
submodules are called in order, and with ``r = 0`` the result equals ``model(x)``. This is an
independent implementation written from the paper's description (ToMe's own code is
non-commercially licensed and is neither imported nor copied).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from models.merging import bipartite_match, combine_tokens
from models.registry import MethodNotApplicable
from models.scopes import MATCHING, REDUCTION, scope
from models.traces import ReductionTrace
from models.vit_forward import (
    attention, attention_residual, classify, embed_tokens, is_plain_block, mlp_residual,
)

# A merge count: one r for every layer, an explicit per-layer list, or a string spec
# ("13", "13,13,12,...", "decreasing:13"); see ``merge_schedule``.
RSpec = int | Sequence[int] | str

# ToMe's "decreasing" schedule: linear from 1.5 r at the first layer to 0.5 r at the last.
DECREASING_INFLECTION = -0.5


# --------------------------------------------------------------------------------------------
# The merge schedule
# --------------------------------------------------------------------------------------------
def linear_schedule(r: int, depth: int, inflection: float = DECREASING_INFLECTION) -> list[int]:
    """Per-layer r going linearly from ``r * (1 - inflection)`` to ``r * (1 + inflection)``.

    The mean stays about ``r``, so the total merged matches a constant schedule; a negative
    inflection merges more early (ToMe's "decreasing" schedule uses -0.5: 1.5 r -> 0.5 r).
    """
    start, end = r * (1.0 - inflection), r * (1.0 + inflection)
    if depth == 1:
        return [int(r)]
    step = (end - start) / (depth - 1)
    return [max(0, int(start + step * i)) for i in range(depth)]


def parse_r_spec(spec: str, depth: int) -> list[int]:
    """Parse a string merge spec: ``"13"`` (constant), ``"13,12,11,..."`` (one per layer), ``"decreasing:13"``."""
    text = spec.strip().lower()
    try:
        if text.startswith("decreasing:"):
            return linear_schedule(int(text.split(":", 1)[1]), depth)
        if "," in text:
            return [int(v) for v in text.split(",") if v.strip()]
        return [int(text)] * depth
    except ValueError as exc:
        raise ValueError(
            f"Cannot read merge spec {spec!r}: use an integer ('13'), one integer per layer "
            f"('13,13,...'), or 'decreasing:13'."
        ) from exc


def merge_schedule(r: RSpec, depth: int, num_tokens: int, num_protected: int = 1) -> list[int]:
    """The number of tokens each of ``depth`` blocks merges, clipped to what is possible.

    ``r`` is an int (the same r in every layer), a sequence of ``depth`` ints (one per layer), or a
    string spec (see ``parse_r_spec``; ``"decreasing:R"`` is ToMe's decreasing schedule with
    inflection -0.5). ``num_tokens`` counts every token entering the first block, including the
    ``num_protected`` class token(s) that are never merged. Each layer's r is clipped to
    ``(tokens - num_protected) // 2``: no more than the mergeable tokens of the smaller set, so
    at least the protected tokens and one more always remain.
    """
    if isinstance(r, str):
        requested = parse_r_spec(r, depth)
    elif isinstance(r, (int, np.integer)):
        requested = [int(r)] * depth
    else:
        requested = [int(v) for v in r]
    if len(requested) != depth:
        raise ValueError(f"The merge schedule has {len(requested)} values but the model has {depth} blocks.")
    schedule, tokens = [], num_tokens
    for wanted in requested:
        merged = min(max(wanted, 0), (tokens - num_protected) // 2)
        schedule.append(merged)
        tokens -= merged
    return schedule


# --------------------------------------------------------------------------------------------
# Bipartite soft matching and merging (pure tensor functions)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Matching:
    """One round of bipartite matching over a batch; indices are into sets A and B.

    ``kept_a`` [B, Na - r]: A tokens left unmerged, in ascending order (so the class token stays first);
    ``merged_a`` [B, r]: A tokens merged away; ``into_b`` [B, r]: the B token each one joins.
    """

    kept_a: torch.Tensor
    merged_a: torch.Tensor
    into_b: torch.Tensor
    num_a: int
    num_b: int


@scope(MATCHING)
def pick_merges(metric: torch.Tensor, r: int, protect_first: bool = True) -> Matching:
    """ToMe's choice for one block: ``merging.bipartite_match`` (A = even tokens, B = odd, cosine similarity of
    ``metric`` [B, N, D]), then the r best pairs, the same r for every image.

    With ``protect_first`` the first token (the class token, always in A) is never chosen.
    """
    match = bipartite_match(metric, protect_first=protect_first)
    merged_a = match.order[:, :r]
    kept_a = match.order[:, r:].sort(dim=-1).values
    return Matching(kept_a, merged_a, match.partner.gather(1, merged_a),
                    num_a=match.order.shape[1], num_b=metric.shape[1] - match.order.shape[1])


@scope(REDUCTION)
def merge_tokens(
    x: torch.Tensor, sizes: torch.Tensor, matching: Matching
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the matched tokens of ``x`` [B, N, C] into their B partners by size-weighted average.

    ``sizes`` [B, N, 1] counts the original patches in each token. Returns the merged tokens
    [B, N - r, C], ordered as (unmerged A tokens, B tokens), and their sizes [B, N - r, 1].
    """
    new_len = matching.kept_a.shape[1] + matching.num_b
    merged, new_sizes, _ = combine_tokens(x, sizes[..., 0], token_destinations(matching), new_len)
    return merged, new_sizes[..., None]


def token_destinations(matching: Matching) -> torch.Tensor:
    """For each token before the merge, its index after it: [B, N] (long).

    This is the compact form of ToMe's source matrix: composing it layer by layer maps every
    original patch to the token that holds it.
    """
    batch = matching.kept_a.shape[0]
    device = matching.kept_a.device
    kept = matching.kept_a.shape[1]
    a_dest = torch.empty(batch, matching.num_a, dtype=torch.long, device=device)
    a_dest.scatter_(1, matching.kept_a, torch.arange(kept, device=device).expand(batch, -1).contiguous())
    a_dest.scatter_(1, matching.merged_a, kept + matching.into_b)
    b_dest = (kept + torch.arange(matching.num_b, device=device)).expand(batch, -1)
    dest = torch.empty(batch, matching.num_a + matching.num_b, dtype=torch.long, device=device)
    dest[:, 0::2] = a_dest
    dest[:, 1::2] = b_dest
    return dest


# --------------------------------------------------------------------------------------------
# The explicit forward
# --------------------------------------------------------------------------------------------
@dataclass
class ToMeTrace(ReductionTrace):
    """What ToMe did to a batch, per block (layer l = after block l).

    ``tokens_per_layer[l]``: tokens (class token included) after block l.
    ``schedule[l]``: tokens merged in block l.
    ``assignments[l]`` [B, num_patches] int: index of the token (after block l) that holds each
    original patch; class tokens keep indices ``0 .. num_prefix_tokens - 1``.
    ``prefix_assignments[l]`` [B, num_prefix_tokens] int: the same for the class token(s).
    ``sizes[l]`` [B, tokens] float: patches (class token: 1) held by each token after block l.
    """

    tokens_per_layer: list[int]
    schedule: list[int]
    assignments: list[np.ndarray] = field(repr=False)
    prefix_assignments: list[np.ndarray] = field(repr=False)
    sizes: list[np.ndarray] = field(repr=False)
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    patch_size: tuple[int, int]

    def counts_per_block(self, unreduced: Sequence[int]) -> list[int]:
        """Tokens entering each block: block l merges inside itself, so it is entered by what block l-1 left."""
        return [unreduced[0]] + self.tokens_per_layer[:-1]


class ToMeNotApplicable(MethodNotApplicable, TypeError):
    """ToMe does not run on this model (not a timm ViT, or a block the explicit forward does not walk)."""


def check_supported(model: VisionTransformer) -> None:
    """Fail early, with one sentence, on models this forward does not walk correctly."""
    if not isinstance(model, VisionTransformer):
        raise ToMeNotApplicable(f"ToMe needs a timm VisionTransformer, not a {type(model).__name__}.")
    for index, block in enumerate(model.blocks):
        if not is_plain_block(block):
            raise ToMeNotApplicable(
                f"ToMe does not apply here: block {index} is a {type(block).__name__} with "
                f"{type(block.attn).__name__}, and only timm's pre-norm Block with its standard Attention is walked."
            )


# Prefix tokens (class, distillation, register tokens) are never merged. ToMe's reference protects the class token
# by keeping it out of every pair; with more prefix tokens (DeiT's distillation token, registers), all of them are
# kept out: the matching runs over the last prefix token and the patches (that token protected, as a class token
# would be), and the other prefix tokens pass unchanged in front. With one class token this is exactly ToMe; with
# none (global average pooling) every token may merge, and the pooled mean is weighted by token size (``classify``
# with sizes), so that a merged token counts as many times as the patches it holds, as the unmerged mean did.
def _protected_split(num_prefix: int) -> tuple[int, bool]:
    """(tokens passed through in front, whether the first matched token is protected)."""
    return max(num_prefix - 1, 0), num_prefix > 0


def _pass_through(destinations: torch.Tensor, skip: int) -> torch.Tensor:
    """Token destinations of the matched tokens, shifted behind ``skip`` untouched prefix tokens that map to
    themselves: [B, N - skip] -> [B, N]."""
    if skip == 0:
        return destinations
    front = torch.arange(skip, device=destinations.device).expand(destinations.shape[0], -1)
    return torch.cat([front, destinations + skip], dim=1)


def attention_with_size_bias(
    attn: Attention, x: torch.Tensor, key_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Attention with an optional additive key bias [B, 1, 1, N] (fused either way).

    Returns the attention output [B, N, C] and the keys averaged over heads [B, N, head_dim]
    (ToMe's similarity metric).
    """
    result = attention(attn, x, key_bias=key_bias)
    return result.out, result.keys.mean(dim=1)


def size_bias(sizes: torch.Tensor | None, proportional_attention: bool) -> torch.Tensor | None:
    """log(size) per key as an SDPA float mask [B, 1, 1, N]; None while every size is 1 or when off."""
    if not proportional_attention or sizes is None:
        return None
    return sizes.log()[:, None, None, :, 0]


def tome_forward(
    model: VisionTransformer,
    x: torch.Tensor,
    r: RSpec = 13,
    proportional_attention: bool = True,
    return_trace: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ToMeTrace]:
    """Logits of ``model`` on images ``x`` [B, 3, H, W] with ToMe merging ``r`` tokens per block.

    ``r`` follows ``merge_schedule`` (int, per-layer list, or string spec). With
    ``return_trace`` it also returns a ``ToMeTrace`` (the per-layer patch-to-token assignment is
    only built then). The model is only read, never modified.
    """
    check_supported(model)
    x = embed_tokens(model, x)
    batch, num_tokens, _ = x.shape
    prefix = model.num_prefix_tokens
    schedule = merge_schedule(r, len(model.blocks), num_tokens, num_protected=prefix)

    sizes: torch.Tensor | None = None  # None means "all ones" and keeps the first merge-free blocks bias-free
    location = torch.arange(num_tokens, device=x.device).expand(batch, -1) if return_trace else None
    tokens_per_layer, assignments, prefix_assignments, size_records = [], [], [], []

    skip, protect_first = _protected_split(prefix)
    for block, merge_count in zip(model.blocks, schedule):
        x, attended = attention_residual(block, x, key_bias=size_bias(sizes, proportional_attention))
        if merge_count > 0:
            current_sizes = sizes if sizes is not None else x.new_ones(batch, x.shape[1], 1)
            matching = pick_merges(attended.keys.mean(dim=1)[:, skip:], merge_count, protect_first=protect_first)
            merged, merged_sizes = merge_tokens(x[:, skip:], current_sizes[:, skip:], matching)
            x, sizes = torch.cat([x[:, :skip], merged], dim=1), torch.cat([current_sizes[:, :skip], merged_sizes], 1)
            if location is not None:
                location = _pass_through(token_destinations(matching), skip).gather(1, location)
        x = mlp_residual(block, x)

        tokens_per_layer.append(x.shape[1])
        if location is not None:
            assignments.append(location[:, prefix:].cpu().numpy())
            prefix_assignments.append(location[:, :prefix].cpu().numpy())
            layer_sizes = sizes[..., 0] if sizes is not None else x.new_ones(batch, x.shape[1])
            size_records.append(layer_sizes.float().cpu().numpy())

    logits = classify(model, x, sizes)
    if not return_trace:
        return logits
    trace = ToMeTrace(
        tokens_per_layer=tokens_per_layer,
        schedule=schedule,
        assignments=assignments,
        prefix_assignments=prefix_assignments,
        sizes=size_records,
        num_prefix_tokens=prefix,
        grid_size=tuple(model.patch_embed.grid_size),
        patch_size=tuple(model.patch_embed.patch_size),
    )
    return logits, trace


def tome_schedule_forward(model: VisionTransformer, x: torch.Tensor, r: RSpec = 13) -> torch.Tensor:
    """ToMe's token counts without ToMe: each block's attention sees as many tokens as in ``tome_forward`` and
    its MLP as many as remain after merging, the tokens simply truncated (no matching, no size bias).

    Not a classifier: the speed ceiling that ``tome_forward``'s matching and merging are measured against.
    """
    check_supported(model)
    x = embed_tokens(model, x)
    schedule = merge_schedule(r, len(model.blocks), x.shape[1], num_protected=model.num_prefix_tokens)
    for block, merge_count in zip(model.blocks, schedule):
        x, _ = attention_residual(block, x)
        if merge_count > 0:
            x = x[:, : x.shape[1] - merge_count]
        x = mlp_residual(block, x)
    return classify(model, x)


# --------------------------------------------------------------------------------------------
# Reading the trace
# --------------------------------------------------------------------------------------------
def merge_groups(trace: ToMeTrace, layer: int, image: int = 0) -> list[np.ndarray]:
    """The original patch indices held by each patch token after block ``layer`` for one image.

    Entry k lists the patches of token ``num_prefix_tokens + k``; the class token holds no patch
    and is left out. Every patch appears in exactly one entry.
    """
    assignment = trace.assignments[layer][image]
    prefix = trace.num_prefix_tokens
    num_tokens = trace.tokens_per_layer[layer]
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(prefix, num_tokens + 1))
    return [order[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
