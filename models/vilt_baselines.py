"""PuMer's baselines on ViLT: ToMe merging and EViT pruning of the image tokens inside ViLT's single encoder.

ViLT runs one sequence, ``[text tokens, image CLS, image patches]``, through 12 layers; the pooler reads the first
text token. Both baselines act on the image patches only, between a layer's attention and its MLP, as they do in
a ViT; the text tokens and both class tokens are never merged, pruned or moved.

- **ToMe** (``vilt_tome_forward``): in every layer, ToMe's bipartite matching over the image segment (the image CLS
  protected, as ToMe protects a ViT's class token) merges the r most similar pairs by size-weighted average; with
  proportional attention (ToMe's default) every key gets log(size) added to its logit (text tokens: size 1).
- **EViT** (``vilt_evit_forward``): in EViT's layers (its DeiT blocks 3, 6, 9 scaled to the depth), the image
  patches are ranked by the attention the first token (ViLT's CLS, which the answer head reads) pays them, mean
  over heads; the ceil(keep_rate * n) most attended stay and the rest are fused into one token at the end of the
  image segment, their sum weighted by that attention (``models.evit.keep_and_fuse``).

Both walk ``model.vilt``'s own submodules (``models.vilt_pumer``'s embedding and attention) and, at their neutral
setting (r = 0, keep rate 1), return ``model(**inputs).logits``. ``flop_ratio`` picks r or the keep rate whose
counted FLOPs are closest to that share of the unreduced forward's (``models.flop_targets``). Settings are call
arguments; the model is never modified. A batch with padded images (ViLT's processor pads to the largest image)
keeps padding tokens out of every merge; EViT's keep count is then of the batch's patch positions, padding ranked
last. DynamicViT is not offered: its score predictors would have to be trained on VQA first.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from models.evit import keep_and_fuse, kept_count, prune_locations
from models.flop_targets import (REFERENCE_TEXT_TOKENS, Quadratic, counted_flops, keep_rates, kept_per_model,
                                 meta_tokens, pick_for_flop_ratio)
from models.merging import bipartite_match
from models.tome import Matching, RSpec, merge_schedule, merge_tokens, token_destinations
from models.vilt_pumer import PuMerTrace, _attention_bias, _attention_residual, embed_inputs

DEFAULT_TOME_R = 8  # per layer: ViLT-B/32 at 384 px has 145 image tokens; 8 x 12 layers halves the image FLOPs
DEFAULT_KEEP_RATE = 0.7


# ----------------------------------------------------------------------------------------------- token bookkeeping
def _image_merge(metric: torch.Tensor, valid: torch.Tensor | None, r: int) -> Matching:
    """ToMe's matching over one image segment (its CLS first, protected); padding (``valid`` False) never pairs.
    With padding, r is capped at the pairs every sample can form."""
    match = bipartite_match(metric, valid, protect_first=True)
    if valid is not None:
        r = min(r, int(torch.isfinite(match.best).sum(dim=1).min()))
    merged_a = match.order[:, :r]
    return Matching(match.order[:, r:].sort(dim=-1).values, merged_a, match.partner.gather(1, merged_a),
                    num_a=match.order.shape[1], num_b=metric.shape[1] - match.order.shape[1])


def _destinations_valid(valid: torch.Tensor, matching: Matching, new_len: int) -> torch.Tensor:
    """Which merged tokens are real: padding never merges, so each destination is all real or one padding token."""
    return valid.new_zeros(valid.shape[0], new_len).scatter_(1, token_destinations(matching), valid)


def _layer_end(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """ViltLayer after its first residual: layernorm_after, MLP, second residual."""
    return layer.output(layer.intermediate(layer.layernorm_after(hidden)), hidden)


def _counts(valid: torch.Tensor | None, hidden: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    if valid is None:
        batch, tokens = hidden.shape[:2]
        return torch.full((batch,), text_len), torch.full((batch,), tokens - text_len)
    return valid[:, :text_len].sum(dim=1).cpu(), valid[:, text_len:].sum(dim=1).cpu()


class _Counter:
    """Tokens per modality entering each layer, for the trace (only when asked)."""

    def __init__(self, batch: int, layers: int):
        self.text = torch.zeros(batch, layers + 1, dtype=torch.long)
        self.image = torch.zeros(batch, layers + 1, dtype=torch.long)

    def count(self, index: int, valid, hidden, text_len: int) -> None:
        self.text[:, index], self.image[:, index] = _counts(valid, hidden, text_len)

    def trace(self, grid_shape, settings: dict) -> PuMerTrace:
        return PuMerTrace(tuple(grid_shape), self.text[:, 0].numpy(), self.text.numpy(), self.image.numpy(), [],
                          settings)


# ----------------------------------------------------------------------------------------------- the walks
def _tome_walk(layers, hidden: torch.Tensor, valid: torch.Tensor | None, text_len: int, schedule: list[int],
               proportional_attention: bool, counter: _Counter | None = None) -> torch.Tensor:
    """ViLT's encoder layers with ToMe merging ``schedule[i]`` image tokens in layer i. ``valid`` None: no padding
    (every token real; the form the FLOP count runs on meta tensors)."""
    sizes = None  # all ones until the first merge
    full_valid = valid if valid is not None else torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    bias = _attention_bias(full_valid, None, hidden.dtype)
    for index, (layer, r) in enumerate(zip(layers, schedule)):
        if counter is not None:
            counter.count(index, valid, hidden, text_len)
        hidden, _, keys = _attention_residual(layer, hidden, bias, with_probs=False)
        if r > 0:
            sizes = sizes if sizes is not None else hidden.new_ones(hidden.shape[:2])
            image_valid = None if valid is None else valid[:, text_len:]
            matching = _image_merge(keys.mean(dim=1)[:, text_len:], image_valid, r)
            image, image_sizes = merge_tokens(hidden[:, text_len:], sizes[:, text_len:, None], matching)
            hidden = torch.cat([hidden[:, :text_len], image], dim=1)
            sizes = torch.cat([sizes[:, :text_len], image_sizes[..., 0]], dim=1)
            if valid is not None:
                valid = torch.cat([valid[:, :text_len], _destinations_valid(image_valid, matching, image.shape[1])], 1)
            full_valid = valid if valid is not None else full_valid[:, : hidden.shape[1]]
            bias = _attention_bias(full_valid, sizes if proportional_attention else None, hidden.dtype)
        hidden = _layer_end(layer, hidden)
    if counter is not None:
        counter.count(len(schedule), valid, hidden, text_len)
    return hidden


def _cls_attention(layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The first token's attention to every token (B, N), mean over heads, from ``hidden`` entering the layer:
    its one row of the layer's attention, computed apart so that the layer itself keeps fused attention."""
    heads = layer.attention.attention
    normed = layer.layernorm_before(hidden)
    size = heads.attention_head_size
    query = heads.query(normed[:, :1]).view(hidden.shape[0], 1, -1, size).transpose(1, 2)
    key = heads.key(normed).view(hidden.shape[0], hidden.shape[1], -1, size).transpose(1, 2)
    return torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(size) + bias, dim=-1).mean(dim=1)[:, 0]


