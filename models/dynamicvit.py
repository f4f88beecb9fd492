"""DynamicViT (Rao et al., NeurIPS 2021): learned token sparsification on DeiT backbones.

`DynamicViT` is a timm `VisionTransformer` plus the official score predictors, so official
checkpoints (`{'model': state_dict}` with DeiT key names and `score_predictor.*`) load strictly and
`model(x)` is the unpruned backbone. Pruning is done by the explicit forwards below, whose settings
(keep ratio, Gumbel temperature, forced policies) are call arguments: a cached model is never mutated.

Kept-token order: the inference forward keeps the surviving patch tokens in their *original spatial
order* (the official code keeps them sorted by score). After the embedding there is no positional
information, so the classifier output is the same either way; spatial order makes the per-stage
kept indices directly readable as patch positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.checkpoints import CheckpointError, load_strict, state_dict_and_source
from models.registry import MethodNotApplicable
from models.scopes import REDUCTION, scope
from models.traces import ReductionTrace
from models.vit_forward import (  # noqa: F401 - POLICY_EPS and policy_softmax are part of this module's API
    POLICY_EPS, attention_residual, classify, embed_tokens, gather_tokens, is_plain_block, mlp_residual, policy_softmax,
    vit_config,
)

DEFAULT_PRUNING_LOCATIONS = (3, 6, 9)


class DynamicViTArch(NamedTuple):
    """The DeiT backbone shape of one official DynamicViT release (URLs and top-1 live in the registry)."""

    embed_dim: int
    num_heads: int


DYNAMICVIT_ARCHS: dict[str, DynamicViTArch] = {
    "dynamicvit_deit_256_patch16_224": DynamicViTArch(256, 4),
    "dynamicvit_deit_small_patch16_224": DynamicViTArch(384, 6),
    "dynamicvit_deit_base_patch16_224": DynamicViTArch(768, 12),
}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
class ScorePredictor(nn.Module):
    """Per-token keep/drop log-probabilities from a local feature and a policy-weighted global feature.

    Layer layout and indices follow the official `PredictorLG` so that checkpoint keys match.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, patches: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C) patch tokens and (B, N) keep policy (None = all kept) -> (B, N, 2) log-probs, index 0 = keep."""
        feats = self.in_conv(patches)
        half = feats.shape[-1] // 2
        local, to_pool = feats[..., :half], feats[..., half:]
        if policy is None:
            pooled = to_pool.mean(dim=1, keepdim=True)
        else:
            weights = policy.unsqueeze(-1).to(to_pool.dtype)
            pooled = (to_pool * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local, pooled.expand_as(local)], dim=-1))


def _init_predictor(module: nn.Module) -> None:
    """Official initialisation: truncated normal (std 0.02) linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DynamicViT(VisionTransformer):
    """A timm ViT with DynamicViT score predictors before the blocks in ``pruning_locations``.

    ``forward`` is inherited: ``model(x)`` runs the plain, unpruned backbone. Use
    :func:`dynamicvit_forward` (inference) or :func:`dynamicvit_train_forward` (training) to prune.
    """

    def __init__(self, *, pruning_locations: Sequence[int] = DEFAULT_PRUNING_LOCATIONS, **vit_kwargs) -> None:
        super().__init__(**vit_kwargs)
        locations = tuple(int(i) for i in pruning_locations)
        _check_architecture(self, locations)
        self.pruning_locations = locations
        self.score_predictor = nn.ModuleList(ScorePredictor(self.embed_dim) for _ in locations)
        self.score_predictor.apply(_init_predictor)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches


