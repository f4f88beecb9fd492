"""PuMer's baselines on METER: ToMe merging and EViT pruning of the image tokens inside METER's image tower.

METER encodes the image with CLIP's ViT-B/16 visual encoder (11 blocks) before its 6 co-attention (fusion) blocks.
The baselines act where they act in a ViT, inside that tower, between a block's attention and its MLP; the text
(RoBERTa) is never touched, and the fusion blocks run as METER runs them, on fewer image tokens:

- **ToMe** (``meter_tome_forward``): in every tower block, ToMe's bipartite matching (the image CLS protected)
  merges the r most similar token pairs by size-weighted average; with proportional attention (ToMe's default)
  log(size) is added to the logits of every attention over the image tokens, in the tower and in the fusion blocks
  (the image self-attention and the text's cross-attention to the image).
- **EViT** (``meter_evit_forward``): in EViT's blocks (its DeiT blocks 3, 6, 9 scaled to the tower's depth) the
  patches are ranked by the image CLS's attention, mean over heads; the ceil(keep_rate * n) most attended stay and
  the rest are fused into one token, their sum weighted by that attention (``models.evit.keep_and_fuse``).

Both call the model's own submodules (CLIP's embeddings, norms, projections and MLPs; the fusion blocks through
``models.meter_pumer``) and, at the neutral setting (r = 0, keep rate 1), return ``model(**inputs)``. ``flop_ratio``
picks r or the keep rate whose counted FLOPs are closest to that share of the unreduced forward's
(``models.flop_targets``). Settings are call arguments; the model is never modified. DynamicViT is not offered: its
score predictors would have to be trained on VQA first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.evit import keep_and_fuse, kept_count, prune_locations
from models.flop_targets import (REFERENCE_TEXT_TOKENS, Quadratic, counted_flops, keep_rates, kept_per_model,
                                 meta_tokens, pick_for_flop_ratio)
from models.meter_pumer import _fusion_block, _Reduction, _Streams
from models.merging import bipartite_match
from models.tome import RSpec, merge_schedule, merge_tokens, pick_merges
from models.vilt_pumer import PuMerTrace

DEFAULT_TOME_R = 40  # per tower block: 1297 tokens at 576 px; 40 x 11 blocks leaves a third of them
DEFAULT_KEEP_RATE = 0.7
_UNREDUCED_FUSION = _Reduction(0.0, 0.0, 0.0, False, False, "block_input")  # METER's own order


# ----------------------------------------------------------------------------------------------- CLIP tower parts
def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _attention_residual(layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor | None):
    """CLIPEncoderLayer up to its first residual, with an optional additive key bias (B, 1, 1, N). Returns (hidden,
    keys (B, H, N, d))."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    query, key, value = (_heads(p(normed), attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attn.scale)
    return hidden + attn.out_proj(out.transpose(1, 2).reshape(hidden.shape)), key


def _mlp_residual(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def _cls_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The image CLS's attention to every token (B, N), mean over heads, of the block ``hidden`` enters: its one
    row, computed apart so that the block keeps fused attention."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    query, key = _heads(attn.q_proj(normed[:, :1]), attn.head_dim), _heads(attn.k_proj(normed), attn.head_dim)
    return torch.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)[:, 0]


def _tome_tower(layers, hidden: torch.Tensor, schedule: list[int], proportional_attention: bool, counts: list):
    """CLIP's blocks with ToMe merging ``schedule[i]`` tokens in block i. Returns (hidden, sizes (B, N) or None)."""
    sizes = None
    for layer, r in zip(layers, schedule):
        counts.append(hidden.shape[1])
        bias = sizes.log()[:, None, None, :] if sizes is not None and proportional_attention else None
        hidden, key = _attention_residual(layer, hidden, bias)
        if r > 0:
            sizes = sizes if sizes is not None else hidden.new_ones(hidden.shape[:2])
            hidden, merged = merge_tokens(hidden, sizes[..., None], pick_merges(key.mean(dim=1), r))
            sizes = merged[..., 0]
        hidden = _mlp_residual(layer, hidden)
    counts.append(hidden.shape[1])
    return hidden, sizes


def _evit_tower(layers, hidden: torch.Tensor, keep_rate: float, fuse: bool, counts: list):
    """CLIP's blocks with EViT in its blocks (the image CLS's attention ranks the other tokens)."""
    locations = prune_locations(len(layers)) if keep_rate < 1.0 else ()
    for index, layer in enumerate(layers):
        counts.append(hidden.shape[1])
        attention = _cls_attention(layer, hidden) if index in locations else None
        hidden, _ = _attention_residual(layer, hidden, None)
        keep = kept_count(hidden.shape[1] - 1, keep_rate) if attention is not None else hidden.shape[1] - 1
        if keep < hidden.shape[1] - 1:
            hidden = keep_and_fuse(hidden, attention[:, 1:], 1, keep, fuse)[0]
        hidden = _mlp_residual(layer, hidden)
    counts.append(hidden.shape[1])
    return hidden, None