def _evit_walk(layers, hidden: torch.Tensor, valid: torch.Tensor | None, text_len: int, keep_rate: float,
               fuse: bool, counter: _Counter | None = None) -> torch.Tensor:
    """ViLT's encoder layers with EViT in its layers: the image patches ranked by the first token's attention."""
    locations = prune_locations(len(layers)) if keep_rate < 1.0 else ()
    full_valid = valid if valid is not None else torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    bias = _attention_bias(full_valid, None, hidden.dtype)
    for index, layer in enumerate(layers):
        if counter is not None:
            counter.count(index, valid, hidden, text_len)
        attention = _cls_attention(layer, hidden, bias) if index in locations else None
        hidden, _, _ = _attention_residual(layer, hidden, bias, with_probs=False)
        patches = hidden.shape[1] - text_len - 1
        keep = kept_count(patches, keep_rate) if attention is not None else patches
        if keep < patches:
            image, kept, rest = keep_and_fuse(hidden[:, text_len:], attention[:, text_len + 1:], 1, keep, fuse)
            hidden = torch.cat([hidden[:, :text_len], image], dim=1)
            if valid is not None:
                patch_valid = valid[:, text_len + 1:]
                parts = [valid[:, : text_len + 1], patch_valid.gather(1, kept)]
                parts += [patch_valid.gather(1, rest).any(dim=1, keepdim=True)] if fuse else []
                valid = torch.cat(parts, dim=1)
            full_valid = valid if valid is not None else full_valid[:, : hidden.shape[1]]
            bias = _attention_bias(full_valid, None, hidden.dtype)
        hidden = _layer_end(layer, hidden)
    if counter is not None:
        counter.count(len(layers), valid, hidden, text_len)
    return hidden