def _check_architecture(model: VisionTransformer, locations: tuple[int, ...]) -> None:
    """DynamicViT needs exactly one CLS token, token pooling and a fixed patch grid; locations must be increasing."""
    if model.cls_token is None or model.num_prefix_tokens != 1 or model.global_pool != "token":
        raise MethodNotApplicable("DynamicViT needs a ViT with one class token, no register tokens and "
                                  "global_pool='token'.")
    if getattr(model, "dynamic_img_size", False):
        raise MethodNotApplicable("DynamicViT keep counts are fixed by the patch grid; dynamic_img_size is not "
                                  "supported.")
    if list(locations) != sorted(set(locations)) or not all(0 <= i < len(model.blocks) for i in locations):
        raise MethodNotApplicable(f"DynamicViT prunes before blocks {', '.join(map(str, locations))}, and this "
                                  f"model has {len(model.blocks)} blocks (pruning_locations must be increasing "
                                  f"block indices in [0, {len(model.blocks)})).")


def check_backbone(model: nn.Module) -> None:
    """MethodNotApplicable (one sentence) unless DynamicViT's score predictors fit ``model``: a timm ViT of plain
    pre-norm blocks with one class token, token pooling and the blocks 3, 6, 9 they go before."""
    if not isinstance(model, VisionTransformer) or not all(is_plain_block(b) for b in model.blocks):
        raise MethodNotApplicable(f"DynamicViT's predictors go on timm's plain VisionTransformer, not on a "
                                  f"{type(model).__name__}.")
    _check_architecture(model, DEFAULT_PRUNING_LOCATIONS)


def build_dynamicvit(arch: str, pruning_locations: Sequence[int] = DEFAULT_PRUNING_LOCATIONS,
                     **timm_kwargs) -> DynamicViT:
    """A randomly initialised DynamicViT with the shape of an official release (see ``DYNAMICVIT_ARCHS``)."""
    if arch not in DYNAMICVIT_ARCHS:
        raise KeyError(f"Unknown DynamicViT arch {arch!r}; known: {', '.join(DYNAMICVIT_ARCHS)}.")
    spec = DYNAMICVIT_ARCHS[arch]
    kwargs = dict(img_size=224, patch_size=16, embed_dim=spec.embed_dim, depth=12, num_heads=spec.num_heads,
                  mlp_ratio=4.0, qkv_bias=True)
    kwargs.update(timm_kwargs)
    return DynamicViT(pruning_locations=pruning_locations, **kwargs)


