"""PuMer on METER: text-informed image pruning and modality-aware merging in the co-attention (fusion) layers.

An explicit forward over ``models.meter.MeterForQuestionAnswering``'s own submodules; with every ratio at 0 it
returns ``model(**inputs)``. Settings are call arguments; the model is never modified. The decisions reuse
``models.vilt_pumer`` (scores, pruning, bipartite matching, size-weighted merging, the trace).

Where and how (PuMer's code: csarron/PuMer ``meter/modules_meter.py`` ``BertCrossLayer`` and
``meter/modeling_meter.py``; the decisions themselves are ``models.vilt_pumer.plan_reduction``'s):
- A reduce step runs inside the *text* co-attention layer of a fusion block, after its cross-attention and
  before its MLP. Image tokens (the block's image input, CLS included) are ranked by the text-to-image
  cross-attention (mean over heads, summed over the text) and the best ``n - round(prune_ratio * n)`` are kept in
  score order; they merge among themselves by the keys of that cross-attention (mean over heads), the text by the
  keys of its self-attention, as in ``models.vilt_pumer``.
- PuMer's METER-VQA setting: ``reduce_layers=[0,2,4,6]`` with prune, image merge and text merge ratios 0.2.
  Its layer counter steps by 2 per fusion block (one text and one image layer), so these are fusion blocks
  0, 1, 2 and 3 of 6: ``DEFAULT_REDUCE_LAYERS`` here counts fusion blocks.
- PuMer's code runs the image layer of *every* fusion block after the text layer, over its output
  (``image_context="text_output"``, the default). METER itself, and the released METER weights, run both layers
  of a block on the block's inputs: ``image_context="block_input"`` (then, in a reduce block, the text input
  merged into the same groups) is that order, and with every ratio 0 it equals ``model(**inputs)``.
- Corrections as in ``models.vilt_pumer``: ``protect_image_cls`` (the image pooler then always reads the image
  CLS; in PuMer's code it reads whichever token ranked first) and ``size_weighted``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from models.vilt_pumer import (PuMerTrace, _attention_bias, _Embedded, _Tracer, apply_reduction, combine_tokens,
                               plan_reduction, project_and_attend)

DEFAULT_REDUCE_LAYERS = (0, 1, 2, 3)  # fusion blocks; PuMer's [0, 2, 4, 6] in its text+image layer count
DEFAULT_PRUNE_RATIO = 0.2
DEFAULT_IMAGE_MERGE_RATIO = 0.2
DEFAULT_TEXT_MERGE_RATIO = 0.2
IMAGE_CONTEXTS = ("text_output", "block_input")  # PuMer's code, METER's own order


def _attend(attention: nn.Module, hidden: torch.Tensor, context: torch.Tensor, bias: torch.Tensor,
            with_probs: bool):
    """transformers' RobertaAttention (self-attention when ``context`` is ``hidden``, else cross-attention)
    through its submodules. Returns (output after the residual norm, probs (B, H, N, M) or None, keys
    (B, H, M, d)). Probabilities are materialised only when asked; otherwise fused attention runs."""
    out, probs, key = project_and_attend(attention.self, hidden, context, bias, with_probs)
    return attention.output(out, hidden), probs, key


def _as_joint_probs(text_to_image: torch.Tensor, text_len: int) -> torch.Tensor:
    """Text-to-image probabilities (B, H, T, I) laid out as rows of a [text, image] joint attention
    (B, 1, T, T + I), the layout ``vilt_pumer.text_to_image_scores`` reads (text columns unused: zeros)."""
    mean = text_to_image.mean(dim=1, keepdim=True)
    return torch.cat([mean.new_zeros(*mean.shape[:3], text_len), mean], dim=-1)


@dataclass(frozen=True)
class _Reduction:
    """How a reduce step decides (the forward's arguments)."""

    prune_ratio: float
    image_merge_ratio: float
    text_merge_ratio: float
    protect_image_cls: bool
    size_weighted: bool
    image_context: str


@dataclass
class _Streams:
    """The text and image tokens between fusion layers: hidden states, which tokens are real, the tokens each one
    holds (merged sizes), the text length, and the attention biases those give."""

    x: torch.Tensor  # text (B, T, D)
    y: torch.Tensor  # image (B, I, D)
    text_valid: torch.Tensor
    image_valid: torch.Tensor
    text_sizes: torch.Tensor
    image_sizes: torch.Tensor
    text_len: int
    proportional_attention: bool
    text_bias: torch.Tensor | None = None
    image_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.update_biases()

    def update_biases(self) -> None:
        self.text_bias = _attention_bias(self.text_valid, self.text_sizes if self.proportional_attention else None,
                                         self.x.dtype)
        self.image_bias = _attention_bias(self.image_valid,
                                          self.image_sizes if self.proportional_attention else None, self.y.dtype)

    def valid(self) -> torch.Tensor:
        return torch.cat([self.text_valid, self.image_valid], 1)


def _encode(model: nn.Module, inputs: Mapping[str, torch.Tensor], proportional_attention: bool) -> _Streams:
    """Both encoders' outputs, every token real and of size 1."""
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    x = model.encode_text(input_ids, attention_mask)
    y = model.encode_image(inputs["pixel_values"])
    text_valid = attention_mask.bool()
    image_valid = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
    return _Streams(x, y, text_valid, image_valid, torch.ones(text_valid.shape, dtype=x.dtype, device=x.device),
                    torch.ones(image_valid.shape, dtype=y.dtype, device=y.device), x.shape[1],
                    proportional_attention)


def _start_trace(model: nn.Module, streams: _Streams, blocks: int) -> _Tracer:
    grid = model.config.grid
    cells = torch.arange(grid * grid, device=streams.y.device).expand(streams.y.shape[0], -1)
    return _Tracer(_Embedded(torch.cat([streams.x, streams.y], 1), streams.valid(), streams.text_len, cells,
                             (grid, grid)), blocks)


def _reduce(streams: _Streams, crossed: torch.Tensor, text_keys: torch.Tensor, image_keys: torch.Tensor,
            probs: torch.Tensor | None, reduction: _Reduction, tracer: _Tracer | None, index: int):
    """PuMer's reduce step inside a text layer, after its cross-attention: prune and merge the image tokens and
    merge the text (``crossed``, the block's image input). Updates ``streams`` and returns (the reduced text,
    the text input merged into the same groups for METER's order, else the text input)."""
    r = reduction
    text_len = streams.text_len
    plan = plan_reduction(torch.cat([text_keys.mean(dim=1), image_keys.mean(dim=1)], dim=1), streams.valid(),
                          None if probs is None else _as_joint_probs(probs, text_len), text_len,
                          r.prune_ratio, r.image_merge_ratio, r.text_merge_ratio, r.protect_image_cls)
    text_input = streams.x  # METER's order: the image layer attends to the block's text input
    if r.image_context == "block_input":
        text_input = combine_tokens(streams.x, streams.text_sizes, plan.text_destination, plan.text_count,
                                    r.size_weighted)[0]
    hidden, sizes, valid, text_len = apply_reduction(
        torch.cat([crossed, streams.y], dim=1), torch.cat([streams.text_sizes, streams.image_sizes], dim=1),
        streams.x.shape[1], plan, r.size_weighted)
    crossed, streams.y = hidden[:, :text_len], hidden[:, text_len:]
    streams.text_sizes, streams.image_sizes = sizes[:, :text_len], sizes[:, text_len:]
    streams.text_valid, streams.image_valid = valid[:, :text_len], valid[:, text_len:]
    streams.text_len = text_len
    streams.update_biases()
    if tracer is not None:
        tracer.step(index, plan, valid, text_len)
    return crossed, text_input


def _fusion_block(text_layer: nn.Module, image_layer: nn.Module, streams: _Streams, reduce_here: bool,
                  reduction: _Reduction, tracer: _Tracer | None, index: int) -> None:
    """One fusion block (its text layer, with a reduce step where asked, then its image layer) on ``streams``."""
    x = streams.x
    attended, _, text_keys = _attend(text_layer.attention, x, x, streams.text_bias, with_probs=False)
    crossed, probs, image_keys = _attend(text_layer.crossattention, attended, streams.y, streams.image_bias,
                                         with_probs=reduce_here and reduction.prune_ratio > 0)
    text_input = x  # METER's order: the image layer attends to the block's text input
    if reduce_here:
        crossed, text_input = _reduce(streams, crossed, text_keys, image_keys, probs, reduction, tracer, index)
    streams.x = text_layer.output(text_layer.intermediate(crossed), crossed)
    attended, _, _ = _attend(image_layer.attention, streams.y, streams.y, streams.image_bias, with_probs=False)
    text_context = streams.x if reduction.image_context == "text_output" else text_input
    crossed, _, _ = _attend(image_layer.crossattention, attended, text_context, streams.text_bias, with_probs=False)
    streams.y = image_layer.output(image_layer.intermediate(crossed), crossed)


def meter_pumer_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor],
                        prune_ratio: float = DEFAULT_PRUNE_RATIO,
                        image_merge_ratio: float = DEFAULT_IMAGE_MERGE_RATIO,
                        text_merge_ratio: float = DEFAULT_TEXT_MERGE_RATIO,
                        reduce_layers: Sequence[int] = DEFAULT_REDUCE_LAYERS, return_trace: bool = False,
                        proportional_attention: bool = False, image_context: str = "text_output",
                        protect_image_cls: bool = False, size_weighted: bool = False):
    """METER's VQA forward with PuMer in the fusion blocks ``reduce_layers`` (0-based), deciding as PuMer's code
    does. ``inputs``: a MeterProcessor output (input_ids, attention_mask, pixel_values). ``image_context``: what
    each image layer attends to, ``"text_output"`` (PuMer's code) or ``"block_input"`` (METER's order; with all
    ratios 0 it then equals ``model(**inputs)``). Returns the logits (B, num_labels), or
    ``(logits, PuMerTrace)`` when ``return_trace``: the trace's column ``i`` counts the tokens entering fusion
    block ``i``, the last what leaves the fusion."""
    if image_context not in IMAGE_CONTEXTS:
        raise ValueError(f"image_context must be one of {IMAGE_CONTEXTS}, not {image_context!r}")
    streams = _encode(model, inputs, proportional_attention)
    reduction = _Reduction(prune_ratio, image_merge_ratio, text_merge_ratio, protect_image_cls, size_weighted,
                           image_context)
    reducing = any(r > 0 for r in (prune_ratio, image_merge_ratio, text_merge_ratio))
    pairs = list(zip(model.cross_modal_text_layers, model.cross_modal_image_layers))
    tracer = _start_trace(model, streams, len(pairs)) if return_trace else None
    for index, (text_layer, image_layer) in enumerate(pairs):
        if tracer is not None:
            tracer.count(index, streams.valid(), streams.text_len)
        _fusion_block(text_layer, image_layer, streams, reducing and index in reduce_layers, reduction, tracer,
                      index)
    logits = model.classify(streams.x, streams.y)
    if tracer is None:
        return logits
    tracer.count(len(pairs), streams.valid(), streams.text_len)
    return logits, tracer.finish(dict(reduce_layers=list(reduce_layers), prune_ratio=prune_ratio,
                                      image_merge_ratio=image_merge_ratio, text_merge_ratio=text_merge_ratio,
                                      proportional_attention=proportional_attention,
                                      image_context=image_context, protect_image_cls=protect_image_cls,
                                      size_weighted=size_weighted))


__all__ = ["DEFAULT_REDUCE_LAYERS", "DEFAULT_PRUNE_RATIO", "DEFAULT_IMAGE_MERGE_RATIO",
           "DEFAULT_TEXT_MERGE_RATIO", "IMAGE_CONTEXTS", "PuMerTrace", "meter_pumer_forward"]
