"""Per-channel scores (``TaylorScores``) and what is read from them: normalisation across layers, the global
budget (which channels a top-fraction cut keeps, per block and component), why scores cannot be ranked, Q = K."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd

from analysis.channel_importance.groups import COMPONENTS, ChannelGroup

Normalization = Literal["block", "layer", "l2", "none"]
NORMALIZATIONS = ("block", "layer", "l2", "none")


# ----------------------------------------------------------------------------- results

@dataclass
class TaylorScores:
    """One row per channel (parallel numpy columns); ``score`` is |accumulated importance| (raw)."""

    model: str
    method: str  # "taylor" or "activation"
    loss_target: str
    num_images: int
    block: np.ndarray
    relative_depth: np.ndarray
    component: np.ndarray
    head: np.ndarray
    layer: np.ndarray
    channel: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def to_dataframe(self, normalize: Normalization = "block") -> pd.DataFrame:
        """Every row with its raw ``score`` and ``normalized`` score (see ``normalized_scores``)."""
        df = pd.DataFrame({"model": self.model, "method": self.method, "block": self.block,
                           "relative_depth": self.relative_depth, "component": self.component,
                           "head": self.head, "layer": self.layer, "channel": self.channel,
                           "score": self.score})
        df["normalized"] = normalized_scores(self, normalize)
        return df

    def normalized(self, normalize: Normalization = "block") -> np.ndarray:
        return normalized_scores(self, normalize)

    def component_summary(self, keep_fraction: float = 0.5, normalize: Normalization = "block") -> pd.DataFrame:
        return component_summary(self, keep_fraction, normalize)


def scores_from_groups(groups: Sequence[ChannelGroup], vectors: Sequence[np.ndarray], *, model: str,
                        method: str, loss_target: str, num_images: int) -> TaylorScores:
    """Flatten per-group channel vectors into per-channel rows (channel = index within the group)."""
    sizes = [g.size for g in groups]

    def column(values) -> np.ndarray:
        return np.repeat(np.asarray(values), sizes)

    return TaylorScores(
        model=model, method=method, loss_target=loss_target, num_images=num_images,
        block=column([g.block for g in groups]).astype(np.int64),
        relative_depth=column([g.relative_depth for g in groups]).astype(np.float64),
        component=column([g.component for g in groups]).astype(object),
        head=column([g.head for g in groups]).astype(np.int64),
        layer=column([g.layer for g in groups]).astype(object),
        channel=np.concatenate([np.arange(s) for s in sizes]).astype(np.int64),
        score=np.abs(np.concatenate(vectors)).astype(np.float64),
    )


# ----------------------------------------------------------------------------- analysis

def _normalization_keys(normalize: Normalization) -> list[str]:
    if normalize == "block":
        return ["block"]
    if normalize in ("layer", "l2"):
        return ["block", "component"]
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}.")


def normalized_scores(scores: TaylorScores, normalize: Normalization = "block") -> np.ndarray:
    """Scores made comparable across layers: divided by their group's mean (or L2 norm for ``'l2'``).

    Groups whose scores are all zero stay zero.
    """
    raw = np.asarray(scores.score, dtype=np.float64)
    if normalize == "none":
        return raw.copy()
    df = pd.DataFrame({"block": scores.block, "component": scores.component, "score": raw})
    grouped = df.groupby(_normalization_keys(normalize), sort=False)["score"]
    if normalize == "l2":
        scale = grouped.transform(lambda s: float(np.sqrt(np.square(s).sum())))
    else:
        scale = grouped.transform("mean")
    scale = scale.to_numpy()
    return np.divide(raw, scale, out=np.zeros_like(raw), where=scale > 0)


def global_keep_mask(scores: TaylorScores, keep_fraction: float, normalize: Normalization = "block") -> np.ndarray:
    """Rank all channels globally by normalised importance and keep the top ``keep_fraction``."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], not {keep_fraction}.")
    values = normalized_scores(scores, normalize)
    n_keep = int(round(keep_fraction * len(values)))
    order = np.argsort(-values, kind="stable")
    keep = np.zeros(len(values), dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def _component_order(components: Iterable[str]) -> list[str]:
    present = set(components)
    return [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))


