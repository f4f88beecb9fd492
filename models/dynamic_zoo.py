"""What the DynamicViT zoo's pruned forwards share: the per-stage trace, the official keep schedules and
the gather/scatter steps of the structured ("fast path") blocks.

Families (each its own module, each with ``forward(model, x, keep_ratio=0.7, return_trace=False)``):
``models.dynamic_lvvit`` (LV-ViT, tokens are dropped as in DeiT), ``models.dynamic_convnext`` and
``models.dynamic_swin`` (hierarchical: the feature map stays whole, see below).

How the hierarchical (T-PAMI) forward differs from the DeiT one (``models.dynamicvit``):
* DeiT/LV-ViT: dropped tokens leave the sequence; every later block runs on fewer tokens and a dropped token
  never comes back (kept sets are nested, scores of dropped tokens are NaN).
* ConvNeXt/Swin: convolutions, windows and patch merging need the whole map, so nothing leaves it. Inside the
  pruned stage each block runs its spatial part (ConvNeXt's depthwise conv, Swin's window attention) on the
  full map and its expensive per-position MLP only on the kept positions; the other positions get a cheap
  "fast path" (LayerNorm + Linear). Every predictor scores the whole current map and keeps its own top-k,
  so kept sets need not be nested and every position has a score at every stage.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import CheckpointError
from models.dynamicvit import check_keep_ratio, distillation_kl, keep_ratio_loss
from models.traces import ReductionTrace


@dataclass
class DynamicStageTrace(ReductionTrace):
    """Per pruning stage: where the decision was made and what was kept. CPU tensors, a page can loop over it.

    Differs from ``DynamicViTTrace``: each stage has its own grid (``stage_grids``, rows x cols of the map
    the predictor scored; the image's pixels per cell are ``cell_size(s)``), ``image_size`` is recorded so maps
    can be drawn to scale, ``nested`` says whether a dropped position can come back, and
    ``tokens_per_block`` counts positions taking each block's full (expensive) path, over all blocks (for
    DeiT/LV-ViT the tokens entering each block, CLS included). ``from_dynamicvit_trace`` converts DeiT's trace.
    """

    family: str
    keep_ratio: float
    image_size: tuple[int, int]
    stage_grids: list[tuple[int, int]]
    stage_blocks: list[str]                                        # the block each predictor sits before
    nested: bool
    kept_indices: list[torch.Tensor] = field(default_factory=list)  # (B, k_s) long, ascending, row-major in grid s
    keep_scores: list[torch.Tensor] = field(default_factory=list)   # (B, H_s * W_s) keep prob; NaN = not scored
    tokens_per_block: list[int] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.stage_grids)

    @property
    def kept_counts(self) -> list[int]:
        return [int(kept.shape[1]) for kept in self.kept_indices]

    @property
    def structured(self) -> bool:
        """ConvNeXt and Swin keep the feature map whole; DeiT and LV-ViT drop tokens for good."""
        return not self.nested

    def cell_size(self, stage: int) -> tuple[float, float]:
        """Image pixels (height, width) covered by one cell of the stage's grid."""
        rows, cols = self.stage_grids[stage]
        return self.image_size[0] / rows, self.image_size[1] / cols

    def keep_masks(self) -> list[torch.Tensor]:
        """Per stage, a (B, H_s, W_s) bool map of the kept positions."""
        masks = []
        for (rows, cols), kept in zip(self.stage_grids, self.kept_indices):
            mask = torch.zeros(kept.shape[0], rows * cols, dtype=torch.bool)
            masks.append(mask.scatter_(1, kept, True).view(-1, rows, cols))
        return masks

    @classmethod
    def from_dynamicvit_trace(cls, trace, image_size: tuple[int, int], family: str = "DynamicViT",
                              stage_blocks: list[str] | None = None) -> "DynamicStageTrace":
        """The same record for a token-dropping forward's ``DynamicViTTrace`` (one patch grid, nested stages)."""
        stages = len(trace.pruning_locations)
        return cls(family=family, keep_ratio=trace.keep_ratio, image_size=tuple(image_size),
                   stage_grids=[tuple(trace.grid_size)] * stages,
                   stage_blocks=stage_blocks or [f"blocks.{i}" for i in trace.pruning_locations], nested=True,
                   kept_indices=list(trace.kept_indices), keep_scores=list(trace.keep_scores),
                   tokens_per_block=list(trace.tokens_per_block))

    def score_maps(self) -> list[torch.Tensor]:
        """Per stage, a (B, H_s, W_s) map of keep probabilities (NaN where the position was not scored)."""
        return [scores.view(-1, rows, cols) for (rows, cols), scores in zip(self.stage_grids, self.keep_scores)]