# ----------------------------------------------------------------------------------------------- FLOP targets
@dataclass(frozen=True)
class _Costs:
    """FLOPs of the parts of ViLT's forward (``models.flop_targets``), counted on a meta copy."""

    constant: float  # patch embedding, pooler, answer head
    attention: Quadratic  # a layer up to its first residual, over n tokens
    mlp: Quadratic  # a layer's MLP residual
    cls_row: Quadratic  # EViT's first-token attention row
    match: Callable[[int], float]  # ToMe's matching over n image tokens


def _costs(meta: nn.Module, side: int) -> _Costs:
    vilt, config = meta.vilt, meta.config
    layer, width = vilt.encoder.layer[0], config.hidden_size
    pixels = torch.zeros(1, 3, side, side, device="meta")
    constant = counted_flops(lambda: (vilt.embeddings.patch_embeddings(pixels),
                                      meta.classifier(vilt.pooler(vilt.layernorm(meta_tokens(2, width))))))

    def bias(n: int) -> torch.Tensor:
        return _attention_bias(torch.ones(1, n, dtype=torch.bool, device="meta"), None, torch.float32)

    head_width = width // config.num_attention_heads
    return _Costs(
        constant,
        Quadratic.counted(lambda n: counted_flops(lambda: _attention_residual(layer, meta_tokens(n, width), bias(n),
                                                                              False))),
        Quadratic.counted(lambda n: counted_flops(lambda: _layer_end(layer, meta_tokens(n, width)))),
        Quadratic.counted(lambda n: counted_flops(lambda: _cls_attention(layer, meta_tokens(n, width), bias(n)))),
        functools.lru_cache(maxsize=None)(
            lambda n: counted_flops(lambda: bipartite_match(meta_tokens(n, head_width), None, True))))


def tome_flops(costs: _Costs, text_len: int, image_tokens: int, schedule: list[int]) -> float:
    """FLOPs of ``vilt_tome_forward`` along its merge ``schedule``, from the counted parts."""
    total, n = costs.constant, image_tokens
    for r in schedule:
        total += costs.attention(text_len + n) + (costs.match(n) if r > 0 else 0.0)
        n -= r
        total += costs.mlp(text_len + n)
    return total


def evit_flops(costs: _Costs, text_len: int, patches: int, layers: int, keep_rate: float, fuse: bool) -> float:
    """FLOPs of ``vilt_evit_forward`` at ``keep_rate``, from the counted parts (``patches``: image tokens but the
    image CLS)."""
    locations = prune_locations(layers) if keep_rate < 1.0 else ()
    total, n = costs.constant, patches
    for index in range(layers):
        total += costs.attention(text_len + 1 + n)
        if index in locations:
            total += costs.cls_row(text_len + 1 + n)
            keep = kept_count(n, keep_rate)
            n = keep + int(fuse) if keep < n else n
        total += costs.mlp(text_len + 1 + n)
    return total


def _model_costs(model: nn.Module, side: int) -> _Costs:
    return kept_per_model(model, ("vilt", side), lambda meta: _costs(meta, side))