def budget_keep_fraction(scores: TaylorScores, keep_fraction: float,
                         normalize: Normalization = "block") -> pd.DataFrame:
    """The paper's analysis: after a global top-``keep_fraction`` cut, the fraction kept per block and component."""
    df = pd.DataFrame({"block": scores.block, "relative_depth": scores.relative_depth,
                       "component": scores.component,
                       "kept": global_keep_mask(scores, keep_fraction, normalize)})
    out = (df.groupby(["block", "relative_depth", "component"], sort=True)["kept"]
           .agg(channels="size", kept="sum").reset_index())
    out["fraction_kept"] = out["kept"] / out["channels"]
    return out


def component_summary(scores: TaylorScores, keep_fraction: float = 0.5,
                      normalize: Normalization = "block") -> pd.DataFrame:
    """Per component: channels, mean raw and normalised score, and the fraction kept under the budget."""
    df = pd.DataFrame({"component": scores.component, "score": scores.score,
                       "normalized": normalized_scores(scores, normalize),
                       "kept": global_keep_mask(scores, keep_fraction, normalize)})
    out = df.groupby("component").agg(channels=("score", "size"), mean_score=("score", "mean"),
                                      mean_normalized=("normalized", "mean"),
                                      fraction_kept=("kept", "mean"))
    return out.loc[_component_order(out.index)].reset_index()


def no_ranking_reason(scores: TaylorScores) -> str | None:
    """Why these scores support no budget result, or None when they do.

    A component whose channels all score exactly the same cannot be ranked: a global budget would cut it
    by tie-breaking order alone. That happens when no gradient reaches it (untrained EfficientViT: timm
    zero-initialises the last BatchNorm of every residual branch), never in a trained network.
    """
    frame = pd.DataFrame({"component": scores.component, "score": scores.score})
    spread = frame.groupby("component")["score"].agg(["size", "min", "max"])
    tied = spread[(spread["size"] > 1) & (spread["max"] - spread["min"] <= 1e-12 * spread["max"].abs().clip(lower=1.0))]
    if tied.empty:
        return None
    values = ", ".join(f"{c} = {row['min']:.3g}" for c, row in tied.loc[_component_order(tied.index)].iterrows())
    return (f"Every channel of {', '.join(_component_order(tied.index))} has the same score ({values}): no "
            "gradient separates them, as with untrained weights, so they cannot be ranked and no budget result "
            "(which component keeps its width) is stated.")


QK_SAME_NOTE = (
    "Q and K score the same, channel by channel, and that follows from the maths, not from these images: a "
    "channel's Taylor score |Σ w·∂L/∂w| over the weights that make it equals |Σ q_j·∂L/∂q_j| over the tokens, and "
    "with attention logits S = q·kᵀ·scale, both Σ_t q_j(t)·∂L/∂q_j(t) and Σ_t k_j(t)·∂L/∂k_j(t) equal "
    "scale·Σ over query-key pairs of ∂L/∂S·q_j·k_j. In the chart above, their lines lie on each other (q wide "
    "and faint underneath, k dashed on top).")


def qk_scores_identical(scores: TaylorScores, tolerance: float = 1e-4) -> bool:
    """Whether every Q channel scores what the K channel of the same block, head and index scores (to
    ``tolerance`` of the largest of them): the identity behind ``QK_SAME_NOTE``."""
    frame = scores.to_dataframe("none")
    keys = ["block", "head", "channel"]
    q = frame[frame["component"] == "q"].set_index(keys)["score"]
    k = frame[frame["component"] == "k"].set_index(keys)["score"]
    if q.empty or len(q) != len(k):
        return False
    q, k = q.sort_index(), k.sort_index()
    if not q.index.equals(k.index):
        return False
    scale = max(float(np.abs(q).max()), float(np.abs(k).max()))
    return bool(scale > 0 and (np.abs(q.to_numpy() - k.to_numpy()) <= tolerance * scale).all())
