"""The activation variant (captum's grad x activation on each scored layer's output) and how well it agrees
with the Taylor scores (Spearman rank correlation, one table of both)."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.channel_importance.groups import ChannelGroup, channel_groups
from analysis.channel_importance.scores import (
    Normalization,
    TaylorScores,
    _component_order,
    scores_from_groups,
)
from analysis.channel_importance.taylor import (
    LossTarget,
    Progress,
    _label_tensor,
    _model_device,
    _model_name,
    _sized,
    check_loss_target,
    clear_attention_bias_caches,
    per_channel_sum,
    private_copy,
    summed_loss,
)

_KEYS = ["block", "component", "head", "layer", "channel"]


def _unique_layers(groups: Sequence[ChannelGroup]) -> list[str]:
    return list(dict.fromkeys(g.layer for g in groups))


def _channel_dims(groups: Sequence[ChannelGroup]) -> dict[str, int]:
    return {g.layer: g.channel_dim for g in groups}


def _per_example_loss_fn(work: nn.Module, loss_target: LossTarget) -> Callable:
    """captum's forward function: one cross-entropy per example (so no target index is needed)."""

    def forward(x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        clear_attention_bias_caches(work)
        return summed_loss(work(x), labels, loss_target, reduction="none")

    return forward


def activation_importance(model: nn.Module, batches: Iterable, loss_target: LossTarget = "self",
                          progress: Progress | None = None, model_name: str | None = None) -> TaylorScores:
    """Activation-based Taylor importance through captum's ``LayerGradientXActivation``.

    For the same layers as ``taylor_importance``: grad x activation of each layer's output, summed over
    images and tokens/space per channel, accumulated (signed) over batches, abs at the end.
    """
    from captum.attr import LayerGradientXActivation

    check_loss_target(loss_target)
    groups = channel_groups(model)
    work = private_copy(model)
    work.requires_grad_(False)  # only gradients w.r.t. layer outputs are needed
    layer_names = _unique_layers(groups)
    channel_dims = _channel_dims(groups)
    modules = dict(work.named_modules())
    explainer = LayerGradientXActivation(_per_example_loss_fn(work, loss_target),
                                         [modules[n] for n in layer_names])
    device, total, images = _model_device(work), _sized(batches), 0
    sums: dict[str, torch.Tensor] = {}
    with torch.inference_mode(False), torch.enable_grad():
        for done, (x, labels) in enumerate(batches, start=1):
            x = x.to(device).requires_grad_(True)  # gives captum a graph to differentiate through
            extra = None
            if loss_target == "labels":
                extra = (_label_tensor(labels, x.shape[0], device),)
            attributions = explainer.attribute(x, additional_forward_args=extra)
            for name, attr in zip(layer_names, attributions):
                channel_sum = per_channel_sum(attr.detach(), channel_dims[name])
                sums[name] = sums[name] + channel_sum if name in sums else channel_sum
            images += x.shape[0]
            if progress is not None:
                progress(done, total)
    if images == 0:
        raise ValueError("No images: channel importance needs at least one batch.")
    vectors = [sums[g.layer][g.start:g.stop].double().cpu().numpy() for g in groups]
    return scores_from_groups(groups, vectors, model=_model_name(model, model_name), method="activation",
                               loss_target=loss_target, num_images=images)


# ----------------------------------------------------------------------------- agreement with the Taylor scores

def p_value_text(p: float) -> str:
    """A p-value as people write it: '0.032', '4.1e-05', '< 1e-300'; never 0.0000000000000009."""
    if np.isnan(p):
        return "n/a"
    if p < 1e-300:
        return "< 1e-300"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def rank_agreement(a: TaylorScores, b: TaylorScores) -> pd.DataFrame:
    """Spearman rank correlation of two score sets, per component and over all channels (``'all'``)."""
    from scipy.stats import spearmanr

    left = a.to_dataframe("none")[_KEYS + ["score"]]
    right = b.to_dataframe("none")[_KEYS + ["score"]]
    both = left.merge(right, on=_KEYS, suffixes=("_a", "_b"))
    if len(both) != len(left) or len(both) != len(right):
        raise ValueError("The two score sets do not describe the same channels (different models?).")

    def row(name: str, part: pd.DataFrame) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input -> nan, reported as such
            result = spearmanr(part["score_a"], part["score_b"])
        return {"component": name, "spearman": float(result.statistic), "p_value": float(result.pvalue),
                "channels": len(part)}

    rows = [row(c, both[both["component"] == c]) for c in _component_order(both["component"])]
    rows.append(row("all", both))
    return pd.DataFrame(rows)


def combined_table(taylor: TaylorScores, activation: TaylorScores | None = None,
                   normalize: Normalization = "block") -> pd.DataFrame:
    """Every channel's scores in one table (the CSV download): Taylor, and activation where given."""
    df = taylor.to_dataframe(normalize).rename(columns={"score": "taylor", "normalized": "taylor_normalized"})
    df = df.drop(columns=["method"])
    if activation is not None:
        act = activation.to_dataframe(normalize)[_KEYS + ["score", "normalized"]]
        act = act.rename(columns={"score": "activation", "normalized": "activation_normalized"})
        df = df.merge(act, on=_KEYS, how="left")
    return df