def imagenet_cfg(arch: str, crop_pct: float, first_conv: str, classifier: str, num_classes: int) -> dict:
    """timm's pretrained_cfg for an official 224-px ImageNet release (the data config the app preprocesses with)."""
    return dict(architecture=arch, input_size=(3, 224, 224), interpolation="bicubic", crop_pct=crop_pct,
                crop_mode="center", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=num_classes,
                first_conv=first_conv, classifier=classifier)


def as_stage_trace(trace, image_size: tuple[int, int]) -> DynamicStageTrace:
    """Any DynamicViT family's trace as a DynamicStageTrace (DeiT's DynamicViTTrace is converted)."""
    return trace if isinstance(trace, DynamicStageTrace) else DynamicStageTrace.from_dynamicvit_trace(trace, image_size)


# ---------------------------------------------------------------------------------------------
# Keep schedules
# ---------------------------------------------------------------------------------------------
def linear_counts(num_tokens: int, keep_ratio: float, num_stages: int = 3) -> list[int]:
    """ConvNeXt/Swin schedule of the official code: int(N * (rho - 0.2 s)), s = 0 .. stages-1.

    The float arithmetic is the official one, so 196 at rho 0.7 gives 137, 97, 58 (0.7 - 0.2 = 0.4999...).
    rho = 1 is the unpruned reference point: all positions are kept at every stage (the linear schedule would
    still drop 20 % and 40 % in the later stages).
    """
    check_keep_ratio(keep_ratio)
    if keep_ratio == 1.0:
        return [num_tokens] * num_stages
    counts = [int(num_tokens * (keep_ratio - 0.2 * s)) if s else int(num_tokens * keep_ratio)
              for s in range(num_stages)]
    if min(counts) < 1:
        raise ValueError(f"keep_ratio {keep_ratio} leaves no position in the last stage of the official schedule "
                         f"rho, rho - 0.2, rho - 0.4; use rho > {0.2 * (num_stages - 1):.1f}.")
    return counts


# ---------------------------------------------------------------------------------------------
# Structured blocks: split a (B, N, C) map into kept and other positions and put it back together
# ---------------------------------------------------------------------------------------------
def split_top_k(keep_logprob: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) keep scores -> (kept, rest) position indices, each ascending; rest is (B, N - k)."""
    order = keep_logprob.argsort(dim=1, descending=True)
    return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values


def _flat_rows(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, k) per-image positions -> (B * k,) rows of the (B * N, C) flattened tensor."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_tokens
    return (index + offsets).reshape(-1)


def scatter_positions(like: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A (B, N, C) tensor holding each (index (B, k), values (B, k, C)) part at its positions.

    The parts must cover every position exactly once (kept + rest)."""
    batch, num_tokens, channels = like.shape
    out = like.new_empty(batch * num_tokens, channels)
    for index, values in parts:
        out.index_copy_(0, _flat_rows(index, num_tokens), values.reshape(-1, channels).to(like.dtype))
    return out.view(batch, num_tokens, channels)


def scores_for_trace(keep_logprob: torch.Tensor) -> torch.Tensor:
    return keep_logprob.detach().float().exp().cpu()


# ---------------------------------------------------------------------------------------------
# Hierarchical families (DynamicCNN, DynamicSwin): what their models, loaders and forwards share
# ---------------------------------------------------------------------------------------------
def checked_locations(pruning_locations: Sequence[int], stage_depth: int) -> tuple[int, ...]:
    """The pruning locations as a tuple of increasing block indices inside a stage of ``stage_depth`` blocks."""
    locations = tuple(int(i) for i in pruning_locations)
    if list(locations) != sorted(set(locations)) or not all(0 <= i < stage_depth for i in locations):
        raise ValueError(f"pruning_locations must be increasing block indices in [0, {stage_depth}), got {locations}.")
    return locations


def official_locations(archs: Mapping[str, NamedTuple], pruned_stage: int, stage_depth: int, family: str,
                       backbone: str) -> tuple[int, ...]:
    """The official predictor positions for a pruned stage of ``stage_depth`` blocks, read off the releases
    in ``archs`` (each with ``depths`` and ``pruning_locations``)."""
    table = {arch.depths[pruned_stage]: arch.pruning_locations for arch in archs.values()}
    if stage_depth not in table:
        raise ValueError(f"{family}'s official schedule covers {backbone} third stages of {sorted(table)} blocks, "
                         f"not {stage_depth}.")
    return table[stage_depth]


