"""The head-similarity task: per-block head-by-head similarity over a dataset -> mean similarity and redundancy."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from torch import nn

from analysis.head_redundancy import (
    BlockRedundancy,
    HeadSimilaritySums,
    RedundancyResult,
    redundancy_vs_depth,
    similarity_dataframe,
    similarity_heatmaps,
    to_dataframe,
)
from analysis.runs.common import (
    DatasetTask,
    TaskModel,
    TaskOptions,
    device_of,
)
from models.attention_recording import record_attention

HEAD_SIMILARITY = "head-similarity"


class HeadSimilarityTask(DatasetTask):
    """Per-block head-by-head similarity sums and counts over a dataset -> mean similarity and redundancy.

    The accumulator is ``analysis.head_redundancy.HeadSimilaritySums``, the one the page's ``analyze_model``
    runs, sized from one forward on a blank image so every rank has the sums up front.
    """

    name = HEAD_SIMILARITY
    files = ("head_similarity.npz", "head_redundancy.csv", "head_similarity.csv")

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int], model_name: str,
                 random_weights: bool = False, note: str = "") -> None:
        super().__init__(model_name, note)
        self.model, self.random_weights = model, random_weights
        device = device_of(model)
        _, layout = record_attention(model, torch.zeros(1, *input_size, device=device))
        self.accumulator = HeadSimilaritySums(layout, device)
        self.sums = self.accumulator.sums

    @classmethod
    def build(cls, subject: TaskModel, options: TaskOptions) -> "HeadSimilarityTask":
        return cls(subject.model, subject.input_size, subject.name, subject.random_weights, subject.note)

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        _, record = record_attention(self.model, images)
        self.accumulator.update(record)

    def result(self, sums: dict[str, torch.Tensor]):
        return self.accumulator.result(self.model_name, self.random_weights, sums)

    @staticmethod
    def write(result, out: Path) -> list[str]:
        arrays: dict[str, Any] = {"model": result.model, "kind": result.kind, "images": result.num_images,
                                  "random_weights": result.random_weights, "embedding": result.embedding,
                                  "blocks": np.array([b.block for b in result.blocks]),
                                  "stages": np.array([b.stage for b in result.blocks]),
                                  "relative_depth": np.array([b.relative_depth for b in result.blocks])}
        for b in result.blocks:
            arrays[f"block{b.block}_attention_similarity"] = b.attention_similarity
            arrays[f"block{b.block}_feature_similarity"] = b.feature_similarity
            arrays[f"block{b.block}_offset_profile"] = b.offset_profile
            arrays[f"block{b.block}_attention_redundancy"] = b.attention_redundancy
        np.savez(out / "head_similarity.npz", **arrays)
        to_dataframe(result).to_csv(out / "head_redundancy.csv", index=False)
        similarity_dataframe(result).to_csv(out / "head_similarity.csv", index=False)
        return list(HeadSimilarityTask.files)

    @staticmethod
    def load(folder: Path, run: dict):
        with np.load(folder / "head_similarity.npz", allow_pickle=False) as z:
            blocks = [BlockRedundancy(int(b), int(s), float(d), z[f"block{b}_attention_similarity"],
                                      z[f"block{b}_feature_similarity"], z[f"block{b}_offset_profile"])
                      for b, s, d in zip(z["blocks"], z["stages"], z["relative_depth"])]
            return RedundancyResult(str(z["model"]), str(z["kind"]), int(z["images"]), bool(z["random_weights"]),
                                    blocks, z["embedding"])

    @staticmethod
    def figures(result) -> dict[str, go.Figure]:
        return {"redundancy vs depth": redundancy_vs_depth([result]), "similarity": similarity_heatmaps(result)}
