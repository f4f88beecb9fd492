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

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from models.dynamicvit import distillation_kl, keep_ratio_loss


@dataclass
class DynamicStageTrace:
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
def _check_ratio(keep_ratio: float) -> None:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")


def geometric_counts(num_tokens: int, keep_ratio: float, num_stages: int) -> list[int]:
    """DeiT/LV-ViT schedule: int(N * rho**s), s = 1 .. stages (196, 0.7 -> 137, 96, 67)."""
    _check_ratio(keep_ratio)
    return [max(1, int(num_tokens * keep_ratio ** (s + 1))) for s in range(num_stages)]


def linear_counts(num_tokens: int, keep_ratio: float, num_stages: int = 3) -> list[int]:
    """ConvNeXt/Swin schedule of the official code: int(N * (rho - 0.2 s)), s = 0 .. stages-1.

    The float arithmetic is the official one, so 196 at rho 0.7 gives 137, 97, 58 (0.7 - 0.2 = 0.4999...).
    rho = 1 is the unpruned reference point: all positions are kept at every stage (the linear schedule would
    still drop 20 % and 40 % in the later stages).
    """
    _check_ratio(keep_ratio)
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


def gather_positions(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) and (B, k) -> (B, k, C); row copies (index_select), faster on CPU than an expanded gather."""
    batch, num_tokens, channels = tokens.shape
    rows = _flat_rows(index, num_tokens)
    return tokens.reshape(batch * num_tokens, channels).index_select(0, rows).view(batch, -1, channels)


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
    _check_ratio(keep_ratio)
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