def adopt_backbone(model: nn.Module, backbone: nn.Module, added: Sequence[str], family: str) -> nn.Module:
    """``model`` (a fresh dynamic model) holding a copy of ``backbone``'s weights, on its device, dtype and mode.

    Keys containing one of ``added`` (the predictors and fast paths) may be missing from the backbone; any
    other missing or unexpected key means the backbone does not fit and raises CheckpointError."""
    result = model.load_state_dict(backbone.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not any(part in k for part in added)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{type(backbone).__name__} does not fit {family}: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}.")
    model.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
    first = next(backbone.parameters())
    return model.to(device=first.device, dtype=first.dtype).train(backbone.training)


def stage_size_hint(state_dict: Mapping[str, torch.Tensor], width_key: str, stage_blocks: str,
                    ours: tuple[int, int], known: Mapping[str, tuple[int, int]], backbone: str) -> str:
    """A sentence naming the checkpoint's size (width of ``width_key``, number of blocks under ``stage_blocks``,
    e.g. ``stages.2.blocks``) when it differs from ``ours``; ``known`` maps release names to their sizes."""
    weight = state_dict.get(width_key)
    pattern = re.escape(stage_blocks) + r"\.(\d+)\."
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))), default=-1)
    theirs = (None if weight is None else int(weight.shape[0]), depth)
    if theirs == ours or None in theirs:
        return ""
    named = next((name for name, size in known.items() if size == theirs), "an unknown size")
    return (f" The checkpoint is a {backbone} with width {theirs[0]} and {theirs[1]} third-stage blocks ({named}); "
            f"this model has width {ours[0]} and {ours[1]}: pick the model that matches the file.")


class HierarchicalLayout(NamedTuple):
    """How one hierarchical family lays out its model, for :func:`hierarchical_forward`."""

    family: str
    stages: str                                  # attribute holding the stages ("stages", "layers")
    pruned_stage: int
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]        # (model, image) -> first map
    grid: Callable[[torch.Tensor], tuple[int, int]]                # map -> (rows, cols)
    predictor_input: Callable[[torch.Tensor], torch.Tensor]        # map -> what the predictor takes
    structured_block: Callable[..., torch.Tensor]                  # (block, map, kept, rest) -> map
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]         # (model, last map) -> logits


def hierarchical_forward(layout: HierarchicalLayout, model: nn.Module, x: torch.Tensor, keep_ratio: float = 0.7,
                         return_trace: bool = False):
    """Structured pruned inference of a hierarchical family (see the module docstring); keep_ratio=1 reproduces
    ``model(x)``. Before each block at ``model.pruning_locations`` of the pruned stage, its predictor
    (``model.score_predictor``) scores the whole map and keeps the top-k of the official linear schedule; from
    there on ``layout.structured_block`` runs each block. Returns logits, or (logits, DynamicStageTrace)."""
    image_size = tuple(x.shape[-2:])
    stages = getattr(model, layout.stages)
    tokens_per_block: list[int] = []
    x = layout.embed(model, x)
    for index in range(layout.pruned_stage):
        x = stages[index](x)
        tokens_per_block += [math.prod(layout.grid(x))] * len(stages[index].blocks)
    stage = stages[layout.pruned_stage]
    x = stage.downsample(x)
    grid = tuple(int(n) for n in layout.grid(x))
    counts = linear_counts(grid[0] * grid[1], keep_ratio, len(model.pruning_locations))
    trace = DynamicStageTrace(layout.family, keep_ratio, image_size, [grid] * len(counts),
                              [f"{layout.stages}.{layout.pruned_stage}.blocks.{i}" for i in model.pruning_locations],
                              nested=False)
    kept = rest = None
    for i, block in enumerate(stage.blocks):
        if i in model.pruning_locations:
            s = model.pruning_locations.index(i)
            keep_logprob = model.score_predictor[s](layout.predictor_input(x))[..., 0]
            kept, rest = split_top_k(keep_logprob, counts[s])
            if return_trace:
                trace.keep_scores.append(scores_for_trace(keep_logprob))
                trace.kept_indices.append(kept.cpu())
        x = block(x) if kept is None else layout.structured_block(block, x, kept, rest)
        tokens_per_block.append(grid[0] * grid[1] if kept is None else kept.shape[1])
    for index in range(layout.pruned_stage + 1, len(stages)):
        x = stages[index](x)
        tokens_per_block += [math.prod(layout.grid(x))] * len(stages[index].blocks)
    trace.tokens_per_block = tokens_per_block
    logits = layout.head(model, x)
    return (logits, trace) if return_trace else logits


