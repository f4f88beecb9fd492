"""Channel importance: first-order Taylor scores (Molchanov et al. 2019) and captum's grad x activation.

EfficientViT's parameter analysis ranked every prunable channel by |sum(w * dL/dw)| and found that V
and the embedding deserve width while Q/K and the FFN hidden ratio can shrink. This package computes
that score for every channel of a timm ViT/DeiT or EfficientViT (MSRA) model, the activation-based
variant, their rank agreement, the global-budget analysis and the figures.

Choices (documented once, here):
* **Score** of an output channel: |sum over the channel's parameters of w * g|, where g is the gradient
  of the loss summed over all images (gradients are summed over batches, in float64, before the
  product; the loss is summed over images so the score does not depend on how images are batched).
* **Parameters of a channel**: the weight row *and the bias* of that output channel (a pruned channel
  loses both). Where a Conv2d is followed by BatchNorm (timm ``ConvNorm``), the BN weight and bias of
  the same channel count too (pruning the channel removes them as well).
* **Embedding width** (ViT): the patch-embedding conv's output channel c together with column c of
  the cls token, the position embedding (and distillation/register tokens where present): these are
  all summed into the same residual channel before block 0. The rest of the residual stream (norms,
  proj/fc2 outputs) is left out so that no parameter is counted twice. EfficientViT: the last stem
  conv (``patch_embed.conv4``), which sets the width of stage 1. EfficientViT's subsample layers
  (PatchMerging and the residual FFNs around it) are not scored; its blocks are.
* **Normalisation** for ranking channels across layers (see ``normalized_scores``): default ``"block"``
  divides each score by the mean score of all prunable channels in the same block, which removes the
  growth of gradient magnitude with depth but keeps the comparison between components inside a block
  (the question the analysis asks). ``"layer"`` divides by the mean of the (block, component) group
  (per-layer, as Molchanov normalises; it makes every component's mean 1), ``"l2"`` by that group's L2
  norm (Molchanov et al. 2017), ``"none"`` keeps raw scores.
* For Linear layers, sum over tokens of activation * grad equals sum(w * g) over the row plus bias, so
  the two variants agree exactly for ViT q/k/v/proj/FFN; they differ for the embedding (cls/pos) and
  for every ConvNorm (BN output vs conv + BN parameters).
* In a ViT head without q/k norms, Q channel d and K channel d get the same score: both equal
  sum_ij dL/dS_ij * q_id * k_jd * scale, because the attention logit S is bilinear in q and k.

Modules: ``groups`` (which channels form the Q, K, V, proj, FFN and embedding groups of each architecture),
``taylor`` (the Taylor pass, the pool of private copies), ``scores`` (per-channel scores, normalisation, the
global budget), ``activations`` (captum's grad x activation, Spearman agreement), ``figures``, ``inputs``.
"""
from analysis.channel_importance.activations import (
    activation_importance,
    combined_table,
    p_value_text,
    rank_agreement,
)
from analysis.channel_importance.figures import (
    component_importance_figure,
    fraction_kept_figure,
    head_importance_figure,
    taylor_vs_activation_figure,
)
from analysis.channel_importance.groups import (
    COMPONENTS,
    EMBED_BLOCK,
    ChannelGroup,
    ParamSlice,
    channel_groups,
    is_efficientvit_msra,
    is_vit,
)
from analysis.channel_importance.inputs import (
    inputs_digest,
    labelled_folder,
    split_batches,
)
from analysis.channel_importance.scores import (
    NORMALIZATIONS,
    QK_SAME_NOTE,
    Normalization,
    TaylorScores,
    budget_keep_fraction,
    component_summary,
    global_keep_mask,
    no_ranking_reason,
    normalized_scores,
    qk_scores_identical,
    scores_from_groups,
)
from analysis.channel_importance.taylor import (
    LossTarget,
    Progress,
    TaylorSums,
    check_loss_target,
    clear_attention_bias_caches,
    per_channel_sum,
    private_copy,
    scored_parameter_names,
    summed_loss,
    taylor_importance,
)

__all__ = [
    "COMPONENTS", "EMBED_BLOCK", "NORMALIZATIONS", "QK_SAME_NOTE", "ChannelGroup", "LossTarget", "Normalization",
    "ParamSlice", "Progress", "TaylorScores", "TaylorSums", "activation_importance", "budget_keep_fraction",
    "channel_groups", "check_loss_target", "clear_attention_bias_caches", "combined_table",
    "component_importance_figure", "component_summary", "fraction_kept_figure", "global_keep_mask",
    "head_importance_figure", "inputs_digest", "is_efficientvit_msra", "is_vit", "labelled_folder",
    "no_ranking_reason", "normalized_scores", "p_value_text", "per_channel_sum", "private_copy",
    "qk_scores_identical", "rank_agreement", "scored_parameter_names", "scores_from_groups", "split_batches",
    "summed_loss", "taylor_importance", "taylor_vs_activation_figure",
]