def dynamicvit_from_backbone(vit: VisionTransformer,
                             pruning_locations: Sequence[int] = DEFAULT_PRUNING_LOCATIONS) -> DynamicViT:
    """A DynamicViT holding a copy of ``vit``'s weights and freshly initialised predictors (``vit`` is untouched)."""
    model = DynamicViT(pruning_locations=pruning_locations, **vit_config(vit))
    result = model.load_state_dict(vit.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("score_predictor.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{type(vit).__name__} is not a plain DeiT/ViT that DynamicViT can wrap: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}.")
    first = next(vit.parameters())
    return model.to(device=first.device, dtype=first.dtype).train(vit.training)


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------
def _arch_with_width(embed_dim: int) -> str | None:
    return next((name for name, spec in DYNAMICVIT_ARCHS.items() if spec.embed_dim == embed_dim), None)


def _width_hint(model: DynamicViT, state_dict: Mapping[str, torch.Tensor]) -> str:
    """A sentence naming the checkpoint's model size when its embedding width differs from the model's."""
    cls = state_dict.get("cls_token")
    if cls is None or cls.shape[-1] == model.embed_dim:
        return ""
    width = int(cls.shape[-1])
    arch = _arch_with_width(width)
    named = f" ({arch})" if arch else ""
    return (f" The checkpoint has embedding width {width}{named} but this model has {model.embed_dim}"
            f" ({_arch_with_width(model.embed_dim) or 'custom'}): pick the model that matches the file.")


def load_official_checkpoint(model: DynamicViT, path_or_state_dict: str | Path | Mapping) -> DynamicViT:
    """Load an official DynamicViT checkpoint (file or ``{'model': sd}`` / plain state dict) strictly into ``model``.

    Extra top-level entries next to ``'model'`` (e.g. our ``'vitlab'`` metadata) are ignored.
    Raises CheckpointError listing missing, unexpected and misshapen keys.
    """
    state_dict, source = state_dict_and_source(path_or_state_dict)
    try:
        load_strict(model, state_dict, source=source)
    except CheckpointError as exc:
        raise CheckpointError(str(exc) + _width_hint(model, state_dict)) from exc
    return model


# ---------------------------------------------------------------------------------------------
# Inference forward: keep the top-k patches at each stage
# ---------------------------------------------------------------------------------------------
def check_keep_ratio(keep_ratio: float) -> None:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")


def keep_counts(num_patches: int, keep_ratio: float, num_stages: int) -> list[int]:
    """Patches kept after each stage: int(N * rho**s), s = 1 .. stages, the official convention of DeiT and
    LV-ViT (196, 0.7 -> 137, 96, 67)."""
    check_keep_ratio(keep_ratio)
    return [max(1, int(num_patches * keep_ratio ** (s + 1))) for s in range(num_stages)]


@dataclass
class DynamicViTTrace(ReductionTrace):
    """What the pruned forward did, per stage, in original patch coordinates (0 .. num_patches-1). CPU tensors."""

    keep_ratio: float
    grid_size: tuple[int, int]
    pruning_locations: tuple[int, ...]
    kept_indices: list[torch.Tensor] = field(default_factory=list)  # (B, k_s) long, ascending
    keep_scores: list[torch.Tensor] = field(default_factory=list)   # (B, num_patches) keep prob, NaN = already dropped
    tokens_per_block: list[int] = field(default_factory=list)       # tokens entering each block, CLS included

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def keep_masks(self) -> list[torch.Tensor]:
        """Per stage, a (B, num_patches) bool mask of the patches that survive that stage."""
        masks = []
        for kept in self.kept_indices:
            mask = torch.zeros(kept.shape[0], self.num_patches, dtype=torch.bool)
            masks.append(mask.scatter_(1, kept, True))
        return masks


@scope(REDUCTION)
def select_top_patches(keep_score: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (into the current patch tokens) of the k highest keep scores per image, in ascending order."""
    return keep_score.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


@scope(REDUCTION)
def keep_logits(predictor: ScorePredictor, tokens: torch.Tensor) -> torch.Tensor:
    """Inference scoring: (B, 1 + N, C) tokens, CLS first -> (B, N) keep-minus-drop logits of the patch tokens.

    The predictor's math (all tokens kept so far) with three shortcuts that leave its ranking unchanged: the
    keep log-probability is logsigmoid of this difference, a monotone map, so LogSoftmax is skipped; the
    global feature goes through its half of the first ``out_conv`` linear once per image instead of being
    copied to every token; the CLS token rides along through the per-token layers (one token in 197, cheaper
    than copying the patches out) and is dropped from the result.
    """
    norm, fc_in, act_in = predictor.in_conv
    fc1, act1, fc2, act2, fc3, _ = predictor.out_conv
    feats = act_in(fc_in(norm(tokens)))
    half = feats.shape[-1] // 2
    pooled = feats[:, 1:, half:].mean(dim=1, keepdim=True)
    hidden = F.linear(feats[..., :half], fc1.weight[:, :half]) + F.linear(pooled, fc1.weight[:, half:], fc1.bias)
    logits = fc3(act2(fc2(act1(hidden))))
    return logits[:, 1:, 0] - logits[:, 1:, 1]


def _scores_in_original_coords(keep_prob: torch.Tensor, original_index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Scatter the current patches' keep probabilities to a (B, num_patches) map, NaN for already dropped patches."""
    full = keep_prob.new_full((keep_prob.shape[0], num_patches), float("nan"))
    return full.scatter_(1, original_index, keep_prob)


def dynamicvit_forward(model: DynamicViT, x: torch.Tensor, keep_ratio: float = 0.7, return_trace: bool = False):
    """Pruned inference: before each pruning location keep the top int(N * rho**s) patches by predicted keep score.

    The CLS token always stays; blocks run unchanged (fused attention) on the surviving tokens, kept in their
    original order. Returns logits, or (logits, DynamicViTTrace) with ``return_trace``. keep_ratio=1.0
    reproduces ``model(x)``.
    """
    counts = keep_counts(model.num_patches, keep_ratio, len(model.pruning_locations))
    stage_of = {block: stage for stage, block in enumerate(model.pruning_locations)}
    tokens = embed_tokens(model, x)
    trace = None
    if return_trace:
        trace = DynamicViTTrace(keep_ratio, tuple(model.patch_embed.grid_size), model.pruning_locations)
        original_index = torch.arange(model.num_patches, device=x.device).expand(x.shape[0], -1)
    for i, block in enumerate(model.blocks):
        stage = stage_of.get(i)
        if stage is not None:
            score = keep_logits(model.score_predictor[stage], tokens)
            chosen = select_top_patches(score, counts[stage])
            tokens = gather_tokens(tokens, F.pad(chosen + 1, (1, 0)))  # CLS (position 0) first, then the kept patches
            if trace is not None:
                trace.keep_scores.append(_scores_in_original_coords(
                    score.sigmoid(), original_index, model.num_patches).detach().cpu())
                original_index = original_index.gather(1, chosen)
                trace.kept_indices.append(original_index.detach().cpu())
        if trace is not None:
            trace.tokens_per_block.append(tokens.shape[1])
        tokens = block(tokens)
    logits = classify(model, tokens)
    return (logits, trace) if return_trace else logits


def dynamicvit_schedule_forward(model: DynamicViT, x: torch.Tensor, keep_ratio: float = 0.7) -> torch.Tensor:
    """DynamicViT's token schedule without DynamicViT: the same blocks on the same kept counts, no predictors.

    Before each pruning location the first int(N * rho**s) patches stay (plus CLS). Not a classifier: the speed
    ceiling that ``dynamicvit_forward``'s predictors and selection are measured against.
    """
    counts = keep_counts(model.num_patches, keep_ratio, len(model.pruning_locations))
    stage_of = {block: stage for stage, block in enumerate(model.pruning_locations)}
    tokens = embed_tokens(model, x)
    for i, block in enumerate(model.blocks):
        stage = stage_of.get(i)
        if stage is not None:
            tokens = tokens[:, : 1 + counts[stage]]
        tokens = block(tokens)
    return classify(model, tokens)


# ---------------------------------------------------------------------------------------------
# Training forward: Gumbel-softmax masks and policy-masked attention (all tokens stay in the tensor)
# ---------------------------------------------------------------------------------------------
class DynamicViTTrainOutput(NamedTuple):
    """Training forward result: logits, final patch tokens (after the final norm) and per-stage cumulative masks."""

    logits: torch.Tensor              # (B, classes)
    tokens: torch.Tensor              # (B, num_patches, C)
    decisions: list[torch.Tensor]     # per stage (B, num_patches), 1 = kept so far
    keep_targets: list[float]         # rho, rho^2, rho^3 ... : what the ratio loss pulls each stage towards


def _stage_decision(log_probs: torch.Tensor, previous: torch.Tensor, tau: float, hard: bool,
                    forced: torch.Tensor | None) -> torch.Tensor:
    """This stage's cumulative keep mask: a Gumbel-softmax sample (or a forced policy) times the previous mask."""
    if forced is not None:
        return forced.to(previous.dtype) * previous
    return F.gumbel_softmax(log_probs, tau=tau, hard=hard, dim=-1)[..., 0] * previous


def dynamicvit_train_forward(model: DynamicViT, x: torch.Tensor, tau: float = 1.0, keep_ratio: float = 0.7,
                             hard: bool = True,
                             policy_override: Sequence[torch.Tensor] | None = None) -> DynamicViTTrainOutput:
    """The official training forward: all tokens stay, dropped ones are masked out of attention.

    At each pruning location the predictor (global feature weighted by the current mask) gives keep/drop
    log-probs; a Gumbel-softmax sample (straight-through when ``hard``) is multiplied into the cumulative
    mask; every later block uses policy-masked attention. ``policy_override`` (one (B, num_patches) 0/1
    tensor per stage) replaces the samples, e.g. to test the masking. ``keep_ratio`` only sets the
    ``keep_targets`` returned for the loss: the forward itself does not depend on it.
    """
    stages = len(model.pruning_locations)
    if policy_override is not None and len(policy_override) != stages:
        raise ValueError(f"policy_override needs one mask per stage ({stages}), got {len(policy_override)}.")
    stage_of = {block: stage for stage, block in enumerate(model.pruning_locations)}
    tokens = embed_tokens(model, x)
    keep = tokens.new_ones(x.shape[0], model.num_patches)
    cls_keep = tokens.new_ones(x.shape[0], 1)
    policy: torch.Tensor | None = None
    decisions: list[torch.Tensor] = []
    for i, block in enumerate(model.blocks):
        stage = stage_of.get(i)
        if stage is not None:
            log_probs = model.score_predictor[stage](tokens[:, 1:], keep)
            forced = None if policy_override is None else policy_override[stage]
            keep = _stage_decision(log_probs, keep, tau, hard, forced)
            decisions.append(keep)
            policy = torch.cat([cls_keep, keep], dim=1)
        if policy is None:
            tokens = block(tokens)
        else:
            tokens = mlp_residual(block, attention_residual(block, tokens, policy=policy)[0])
    tokens = model.norm(tokens)
    logits = model.forward_head(tokens)
    targets = [keep_ratio ** (s + 1) for s in range(stages)]
    return DynamicViTTrainOutput(logits, tokens[:, model.num_prefix_tokens:], decisions, targets)


def teacher_outputs(teacher: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain ViT teacher's logits and final patch tokens (after the final norm), for distillation."""
    feats = teacher.forward_features(x)
    return teacher.forward_head(feats), feats[:, teacher.num_prefix_tokens:]


def keep_ratio_loss(decisions, targets, like: torch.Tensor) -> torch.Tensor:
    """mean over stages of mean over images of (kept fraction - target)^2 (the official ratio term)."""
    ratio = like.new_zeros(())
    for decision, target in zip(decisions, targets):
        ratio = ratio + ((decision.mean(dim=1) - target) ** 2).mean()
    return ratio / max(1, len(decisions))


def distillation_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)


def dynamicvit_loss(output: DynamicViTTrainOutput, labels: torch.Tensor, teacher_logits: torch.Tensor,
                    teacher_tokens: torch.Tensor, ratio_weight: float = 2.0, distill_weight: float = 0.5,
                    cls_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official DynamicViT loss and its parts.

    total = cls_weight * CE + ratio_weight * mean_s mean_b (keep_{b,s} - target_s)^2
            + distill_weight * KL(teacher || student) + distill_weight * MSE(kept final tokens, teacher's)
    The keep ratio is measured per image over all patches (official non-"dynamic" mode), then squared error
    is averaged over the batch; the token MSE uses the tokens kept after the last stage.
    """
    ce = F.cross_entropy(output.logits, labels)
    ratio = keep_ratio_loss(output.decisions, output.keep_targets, output.logits)
    kl = distillation_kl(output.logits, teacher_logits)
    kept = (output.decisions[-1] > 0.5) if output.decisions else torch.ones_like(output.tokens[..., 0], dtype=torch.bool)
    token_mse = ((output.tokens[kept] - teacher_tokens[kept]) ** 2).mean() if kept.any() else ce.new_zeros(())
    total = cls_weight * ce + ratio_weight * ratio + distill_weight * kl + distill_weight * token_mse
    parts = {"ce": ce, "ratio": ratio, "kl": kl, "token_mse": token_mse}
    return total, {name: value.detach() for name, value in parts.items()}


def mean_keep_per_stage(output: DynamicViTTrainOutput) -> list[float]:
    """Fraction of all patches kept after each stage, averaged over the batch."""
    return [float(d.detach().mean()) for d in output.decisions]