# ----------------------------------------------------------------------------------------------- the forward
def _image_out(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """METER's encode_image after the tower: ``ln_post`` on every token, projected, plus token type 1."""
    image = model.cross_modal_image_transform(model.vit_model.post_layernorm(hidden))
    return image + model.token_type_embeddings(torch.ones(image.shape[:2], dtype=torch.long, device=image.device))


def _fuse_and_classify(model: nn.Module, x: torch.Tensor, text_valid: torch.Tensor, y: torch.Tensor,
                       image_sizes: torch.Tensor | None, proportional_attention: bool) -> torch.Tensor:
    """METER's fusion blocks (its own order) over the text and the (reduced) image tokens, then the answer head."""
    ones = torch.ones(y.shape[:2], dtype=y.dtype, device=y.device)
    streams = _Streams(x, y, text_valid, torch.ones(y.shape[:2], dtype=torch.bool, device=y.device),
                       torch.ones(text_valid.shape, dtype=x.dtype, device=x.device),
                       ones if image_sizes is None else image_sizes, x.shape[1],
                       proportional_attention and image_sizes is not None)
    for index, layers in enumerate(zip(model.cross_modal_text_layers, model.cross_modal_image_layers)):
        _fusion_block(*layers, streams, False, _UNREDUCED_FUSION, None, index)
    return model.classify(streams.x, streams.y)


def _run(model: nn.Module, inputs: Mapping[str, torch.Tensor], tower: Callable, proportional_attention: bool,
         return_trace: bool, settings: dict):
    input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    text_valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    x = model.encode_text(input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids))
    vision, counts = model.vit_model, []
    hidden = vision.pre_layrnorm(vision.embeddings(inputs["pixel_values"]))
    hidden, sizes = tower(vision.encoder.layers, hidden, counts)
    logits = _fuse_and_classify(model, x, text_valid, _image_out(model, hidden), sizes, proportional_attention)
    if not return_trace:
        return logits
    batch, grid = input_ids.shape[0], model.config.grid
    image = torch.tensor(counts).expand(batch, -1).numpy()
    text = text_valid.sum(dim=1, keepdim=True).expand(-1, len(counts)).cpu().numpy()
    return logits, PuMerTrace((grid, grid), text[:, 0], text, image, [], {**settings, "layers": "image tower"})


def meter_tome_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], r: RSpec | None = None,
                       proportional_attention: bool = True, flop_ratio: float | None = None,
                       return_trace: bool = False):
    """METER's VQA forward with ToMe merging ``r`` tokens per block of its image tower (an int, a per-block list or
    ``"decreasing:R"``; default ``DEFAULT_TOME_R``), or, with ``flop_ratio``, the constant r whose counted FLOPs are
    closest to that share of the unreduced forward's. With r = 0 it equals ``model(**inputs)``. ``return_trace``:
    also a ``PuMerTrace`` whose columns count the image tokens entering each tower block (text: unchanged)."""
    if flop_ratio is not None:
        if r is not None:
            raise ValueError("Give ToMe's r or a FLOP ratio, not both.")
        r = tome_r_for_flops(model, flop_ratio)
    r = DEFAULT_TOME_R if r is None else r
    layers = len(model.vit_model.encoder.layers)

    def tower(blocks, hidden, counts):
        return _tome_tower(blocks, hidden, merge_schedule(r, layers, hidden.shape[1]), proportional_attention, counts)

    return _run(model, inputs, tower, proportional_attention, return_trace,
                dict(method="tome", r=r if isinstance(r, (int, str)) else list(r),
                     proportional_attention=proportional_attention))


def meter_evit_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], keep_rate: float | None = None,
                       fuse: bool = True, flop_ratio: float | None = None, return_trace: bool = False):
    """METER's VQA forward with EViT keeping ``keep_rate`` (default 0.7) of the image tower's patch tokens in each of
    EViT's blocks, or, with ``flop_ratio``, the keep rate whose counted FLOPs are closest to that share of the
    unreduced forward's. With keep rate 1 it equals ``model(**inputs)``."""
    if flop_ratio is not None:
        if keep_rate is not None:
            raise ValueError("Give EViT's keep rate or a FLOP ratio, not both.")
        keep_rate = evit_keep_for_flops(model, flop_ratio, fuse)
    keep_rate = DEFAULT_KEEP_RATE if keep_rate is None else keep_rate
    kept_count(1, keep_rate)  # refuses a rate outside (0, 1]
    return _run(model, inputs, lambda blocks, hidden, counts: _evit_tower(blocks, hidden, keep_rate, fuse, counts),
                False, return_trace, dict(method="evit", keep_rate=keep_rate, fuse=fuse))


