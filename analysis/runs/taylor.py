"""The taylor task: first-order Taylor importance per channel, with the gradients summed over a dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from analysis.channel_importance import (
    TaylorScores,
    TaylorSums,
    budget_keep_fraction,
    component_importance_figure,
    fraction_kept_figure,
    head_importance_figure,
)
from analysis.runs.common import (
    DatasetTask,
    TaskModel,
    TaskOptions,
)

TAYLOR = "taylor"


class TaylorTask(DatasetTask):
    """First-order Taylor importance |sum(w * dL/dw)| per channel, with dL/dw summed over the whole dataset.

    The accumulator is ``analysis.channel_importance.TaylorSums``, the one ``taylor_importance`` (the page) runs: only the
    gradient sums are accumulated (float64, per scored parameter), all-reduced across processes, and the
    product with the weights is taken once at the end. Works on a private copy of the model.
    """

    name = TAYLOR
    files = ("taylor_scores.csv", "taylor_components.csv")

    def __init__(self, model: nn.Module, loss_target: str, model_name: str, note: str = "") -> None:
        super().__init__(model_name, note)
        self.loss_target = loss_target
        self.accumulator = TaylorSums(model, loss_target, model_name)
        self.sums = self.accumulator.sums

    @classmethod
    def build(cls, subject: TaskModel, options: TaskOptions) -> "TaylorTask":
        return cls(subject.model, options.loss_target, subject.name, subject.note)

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        return {"loss_target": options.loss_target}

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.accumulator.update(images, labels)

    def result(self, sums: dict[str, torch.Tensor]):
        return self.accumulator.result(sums)

    @staticmethod
    def write(scores, out: Path) -> list[str]:
        scores.to_dataframe("block").to_csv(out / "taylor_scores.csv", index=False)
        scores.component_summary().to_csv(out / "taylor_components.csv", index=False)
        return list(TaylorTask.files)

    @staticmethod
    def load(folder: Path, run: dict):
        df = pd.read_csv(folder / "taylor_scores.csv")
        counts = run.get("counts", {})
        return TaylorScores(
            model=str(df["model"].iloc[0]), method=str(df["method"].iloc[0]),
            loss_target=str(run.get("settings", {}).get("loss_target", "self")),
            num_images=int(counts.get("images_seen", 0)), block=df["block"].to_numpy(np.int64),
            relative_depth=df["relative_depth"].to_numpy(np.float64), component=df["component"].to_numpy(object),
            head=df["head"].to_numpy(np.int64), layer=df["layer"].to_numpy(object),
            channel=df["channel"].to_numpy(np.int64), score=df["score"].to_numpy(np.float64))

    @staticmethod
    def figures(scores) -> dict[str, go.Figure]:
        return {"components": component_importance_figure(scores), "heads": head_importance_figure(scores),
                "budget": fraction_kept_figure(budget_keep_fraction(scores, 0.5), 0.5, scores.model)}
