"""ViLT (transformers) with PuMer: text-informed image pruning and modality-aware merging, as an explicit forward.

PuMer (Cao et al., ACL 2023) reduces tokens inside a few encoder layers, between attention and MLP:
1. prune the image tokens that the text attends to least,
2. merge the remaining image tokens among themselves with ToMe's bipartite matching,
3. merge the text tokens among themselves the same way; the two modalities never mix.

``pumer_forward`` walks ``model.vilt``'s own submodules, so with every ratio at 0 it returns the logits of
``model(**inputs)``. Every setting is an argument; the model is never modified.

Decisions are PuMer's code's (csarron/PuMer ``vilt/vit_vilt.py`` ``Block.forward`` and ``reducer.py``, with
sim_method=mean_head, merge_style=tome), by default:
- ``image_len`` counts the image CLS token: ``prune_r = round(prune_ratio * image_len)`` and
  ``merge_r = round(image_merge_ratio * image_len)`` use the image count entering the layer, so ratios compound.
- Every image token, the CLS included, is scored by the text-to-image attention (mean over heads, summed over
  the text); the best ``image_len - prune_r`` are kept *in score order*, so the image CLS can move or be pruned.
- ToMe then merges the kept image tokens in that order: alternate A/B, A's first token (the best-scored one) is
  protected, ``min(merge_r, (kept - 1) // 2)`` merges, result ``[unmerged A, B]``; the text merges the same
  way with its CLS as the protected first token, ``round(text_merge_ratio * text_len)`` merges.
- A merge is the plain mean of the tokens merged in that step (PuMer's code starts every step from size 1).
Corrections, off by default: ``protect_image_cls`` (the image CLS always ranks first: never pruned or merged,
stays at position 0) and ``size_weighted`` (ToMe's size-weighted average). ``proportional_attention`` (log size
added to the logits) is off, as in PuMer.
Remaining deliberate differences: counts, scores and merges are per sample over real tokens (PuMer's code sums
scores over padded text rows too and merges padding with a fractional mask), so a padded question gives the
unpadded answer; attention is the model's softmax (PuMer's code adds 1e-6 / N to it); with a prune ratio of 0
(or one rounding to 0) PuMer's ViLT code skips the merges of that layer too, here they still run.
- Image patches: transformers' ``visual_embed`` keeps every patch when ``config.max_image_length`` is -1 (the
  released ViLT-VQA config) but shuffles their order with ``torch.multinomial``; with a positive
  ``max_image_length`` smaller than the patch count it keeps a random subset even in eval. This forward sorts
  the kept patches back into raster order (so matching is deterministic) and records which grid cells exist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import CheckpointError
from models.merging import bipartite_match, combine_tokens, merge_mask
from models.registry import ModelSpec, get_spec
from models.scopes import ATTENTION, MATCHING, REDUCTION, scope
from models.weights import HF_CACHE, WeightsSource, fix_instruction, resolve

VILT_VQA_NAME = "vilt_b32_vqa"  # its registry entry names the hub repository and the folder looked for
DEFAULT_REDUCE_LAYERS = (2, 5, 8)  # VQA and NLVR2
ENTAILMENT_REDUCE_LAYERS = (2, 4, 6, 8)  # visual entailment (SNLI-VE)


# ----------------------------------------------------------------------------------------------- loading
def vilt_from_source(spec: ModelSpec, source: WeightsSource, folder: Path | None = None,
                     image_size: int | None = None):
    """``(model in eval mode, processor)`` from what the resolver chose; the registry's ``loader`` for ViLT.
    Random weights give the full-size architecture and no processor (for timing). ``folder`` (the weights
    folder, which METER's loader needs for its tokenizer) is not needed here: the source is the whole folder.
    ``image_size`` (default: the spec's ``input_size``): the shorter side the processor resizes images to; the
    model interpolates its position embeddings to the patch grid itself."""
    from transformers import ViltForQuestionAnswering, ViltProcessor

    if source.is_random:
        return vilt_b32_random(), None
    kwargs = {"local_files_only": True} if source.kind == HF_CACHE else {}
    try:
        model = ViltForQuestionAnswering.from_pretrained(source.location, **kwargs).eval()
        processor = ViltProcessor.from_pretrained(source.location, **kwargs)
        side = image_size or spec.input_size  # the shorter side, where another of the entry's sizes is asked
        if processor.image_processor.size.get("shortest_edge") != side:
            processor.image_processor.size = {"shortest_edge": side}
    except Exception as exc:  # noqa: BLE001 - any reading failure becomes one message naming the folder
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"Could not read ViLT from {source.description}: {type(exc).__name__} {first_line}. "
                              + fix_instruction(spec)) from exc
    return model, processor


def load_vilt(source: str | None = None, weights_dir: str | Path | None = None, image_size: int | None = None):
    """ViLT fine-tuned on VQAv2 and its processor, through the one resolver: the folder ``source``, then
    ``<weights dir>/vilt-b32-finetuned-vqa`` (a ``save_pretrained`` folder), the Hugging Face cache, the hub.
    ``image_size``: the shorter side images are resized to (one of the entry's sizes; default 384).
    Returns ``(model in eval mode, processor)``; raises WeightsNotFoundError saying which folder to create."""
    spec = get_spec(VILT_VQA_NAME)
    folder = Path(weights_dir).expanduser() if weights_dir else None
    return vilt_from_source(spec, resolve(spec, user_file=source, folder=folder), image_size=image_size)


# A vocabulary small enough to write here, large enough for everyday questions; letters let WordPiece spell
# any other word.
_TINY_WORDS = (
    "what is the are there a an of in on this that it color colour how many who where which does do "
    "animal animals dog cat bird man woman person people car truck water sky grass tree picture photo "
    "image left right front behind red blue green yellow black white brown kind type sitting standing "
    "holding wearing shown can you see any number"
).split()
_TINY_ANSWERS = ("yes", "no", "2", "red", "dog", "cat", "bird", "water")


def _tiny_vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    symbols = list("0123456789?.,!'-")
    return specials + symbols + letters + [f"##{c}" for c in letters + list("0123456789")] + _TINY_WORDS


def tiny_vilt(seed: int = 0, image_size: int | None = None):
    """A small random ViLT for VQA (hidden 64, 4 heads, 10 layers, 160 px, patch 32) and a processor built
    offline (BERT WordPiece tokenizer over a small vocabulary). Its answers mean nothing; it exists so tests
    and the app's "random weights" mode can show the mechanics. ``image_size``: the shorter side the processor
    resizes to (the model interpolates its position embeddings to any grid, as the released one does). Returns
    ``(model in eval mode, processor)``."""
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    vocab = _tiny_vocab()
    max_text = 40
    config = ViltConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=10, num_attention_heads=4,
        intermediate_size=128, image_size=160, patch_size=32, max_image_length=-1,
        max_position_embeddings=max_text, num_labels=len(_TINY_ANSWERS),
        id2label=dict(enumerate(_TINY_ANSWERS)), label2id={a: i for i, a in enumerate(_TINY_ANSWERS)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViltForQuestionAnswering(config).eval()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=max_text)
    image_processor = ViltImageProcessor(size={"shortest_edge": image_size or config.image_size},
                                         size_divisor=config.patch_size)
    return model, ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)


def vilt_b32_random() -> nn.Module:
    """The ViLT-B/32 VQA architecture (transformers' ViltConfig defaults, 3,129 answers) with random weights:
    the released model's shape and cost, for timing without the weights."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    return ViltForQuestionAnswering(ViltConfig(num_labels=3129)).eval()


# ----------------------------------------------------------------------------------------------- records
@dataclass
class ReduceStep:
    """What one reduce layer did. Grid cells are flat indices ``row * grid_w + col`` of the patch grid;
    token positions are positions in the whole sequence after the layer (text first, then image)."""

    layer: int
    patch_scores: np.ndarray  # (B, cells) text-to-image score of the token holding the cell; NaN: no token
    pruned_cells: list[np.ndarray]  # per sample: grid cells whose token was pruned here
    image_groups: np.ndarray  # (B, cells) position of the token holding the cell after this layer; -1: gone
    text_groups: np.ndarray  # (B, text_len) position of the token holding each input text token; -1: padding
    image_pruned: np.ndarray  # (B,) image tokens pruned here (the image CLS's token included, when pruned)
    image_merged: np.ndarray  # (B,) image tokens merged away here
    text_merged: np.ndarray  # (B,) text tokens merged away here
    image_cls: np.ndarray  # (B,) position of the token holding the image CLS after this layer; -1: pruned


@dataclass
class PuMerTrace:
    """Per-layer record of a PuMer forward. ``text_counts[:, i]`` / ``image_counts[:, i]`` are the real tokens
    (image CLS included) entering layer ``i``; the last column is what leaves the encoder. A reduce layer's
    attention sees column ``i`` and its MLP already sees column ``i + 1``."""

    grid_shape: tuple[int, int]
    text_lengths: np.ndarray  # (B,) real text tokens of the input
    text_counts: np.ndarray  # (B, layers + 1)
    image_counts: np.ndarray  # (B, layers + 1)
    steps: list[ReduceStep] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- embeddings
@dataclass
class _Embedded:
    hidden: torch.Tensor  # (B, T + 1 + P, C): text tokens, image CLS, image patches in raster order
    valid: torch.Tensor  # (B, N) bool
    text_len: int
    patch_cells: torch.Tensor  # (B, P) flat grid cell of each patch token
    grid_shape: tuple[int, int]


def embed_inputs(vilt: nn.Module, inputs: Mapping[str, torch.Tensor]) -> _Embedded:
    """ViltEmbeddings.forward, step by step through its submodules, keeping the patch positions that
    ``visual_embed`` returns (and the module's forward drops) and putting patches back in raster order."""
    emb = vilt.embeddings
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pixel_values = inputs["pixel_values"]
    pixel_mask = inputs.get("pixel_mask")
    if pixel_mask is None:
        pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long,
                                device=pixel_values.device)
    text = emb.text_embeddings(input_ids=input_ids, token_type_ids=inputs.get("token_type_ids"))
    image, image_mask, (patch_index, (grid_h, grid_w)) = emb.visual_embed(
        pixel_values, pixel_mask, max_image_length=emb.config.max_image_length)
    text = text + emb.token_type_embeddings(torch.zeros_like(attention_mask, dtype=torch.long))
    image = image + emb.token_type_embeddings(torch.ones_like(image_mask, dtype=torch.long))

    cells = patch_index[..., 0] * grid_w + patch_index[..., 1]
    order = cells.argsort(dim=1, stable=True)
    patches = image[:, 1:].gather(1, order[..., None].expand(-1, -1, image.shape[-1]))
    hidden = torch.cat([text, image[:, :1], patches], dim=1)
    valid = torch.cat([attention_mask.bool(), image_mask[:, :1].bool(), image_mask[:, 1:].gather(1, order).bool()], 1)
    return _Embedded(hidden, valid, text.shape[1], cells.gather(1, order), (int(grid_h), int(grid_w)))


# ----------------------------------------------------------------------------------------------- attention
def _attention_bias(valid: torch.Tensor, sizes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias (B, 1, 1, N): the dtype's minimum on padding (as transformers' eager mask does),
    plus log(size) when proportional attention is on."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)
    if sizes is not None:
        bias = bias + sizes.to(dtype).log()
    return bias[:, None, None, :]


def _split_heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_size).transpose(1, 2)


@scope(ATTENTION)
def project_and_attend(heads: nn.Module, hidden: torch.Tensor, context: torch.Tensor, bias: torch.Tensor,
                       with_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A BERT-style attention module's (query/key/value/dropout, ``attention_head_size``) scaled dot-product
    attention of ``hidden`` over ``context`` with an additive key ``bias``. Returns (merged-head context
    (B, N, C), probs (B, H, N, M) or None, keys (B, H, M, d)): probabilities are materialised only when asked,
    otherwise torch's fused attention does the work."""
    size = heads.attention_head_size
    query = _split_heads(heads.query(hidden), size)
    key = _split_heads(heads.key(context), size)
    value = _split_heads(heads.value(context), size)
    probs = None
    if with_probs:
        probs = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(size) + bias, dim=-1)
        out = heads.dropout(probs) @ value
    else:
        dropout = heads.dropout.p if heads.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout)
    return out.transpose(1, 2).reshape(*hidden.shape[:-1], -1), probs, key


def _attention_residual(layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor, with_probs: bool):
    """ViltLayer up to its first residual. Returns (hidden, attention probs or None, keys (B, H, N, d)).
    Probabilities are materialised only when asked; otherwise torch's fused attention does the work."""
    normed = layer.layernorm_before(hidden)
    context, probs, key = project_and_attend(layer.attention.attention, normed, normed, bias, with_probs)
    return layer.attention.output(context, normed) + hidden, probs, key


# ----------------------------------------------------------------------------------------------- reduction
def text_to_image_scores(probs: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """PuMer's pruning score of each image token, the image CLS included (PuMer ranks it with the patches):
    attention from the text to it, mean over heads, summed over the real text tokens. probs: (B, H, N, N) with
    text first. Returns (B, image tokens)."""
    text_len = text_valid.shape[1]
    cross = probs.mean(dim=1)[:, :text_len, text_len:]
    return (cross * text_valid[..., None].to(cross.dtype)).sum(dim=1)


def tome_destinations(metric: torch.Tensor, valid: torch.Tensor, r: torch.Tensor):
    """PuMer's ToMe step (``bipartite_soft_matching`` with a class token) within one modality, per sample.

    Tokens alternate into A (even positions) and B (odd); the first token is A's and never merges; the ``r[b]``
    A tokens with the most similar B partner (cosine of ``metric``) merge into it, at most as many as can. The
    result is ordered as PuMer's: the unmerged A tokens in their order, then every B token. Invalid tokens never
    match and are dropped. Returns (destination (B, M): new index of each token's group, -1 when dropped; new
    counts (B,))."""
    if metric.shape[1] < 2:
        destination = valid.long().cumsum(dim=1) - 1
        return destination.masked_fill(~valid, -1), valid.sum(dim=1)
    match = bipartite_match(metric, valid, protect_first=True)
    merged_a = merge_mask(match, r.to(valid.device))
    a_stays, b_valid = valid[:, 0::2] & ~merged_a, valid[:, 1::2]
    unmerged = a_stays.sum(dim=1)
    b_destination = (unmerged[:, None] + b_valid.long().cumsum(dim=1) - 1).masked_fill(~b_valid, -1)
    a_destination = (a_stays.long().cumsum(dim=1) - 1).masked_fill(~a_stays, -1)
    a_destination = torch.where(merged_a, b_destination.gather(1, match.partner), a_destination)
    destination = torch.empty_like(valid, dtype=torch.long)
    destination[:, 0::2], destination[:, 1::2] = a_destination, b_destination
    return destination, unmerged + b_valid.sum(dim=1)


@dataclass
class _Reduction:
    text_destination: torch.Tensor  # (B, T) over the text segment
    image_destination: torch.Tensor  # (B, I) over the image segment (its CLS first)
    pruned: torch.Tensor  # (B, I) bool: image token pruned
    scores: torch.Tensor | None  # (B, I)
    text_count: int
    image_count: int


@scope(MATCHING)
def plan_reduction(metric: torch.Tensor, valid: torch.Tensor, probs: torch.Tensor | None, text_len: int,
                   prune_ratio: float, image_merge_ratio: float, text_merge_ratio: float,
                   protect_image_cls: bool = False) -> _Reduction:
    """Decide one PuMer step as PuMer's code does (csarron/PuMer, ``vit_vilt.Block`` / ``BertCrossLayer``):
    rank the image tokens, CLS included, by text attention and keep the best ``image_len - prune_r`` in score
    order; ToMe-merge them in that order (the best-scored token is A's protected first one); ToMe-merge the text
    (its CLS protected); neither modality mixes with the other. With ``protect_image_cls`` the image CLS ranks
    first whatever its score: never pruned, never merged, still at position 0. metric: keys averaged over heads
    (B, N, d)."""
    text_valid, image_valid = valid[:, :text_len], valid[:, text_len:]
    image_len = image_valid.sum(dim=1).double()  # per sample, counting the image CLS as PuMer does
    positions = torch.arange(image_valid.shape[1], device=valid.device).expand_as(image_valid)
    order, kept, scores = positions, image_valid, None
    if prune_ratio > 0:
        scores = text_to_image_scores(probs, text_valid)
        ranking = scores.masked_fill(~image_valid, -math.inf)
        if protect_image_cls:
            ranking[:, 0] = math.inf
        order = ranking.argsort(dim=1, descending=True, stable=True)
        keep = (image_len - torch.round(prune_ratio * image_len)).clamp_min(1).long()
        kept = (positions < keep[:, None]) & image_valid.gather(1, order)  # in score order
    image_metric = metric[:, text_len:].gather(1, order[..., None].expand(-1, -1, metric.shape[-1]))
    image_r = torch.round(image_merge_ratio * image_len).long()
    ordered_destination, image_counts = tome_destinations(image_metric, kept, image_r)
    image_destination = torch.empty_like(ordered_destination).scatter_(1, order, ordered_destination)
    pruned = torch.zeros_like(kept).scatter_(1, order, kept) ^ image_valid

    text_r = torch.round(text_merge_ratio * text_valid.sum(dim=1).double()).long()  # per sample, real length
    text_destination, text_counts = tome_destinations(metric[:, :text_len], text_valid, text_r)
    return _Reduction(text_destination, image_destination, pruned, scores,
                      int(text_counts.max()), int(image_counts.max()))


@scope(REDUCTION)
def apply_reduction(hidden: torch.Tensor, sizes: torch.Tensor, text_len: int, plan: _Reduction,
                    size_weighted: bool = False):
    """Carry out a planned step on the hidden states. Returns (hidden, sizes, valid, new text length)."""
    text = combine_tokens(hidden[:, :text_len], sizes[:, :text_len], plan.text_destination, plan.text_count,
                          size_weighted)
    image = combine_tokens(hidden[:, text_len:], sizes[:, text_len:], plan.image_destination, plan.image_count,
                           size_weighted)
    return (torch.cat([text[0], image[0]], 1), torch.cat([text[1], image[1]], 1),
            torch.cat([text[2], image[2]], 1), plan.text_count)

# ----------------------------------------------------------------------------------------------- tracing
def _follow(owner: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """Where each original token is after a step, given where it was (-1: gone) and the step's destinations."""
    moved = destination.gather(1, owner.clamp_min(0))
    return moved.masked_fill(owner < 0, -1)


class _Tracer:
    """Follows every original text token and patch grid cell through the reduce steps (only when asked)."""

    def __init__(self, embedded: _Embedded, num_layers: int):
        batch = embedded.hidden.shape[0]
        text_valid = embedded.valid[:, :embedded.text_len]
        patch_valid = embedded.valid[:, embedded.text_len + 1:]
        self.grid_shape = embedded.grid_shape
        cells = embedded.grid_shape[0] * embedded.grid_shape[1]
        positions = torch.arange(1, patch_valid.shape[1] + 1, device=patch_valid.device).expand(batch, -1)
        target = embedded.patch_cells.masked_fill(~patch_valid, cells)  # a spare cell collects padding patches
        self.image_owner = torch.full((batch, cells + 1), -1, dtype=torch.long, device=patch_valid.device).scatter_(
            1, target, positions)[:, :cells]
        self.text_owner = torch.arange(embedded.text_len, device=text_valid.device).expand(batch, -1).masked_fill(
            ~text_valid, -1)
        self.cls_owner = torch.zeros(batch, 1, dtype=torch.long, device=patch_valid.device)  # image CLS: position 0
        self.text_lengths = text_valid.sum(dim=1)
        self.text_counts = torch.zeros(batch, num_layers + 1, dtype=torch.long)
        self.image_counts = torch.zeros(batch, num_layers + 1, dtype=torch.long)
        self.steps: list[ReduceStep] = []

    def count(self, index: int, valid: torch.Tensor, text_len: int) -> None:
        self.text_counts[:, index] = valid[:, :text_len].sum(dim=1).cpu()
        self.image_counts[:, index] = valid[:, text_len:].sum(dim=1).cpu()

    def step(self, layer: int, plan: _Reduction, valid: torch.Tensor, new_text_len: int) -> None:
        """Record one reduce step; ``valid`` and ``new_text_len`` describe the sequence after it."""
        holder = self.image_owner  # image-segment position of the token holding each cell (-1: none)
        present = holder >= 0
        scores = torch.full(holder.shape, math.nan)
        if plan.scores is not None:
            scores = plan.scores.gather(1, holder.clamp_min(0)).masked_fill(~present, math.nan).float().cpu()
        pruned = plan.pruned.gather(1, holder.clamp_min(0)) & present
        self.image_owner = _follow(self.image_owner, plan.image_destination)
        self.cls_owner = _follow(self.cls_owner, plan.image_destination)
        self.text_owner = _follow(self.text_owner, plan.text_destination)
        image_positions = (self.image_owner + new_text_len).masked_fill(self.image_owner < 0, -1)
        pruned_count = plan.pruned.sum(dim=1).cpu()
        image_before = (plan.image_destination >= 0).sum(dim=1).cpu() + pruned_count  # valid tokens entering
        image_after = valid[:, new_text_len:].sum(dim=1).cpu()
        text_before = (plan.text_destination >= 0).sum(dim=1).cpu()
        text_after = valid[:, :new_text_len].sum(dim=1).cpu()
        self.steps.append(ReduceStep(
            layer=layer,
            patch_scores=scores.numpy(),
            pruned_cells=[np.flatnonzero(row) for row in pruned.cpu().numpy()],
            image_groups=image_positions.cpu().numpy(),
            text_groups=self.text_owner.cpu().numpy(),
            image_pruned=pruned_count.numpy(),
            image_merged=(image_before - pruned_count - image_after).numpy(),
            text_merged=(text_before - text_after).numpy(),
            image_cls=(self.cls_owner[:, 0] + new_text_len).masked_fill(self.cls_owner[:, 0] < 0, -1).cpu().numpy(),
        ))

    def finish(self, settings: dict) -> PuMerTrace:
        return PuMerTrace(self.grid_shape, self.text_lengths.cpu().numpy(), self.text_counts.numpy(),
                          self.image_counts.numpy(), self.steps, settings)


# ----------------------------------------------------------------------------------------------- forward
def pumer_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor],
                  reduce_layers: Sequence[int] = DEFAULT_REDUCE_LAYERS, prune_ratio: float = 0.1,
                  image_merge_ratio: float = 0.3, text_merge_ratio: float = 0.2,
                  proportional_attention: bool = False, return_trace: bool = False,
                  protect_image_cls: bool = False, size_weighted: bool = False):
    """ViltForQuestionAnswering's forward with PuMer token reduction in ``reduce_layers`` (0-based), between
    each such layer's attention and its MLP, deciding as PuMer's code does. ``inputs`` is a ViltProcessor output
    (input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask). With all ratios 0 it equals
    ``model(**inputs).logits``. Corrections (off by default, i.e. PuMer's code): ``protect_image_cls`` never
    prunes or merges the image CLS and keeps it first; ``size_weighted`` averages merges by token size (ToMe).
    Returns the logits (B, num_labels), or ``(logits, PuMerTrace)`` when ``return_trace``."""
    vilt = model.vilt
    embedded = embed_inputs(vilt, inputs)
    hidden, valid, text_len = embedded.hidden, embedded.valid, embedded.text_len
    sizes = torch.ones(valid.shape, dtype=hidden.dtype, device=hidden.device)
    reducing = any(r > 0 for r in (prune_ratio, image_merge_ratio, text_merge_ratio))
    layers = vilt.encoder.layer
    tracer = _Tracer(embedded, len(layers)) if return_trace else None
    bias = _attention_bias(valid, sizes if proportional_attention else None, hidden.dtype)  # changes only on reduction
    for index, layer in enumerate(layers):
        if tracer is not None:
            tracer.count(index, valid, text_len)
        reduce_here = reducing and index in reduce_layers
        hidden, probs, keys = _attention_residual(layer, hidden, bias, with_probs=reduce_here and prune_ratio > 0)
        if reduce_here:
            plan = plan_reduction(keys.mean(dim=1), valid, probs, text_len,
                                  prune_ratio, image_merge_ratio, text_merge_ratio, protect_image_cls)
            hidden, sizes, valid, text_len = apply_reduction(hidden, sizes, text_len, plan, size_weighted)
            bias = _attention_bias(valid, sizes if proportional_attention else None, hidden.dtype)
            if tracer is not None:
                tracer.step(index, plan, valid, text_len)
        hidden = layer.output(layer.intermediate(layer.layernorm_after(hidden)), hidden)
    logits = model.classifier(vilt.pooler(vilt.layernorm(hidden)))
    if tracer is None:
        return logits
    tracer.count(len(layers), valid, text_len)
    return logits, tracer.finish(dict(reduce_layers=list(reduce_layers), prune_ratio=prune_ratio,
                                      image_merge_ratio=image_merge_ratio, text_merge_ratio=text_merge_ratio,
                                      proportional_attention=proportional_attention,
                                      protect_image_cls=protect_image_cls, size_weighted=size_weighted))