# ----------------------------------------------------------------------------------------------- FLOP targets
@dataclass(frozen=True)
class _Costs:
    """FLOPs of the parts of METER's forward (``models.flop_targets``), counted on a meta copy."""

    constant: float  # the question through RoBERTa, the patch embedding, the answer head
    attention: Quadratic  # a tower block up to its first residual, over n image tokens
    mlp: Quadratic
    cls_row: Quadratic  # EViT's image-CLS attention row
    match: Callable[[int], float]  # ToMe's matching over n tokens
    after: Quadratic  # the tower's output projection and every fusion block, over n image tokens


def _costs(meta: nn.Module) -> _Costs:
    config, vision = meta.config, meta.vit_model
    layer, width, side = vision.encoder.layers[0], config.vision_width, config.image_size
    ids = torch.zeros(1, REFERENCE_TEXT_TOKENS, dtype=torch.long, device="meta")
    text = meta_tokens(REFERENCE_TEXT_TOKENS, config.hidden_size)
    constant = counted_flops(lambda: (meta.encode_text(ids, None), vision.embeddings(torch.zeros(
        1, 3, side, side, device="meta")), meta.classify(text, text)))
    text_valid = torch.ones(1, REFERENCE_TEXT_TOKENS, dtype=torch.bool, device="meta")
    blocks = len(meta.cross_modal_text_layers)

    def after(n: int) -> float:
        image = meta_tokens(n, width)
        return counted_flops(lambda: _image_out(meta, image)) + blocks * counted_flops(
            lambda: _fusion_block(meta.cross_modal_text_layers[0], meta.cross_modal_image_layers[0], _Streams(
                text, meta_tokens(n, config.hidden_size), text_valid, torch.ones(1, n, dtype=torch.bool, device="meta"),
                torch.ones(1, REFERENCE_TEXT_TOKENS, device="meta"), torch.ones(1, n, device="meta"),
                REFERENCE_TEXT_TOKENS, False), False, _UNREDUCED_FUSION, None, 0))

    head_dim = layer.self_attn.head_dim
    return _Costs(
        constant, Quadratic.counted(lambda n: counted_flops(lambda: _attention_residual(layer, meta_tokens(n, width),
                                                                                        None))),
        Quadratic.counted(lambda n: counted_flops(lambda: _mlp_residual(layer, meta_tokens(n, width)))),
        Quadratic.counted(lambda n: counted_flops(lambda: _cls_attention(layer, meta_tokens(n, width)))),
        functools.lru_cache(maxsize=None)(
            lambda n: counted_flops(lambda: bipartite_match(meta_tokens(n, head_dim), None, True))),
        Quadratic.counted(after))


def tome_flops(costs: _Costs, tokens: int, schedule: list[int]) -> float:
    """FLOPs of ``meter_tome_forward`` along its merge ``schedule`` (``tokens``: entering the tower)."""
    total = costs.constant
    for r in schedule:
        total += costs.attention(tokens) + (costs.match(tokens) if r > 0 else 0.0)
        tokens -= r
        total += costs.mlp(tokens)
    return total + costs.after(tokens)


def evit_flops(costs: _Costs, tokens: int, layers: int, keep_rate: float, fuse: bool) -> float:
    """FLOPs of ``meter_evit_forward`` at ``keep_rate`` (``tokens``: entering the tower, its CLS included)."""
    locations = prune_locations(layers) if keep_rate < 1.0 else ()
    total = costs.constant
    for index in range(layers):
        total += costs.attention(tokens)
        if index in locations:
            total += costs.cls_row(tokens)
            keep = kept_count(tokens - 1, keep_rate)
            tokens = 1 + keep + int(fuse) if keep < tokens - 1 else tokens
        total += costs.mlp(tokens)
    return total + costs.after(tokens)


def _model_costs(model: nn.Module) -> tuple[_Costs, int, int]:
    """(costs, image tokens entering the tower, tower blocks) at the model's size."""
    costs = kept_per_model(model, ("meter", model.config.image_size), _costs)
    return costs, 1 + model.config.grid ** 2, len(model.vit_model.encoder.layers)


def tome_r_for_flops(model: nn.Module, ratio: float) -> int:
    """The constant r whose METER forward (the reference question) has the counted FLOPs closest to ``ratio`` of
    r = 0's."""
    costs, tokens, layers = _model_costs(model)
    top = merge_schedule(tokens, layers, tokens)[0]
    return pick_for_flop_ratio(list(range(top + 1)),
                               lambda r: tome_flops(costs, tokens, merge_schedule(r, layers, tokens)), ratio)


def evit_keep_for_flops(model: nn.Module, ratio: float, fuse: bool = True) -> float:
    """The keep rate (in steps of 0.01) whose METER forward (the reference question) has the counted FLOPs closest
    to ``ratio`` of keep rate 1's."""
    costs, tokens, layers = _model_costs(model)
    return pick_for_flop_ratio(keep_rates(), lambda k: evit_flops(costs, tokens, layers, k, fuse), ratio)
