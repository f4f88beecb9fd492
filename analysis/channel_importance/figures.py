"""Channel-importance figures: per component, per head, fraction kept over depth, Taylor vs activation."""
from __future__ import annotations

import pandas as pd

from analysis.channel_importance.activations import combined_table, rank_agreement
from analysis.channel_importance.scores import (
    Normalization,
    TaylorScores,
    _component_order,
)


def _title(text: str, note: str) -> str:
    return f"{text} {note}".strip()


def component_importance_figure(scores: TaylorScores, normalize: Normalization = "block", note: str = ""):
    """Bar per component: mean normalised importance over its blocks (error bar: spread over blocks)."""
    import plotly.express as px

    df = scores.to_dataframe(normalize)
    per_block = df.groupby(["component", "block"])["normalized"].mean().reset_index()
    bars = per_block.groupby("component")["normalized"].agg(["mean", "std"]).fillna(0.0)
    bars = bars.loc[_component_order(bars.index)].reset_index()
    fig = px.bar(bars, x="component", y="mean", error_y="std",
                 labels={"mean": f"mean importance ({normalize}-normalised)", "component": "component"},
                 title=_title(f"{scores.model}: channel importance per component ({scores.method})", note))
    return fig


def head_importance_figure(scores: TaylorScores, normalize: Normalization = "block", note: str = ""):
    """Heatmaps of mean normalised importance per head (x) and block (y), one panel each for Q, K and V."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = scores.to_dataframe(normalize)
    df = df[df["component"].isin(["q", "k", "v"])]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("Q", "K", "V"), shared_yaxes=True)
    for col, comp in enumerate(("q", "k", "v"), start=1):
        grid = df[df["component"] == comp].pivot_table(index="block", columns="head", values="normalized",
                                                       aggfunc="mean")
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=[f"h{h}" for h in grid.columns], y=list(grid.index),
                                 coloraxis="coloraxis",
                                 hovertemplate="block %{y}, %{x}: %{z:.3f}<extra>" + comp.upper() + "</extra>"),
                      row=1, col=col)
    fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": "importance"}},
                      title=_title(f"{scores.model}: per-head Q/K/V importance ({normalize}-normalised)", note))
    fig.update_yaxes(title_text="block", autorange="reversed", row=1, col=1)
    return fig


def fraction_kept_figure(budget: pd.DataFrame, keep_fraction: float, model: str = "", note: str = ""):
    """Lines over depth: fraction of each component's channels kept under the global budget."""
    import plotly.express as px

    budget = budget.sort_values(["component", "relative_depth"])
    fig = px.line(budget, x="relative_depth", y="fraction_kept", color="component", markers=True,
                  category_orders={"component": _component_order(budget["component"])},
                  hover_data=["block", "channels", "kept"],
                  labels={"relative_depth": "relative depth (0 = first block)",
                          "fraction_kept": "fraction of channels kept"},
                  title=_title(f"{model}: channels kept with a global {keep_fraction:.0%} budget", note))
    fig.add_hline(y=keep_fraction, line_dash="dot", line_color="gray")
    fig.update_yaxes(range=[-0.02, 1.02])
    # Q and K keep (nearly) the same fractions (QK_SAME_NOTE): Q wide underneath, K dashed on top, both visible.
    fig.update_traces(selector={"name": "q"}, line_width=6, opacity=0.6)
    fig.update_traces(selector={"name": "k"}, line_dash="dash", marker_symbol="x")
    return fig


def taylor_vs_activation_figure(taylor: TaylorScores, activation: TaylorScores,
                                normalize: Normalization = "block", note: str = ""):
    """Scatter of both scores per channel (log axes), coloured by component; overall Spearman in the title."""
    import plotly.express as px

    agreement = rank_agreement(taylor, activation)
    rho = float(agreement.loc[agreement["component"] == "all", "spearman"].iloc[0])
    df = combined_table(taylor, activation, normalize)
    df = df[(df["taylor_normalized"] > 0) & (df["activation_normalized"] > 0)]
    fig = px.scatter(df, x="taylor_normalized", y="activation_normalized", color="component",
                     category_orders={"component": _component_order(df["component"])},
                     hover_data=["block", "head", "channel", "layer"], log_x=True, log_y=True, opacity=0.6,
                     labels={"taylor_normalized": "Taylor |Σ w·∂L/∂w|",
                             "activation_normalized": "captum |Σ a·∂L/∂a|"},
                     title=_title(f"{taylor.model}: Taylor vs activation importance, Spearman ρ = {rho:.3f}", note))
    fig.update_traces(marker={"size": 4})
    return fig
