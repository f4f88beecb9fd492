"""How far a reduced model's predictions stay from the unreduced model's, and what it costs.

Agreement is measured against the same model without reduction on the same images (no labels are needed): top-1
agreement is the fraction of images whose top-1 class is unchanged, top-5 overlap the mean fraction of the
unreduced top-5 classes that the reduced top-5 still contains. ``plot_agreement`` draws a sweep of either against
the swept setting (ToMe's r for the ``python -m analysis.tome_agreement`` CLI's ``AgreementRow``s).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.provenance import figure_title
from analysis.timing.flops import measure_flops


@dataclass(frozen=True)
class AgreementRow:
    """One r of the sweep: agreement with the unreduced model, tokens left, and cost per image."""

    r: int
    top1_agreement: float
    top5_overlap_mean: float
    tokens_after_last_layer: int
    gflops_per_image: float


def count_gflops(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``run()``'s output and its GFLOPs (2 per multiply-add), fused CPU attention included."""
    output, flops = measure_flops(run)
    return output, flops / 1e9


def top1_agreement(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same in both logit tensors."""
    return (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()


def top5_overlap(reference: torch.Tensor, logits: torch.Tensor, k: int = 5) -> float:
    """Mean fraction of the reference top-k classes that are also in the other top-k."""
    k = min(k, reference.shape[-1])
    ref_top, top = reference.topk(k, dim=-1).indices, logits.topk(k, dim=-1).indices
    shared = (ref_top.unsqueeze(-1) == top.unsqueeze(-2)).any(-1).sum(-1)
    return (shared.float() / k).mean().item()


def rows_to_frame(rows: Sequence[AgreementRow]) -> pd.DataFrame:
    """The sweep as a table (one row per r), for display and CSV download."""
    return pd.DataFrame([asdict(row) for row in rows])


def _round_step(raw: float) -> int:
    """The round number (1, 2, 5, 10, 20, ...) nearest above ``raw``, for axis ticks."""
    magnitude = 10 ** max(0, len(str(int(raw))) - 1)
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def plot_agreement(rows: Sequence[AgreementRow] | pd.DataFrame,
                   title: str = "ToMe: agreement with the unreduced model", x: str = "r",
                   x_title: str = "r (tokens merged per block)", tokens: str = "tokens_after_last_layer",
                   tokens_name: str = "tokens after last block") -> go.Figure:
    """Top-1 agreement and top-5 overlap against the swept setting (``x``: ToMe's r for ``AgreementRow``s; any
    column of a frame), with the tokens left on a second axis."""
    frame = rows if isinstance(rows, pd.DataFrame) else rows_to_frame(rows)
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(go.Scatter(x=frame[x], y=frame.top1_agreement, name="top-1 agreement", mode="lines+markers"))
    figure.add_trace(go.Scatter(x=frame[x], y=frame.top5_overlap_mean, name="top-5 overlap", mode="lines+markers"))
    figure.add_trace(
        go.Scatter(x=frame[x], y=frame[tokens], name=tokens_name, mode="lines", line=dict(dash="dot", color="gray")),
        secondary_y=True,
    )
    text, top = figure_title(title)
    figure.update_layout(title=text, margin=dict(t=top), legend=dict(orientation="h", y=-0.2),
                         hovermode="x unified")
    if pd.api.types.is_integer_dtype(frame[x]):
        step = max(1, _round_step(max(frame[x].max() - frame[x].min(), 1) / 8))
        figure.update_xaxes(title_text=x_title, tick0=0, dtick=step)
    else:  # a keep ratio: the most reduction on the right
        figure.update_xaxes(title_text=x_title, autorange="reversed")
    figure.update_yaxes(title_text="agreement", range=[0, 1.02], dtick=0.2, secondary_y=False)
    # Token counts are whole numbers: ticks at round steps (plotly's own aligned to the left axis gave 203.3).
    most = int(frame[tokens].max())
    figure.update_yaxes(title_text="tokens", range=[0, most * 1.02], tickmode="linear", tick0=0,
                        dtick=max(1, _round_step(most / 5)), tickformat="d", showgrid=False, secondary_y=True)
    return figure