# ---------------------------------------------------------------------------------------------
# Training (hierarchical models): the official two-stream form and loss
# ---------------------------------------------------------------------------------------------
class HierarchicalTrainOutput(NamedTuple):
    """Training forward result of DynamicCNN / DynamicSwin."""

    logits: torch.Tensor           # (B, classes)
    featmap: torch.Tensor          # (B, N_last, C) final-norm features of every last-stage position
    decisions: list[torch.Tensor]  # per stage (B, N) hard keep mask of that stage (not cumulative)
    keep_targets: list[float]      # what the ratio loss pulls each stage towards: rho, rho - 0.2, rho - 0.4


def linear_targets(keep_ratio: float, num_stages: int = 3) -> list[float]:
    """The official SPARSE_RATIO targets [rho, rho - 0.2, rho - 0.4] (float arithmetic as the official code)."""
    check_keep_ratio(keep_ratio)
    return [keep_ratio - 0.2 * s if s else keep_ratio for s in range(num_stages)]


def mix(streams: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The map the two training streams stand for: kept positions from the first, the others from the second."""
    return streams[0] * mask + streams[1] * (1 - mask)


def hierarchical_loss(output: HierarchicalTrainOutput, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_featmap: torch.Tensor, ratio_weight: float = 10.0, distill_weight: float = 0.5,
                      cls_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official DynamicCNN/DynamicSwin loss (``ConvNextDistillDiffPruningLoss``) and its parts.

    total = cls_weight * CE + ratio_weight * mean_s mean_b (keep_{b,s} - target_s)^2
            + distill_weight * KL(teacher || student) + distill_weight * MSE(featmap, teacher featmap)
    The feature MSE covers every position of the last stage (the map is never sparse there).
    """
    ce = F.cross_entropy(output.logits, labels)
    ratio = keep_ratio_loss(output.decisions, output.keep_targets, output.logits)
    kl = distillation_kl(output.logits, teacher_logits)
    feat_mse = ((output.featmap - teacher_featmap) ** 2).mean()
    total = cls_weight * ce + ratio_weight * ratio + distill_weight * kl + distill_weight * feat_mse
    parts = {"ce": ce, "ratio": ratio, "kl": kl, "token_mse": feat_mse}
    return total, {name: value.detach() for name, value in parts.items()}


def two_stream_stage(blocks, x: torch.Tensor, locations, predictors, two_stream_block, mask_shape,
                     tau: float = 1.0, hard: bool = True, policy_override=None, predictor_input=lambda x: x):
    """The pruned stage of the official hierarchical training forward (DynamicCNN, DynamicSwin).

    Before each block in ``locations`` its predictor samples a (straight-through) Gumbel-softmax keep mask over
    the whole current map (or takes ``policy_override``'s); from the first predictor on, the blocks carry two
    streams (MLP path, fast path) that ``two_stream_block(block, streams, mask)`` updates and ``mix`` joins where
    a map is needed. ``mask_shape(current)`` and ``predictor_input(current)`` adapt the layouts of a family.
    Returns the stage's output map and the keep decisions per stage.
    """
    streams, mask, decisions = None, None, []
    for i, block in enumerate(blocks):
        if i in locations:
            current = x if streams is None else mix(streams, mask)
            log_probs = predictors[list(locations).index(i)](predictor_input(current))
            if policy_override is None:
                keep = F.gumbel_softmax(log_probs, tau=tau, hard=hard, dim=-1)[..., 0]
            else:
                keep = policy_override[len(decisions)].to(log_probs.dtype).view_as(log_probs[..., 0])
            decisions.append(keep)
            mask = keep.view(*mask_shape(current))
            if streams is None:
                streams = (current, current)
        if streams is None:
            x = block(x)
        else:
            streams = two_stream_block(block, streams, mask)
    return (mix(streams, mask) if streams is not None else x), decisions


def hierarchical_train_stages(layout: HierarchicalLayout, model: nn.Module, x: torch.Tensor, two_stream_block,
                              mask_shape, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official training forward of a hierarchical family up to its last map (before the final norm): the
    stages around the pruned one as they are, the pruned one through :func:`two_stream_stage` (``options``:
    tau, hard, policy_override). Returns (last map, keep decisions per stage)."""
    stages = getattr(model, layout.stages)
    x = layout.embed(model, x)
    for index in range(layout.pruned_stage):
        x = stages[index](x)
    stage = stages[layout.pruned_stage]
    x = stage.downsample(x)
    x, decisions = two_stream_stage(stage.blocks, x, model.pruning_locations, list(model.score_predictor),
                                    two_stream_block, mask_shape=mask_shape, predictor_input=layout.predictor_input,
                                    **options)
    for index in range(layout.pruned_stage + 1, len(stages)):
        x = stages[index](x)
    return x, decisions