def tome_r_for_flops(model: nn.Module, side: int, ratio: float) -> int:
    """The constant r whose ViLT forward at ``side`` px (the reference question) has the counted FLOPs closest to
    ``ratio`` of r = 0's."""
    layers, costs = len(model.vilt.encoder.layer), _model_costs(model, side)
    image_tokens = 1 + (side // model.config.patch_size) ** 2
    top = merge_schedule(image_tokens, layers, image_tokens)[0]
    return pick_for_flop_ratio(list(range(top + 1)), lambda r: tome_flops(
        costs, REFERENCE_TEXT_TOKENS, image_tokens, merge_schedule(r, layers, image_tokens)), ratio)


def evit_keep_for_flops(model: nn.Module, side: int, ratio: float, fuse: bool = True) -> float:
    """The keep rate (in steps of 0.01) whose ViLT forward at ``side`` px (the reference question) has the counted
    FLOPs closest to ``ratio`` of keep rate 1's."""
    layers, costs = len(model.vilt.encoder.layer), _model_costs(model, side)
    patches = (side // model.config.patch_size) ** 2
    return pick_for_flop_ratio(keep_rates(), lambda k: evit_flops(costs, REFERENCE_TEXT_TOKENS, patches, layers, k,
                                                                  fuse), ratio)


def _square_side(inputs: Mapping[str, torch.Tensor]) -> int:
    """The model's input size: the shortest side of the (padded) pixels, as ViLT's processor resizes it."""
    return int(min(inputs["pixel_values"].shape[-2:]))


# ----------------------------------------------------------------------------------------------- forwards
def _run(model: nn.Module, inputs: Mapping[str, torch.Tensor], walk, return_trace: bool, settings: dict):
    vilt = model.vilt
    embedded = embed_inputs(vilt, inputs)
    valid = None if bool(embedded.valid.all()) else embedded.valid
    counter = _Counter(embedded.hidden.shape[0], len(vilt.encoder.layer)) if return_trace else None
    hidden = walk(vilt.encoder.layer, embedded.hidden, valid, embedded.text_len, counter)
    logits = model.classifier(vilt.pooler(vilt.layernorm(hidden)))
    return (logits, counter.trace(embedded.grid_shape, settings)) if return_trace else logits


def vilt_tome_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], r: RSpec | None = None,
                      proportional_attention: bool = True, flop_ratio: float | None = None,
                      return_trace: bool = False):
    """ViltForQuestionAnswering's forward with ToMe merging ``r`` image tokens per layer (an int, a per-layer list
    or ToMe's ``"decreasing:R"``; default ``DEFAULT_TOME_R``), or, with ``flop_ratio``, the constant r whose
    counted FLOPs are closest to that share of the unreduced forward's (``r`` must then be left out). With r = 0
    it equals ``model(**inputs).logits``. ``return_trace``: also a ``PuMerTrace`` of the tokens per modality
    entering each layer (no reduce steps)."""
    if flop_ratio is not None:
        if r is not None:
            raise ValueError("Give ToMe's r or a FLOP ratio, not both.")
        r = tome_r_for_flops(model, _square_side(inputs), flop_ratio)
    r = DEFAULT_TOME_R if r is None else r
    layers = len(model.vilt.encoder.layer)

    def walk(ls, hidden, valid, text_len, counter):
        schedule = merge_schedule(r, layers, hidden.shape[1] - text_len)
        return _tome_walk(ls, hidden, valid, text_len, schedule, proportional_attention, counter)

    return _run(model, inputs, walk, return_trace, dict(method="tome", r=r if isinstance(r, (int, str)) else list(r),
                                                      proportional_attention=proportional_attention))


def vilt_evit_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], keep_rate: float | None = None,
                      fuse: bool = True, flop_ratio: float | None = None, return_trace: bool = False):
    """ViltForQuestionAnswering's forward with EViT keeping ``keep_rate`` (default 0.7) of the image patches in each
    of EViT's layers, or, with ``flop_ratio``, the keep rate whose counted FLOPs are closest to that share of the
    unreduced forward's. With keep rate 1 it equals ``model(**inputs).logits``."""
    if flop_ratio is not None:
        if keep_rate is not None:
            raise ValueError("Give EViT's keep rate or a FLOP ratio, not both.")
        keep_rate = evit_keep_for_flops(model, _square_side(inputs), flop_ratio, fuse)
    keep_rate = DEFAULT_KEEP_RATE if keep_rate is None else keep_rate
    kept_count(1, keep_rate)  # refuses a rate outside (0, 1]

    def walk(ls, hidden, valid, text_len, counter):
        return _evit_walk(ls, hidden, valid, text_len, keep_rate, fuse, counter)

    return _run(model, inputs, walk, return_trace, dict(method="evit", keep_rate=keep_rate, fuse=fuse))

