"""The tome-merge task: ToMe merging over a dataset (token sizes, merged-patch frequency, group sizes by depth)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from analysis.runs.common import (
    DatasetTask,
    TaskModel,
    TaskOptions,
    add_sum,
    device_of,
    load_record,
    model_label,
    save_record,
    zeros,
)
from models.tome import check_supported, merge_schedule, tome_forward
from models.vit_forward import token_count

TOME_MERGE = "tome-merge"


@dataclass
class ToMeMergeRecord:
    """ToMe merging over a dataset: per layer, token sizes and how often each patch sits in a merged group."""

    model: str
    note: str
    r: str
    schedule: tuple[int, ...]          # tokens merged in each block
    tokens_per_layer: tuple[int, ...]  # tokens after each block, CLS included
    grid_size: tuple[int, int]
    images: int
    size_hist: np.ndarray              # [layers, patches + 1]: patch tokens holding s patches (summed over images)
    merged_count: np.ndarray           # [layers, patches]: images in which the patch's token holds > 1 patch
    group_size_sum: np.ndarray         # [layers, patches]: summed size of the token holding the patch

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def merged_frequency(self, layer: int = -1) -> np.ndarray:
        """[grid_h, grid_w] fraction of images in which the patch ends in a merged group after ``layer``."""
        return (self.merged_count[layer] / max(self.images, 1)).reshape(self.grid_size)

    def mean_token_size(self) -> np.ndarray:
        """[layers] patches per patch token (a token-weighted mean)."""
        sizes = np.arange(self.size_hist.shape[1])
        return (self.size_hist * sizes).sum(1) / np.maximum(self.size_hist.sum(1), 1)

    def mean_group_size(self) -> np.ndarray:
        """[layers] size of the group a patch belongs to, averaged over patches (a patch-weighted mean)."""
        return self.group_size_sum.sum(1) / max(self.images * self.num_patches, 1)

    def summary(self) -> pd.DataFrame:
        largest = [int(np.flatnonzero(h)[-1]) if h.any() else 0 for h in self.size_hist]
        return pd.DataFrame({
            "layer": np.arange(len(self.schedule)), "r": self.schedule, "tokens_after": self.tokens_per_layer,
            "images": self.images, "mean_token_size": self.mean_token_size(),
            "mean_group_size": self.mean_group_size(),
            "fraction_patches_merged": self.merged_count.sum(1) / max(self.images * self.num_patches, 1),
            "largest_token": largest})


class ToMeMergeTask(DatasetTask):
    """ToMe merging over a dataset: token size distribution, merged-patch frequency and group size per layer."""

    name = TOME_MERGE
    files = ("tome_merge.npz", "tome_merge.csv")

    def __init__(self, model: nn.Module, r: str, proportional_attention: bool, model_name: str,
                 note: str = "") -> None:
        super().__init__(model_name, note)
        self.model, self.r, self.proportional_attention = model, str(r), proportional_attention
        depth, patches = len(model.blocks), model.patch_embed.num_patches
        self.schedule = tuple(merge_schedule(self.r, depth, token_count(model), model.num_prefix_tokens))
        device = device_of(model)
        self.sums = {"images": zeros(device=device), "size_hist": zeros(depth, patches + 1, device=device),
                     "merged": zeros(depth, patches, device=device),
                     "group_size": zeros(depth, patches, device=device)}

    @classmethod
    def build(cls, subject: TaskModel, options: TaskOptions) -> "ToMeMergeTask":
        _check_tome_supported(subject.model)
        return cls(subject.model, options.r, options.proportional_attention, subject.name, subject.note)

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        return {"r": str(options.r), "proportional_attention": options.proportional_attention}

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.inference_mode():
            _, trace = tome_forward(self.model, images, r=self.r, proportional_attention=self.proportional_attention,
                                    return_trace=True)
        prefix, patches = trace.num_prefix_tokens, self.sums["merged"].shape[1]
        histograms, merged, group_sizes = [], [], []
        for assignment, sizes in zip(trace.assignments, trace.sizes):
            token_sizes = torch.from_numpy(np.rint(sizes[:, prefix:]).astype(np.int64))
            group = torch.from_numpy(np.take_along_axis(sizes, assignment, axis=1)).double()  # [B, patches]
            histograms.append(torch.bincount(token_sizes.flatten(), minlength=patches + 1))
            merged.append((group > 1).sum(0))
            group_sizes.append(group.sum(0))
        add_sum(self.sums, "size_hist", torch.stack(histograms))  # [layers, patches + 1]
        add_sum(self.sums, "merged", torch.stack(merged))
        add_sum(self.sums, "group_size", torch.stack(group_sizes))
        add_sum(self.sums, "images", images.shape[0])

    def result(self, sums: dict[str, torch.Tensor]) -> ToMeMergeRecord:
        tokens, after = [], token_count(self.model)
        for merged in self.schedule:
            after -= merged
            tokens.append(after)
        return ToMeMergeRecord(self.model_name, self.note, self.r, self.schedule, tuple(tokens),
                               tuple(self.model.patch_embed.grid_size), int(sums["images"].item()),
                               sums["size_hist"].cpu().numpy(), sums["merged"].cpu().numpy(),
                               sums["group_size"].cpu().numpy())

    @staticmethod
    def write(record: ToMeMergeRecord, out: Path) -> list[str]:
        save_record(out / "tome_merge.npz", record)
        record.summary().to_csv(out / "tome_merge.csv", index=False)
        return list(ToMeMergeTask.files)

    @staticmethod
    def load(folder: Path, run: dict) -> ToMeMergeRecord:
        return load_record(folder / "tome_merge.npz", ToMeMergeRecord)

    @staticmethod
    def figures(record: ToMeMergeRecord) -> dict[str, go.Figure]:
        return {"merged patches": merged_frequency_figure(record), "group sizes": group_size_figure(record)}


def merged_frequency_figure(record: ToMeMergeRecord, layer: int = -1) -> go.Figure:
    """Heat map: fraction of images in which each patch position ends in a merged group after ``layer``."""
    index = layer % len(record.schedule)
    figure = go.Figure(go.Heatmap(z=record.merged_frequency(layer), zmin=0.0, zmax=1.0, colorscale="Cividis",
                                  colorbar=dict(title="merged in"),
                                  hovertemplate="row %{y}, col %{x}: %{z:.0%}<extra></extra>"))
    figure.update_yaxes(autorange="reversed", scaleanchor="x")
    figure.update_layout(title=f"{model_label(record.model, record.note)}: how often each patch is in a merged token "
                               f"after block {index} (r = {record.r}), {record.images} images", height=380)
    return figure


def group_size_figure(record: ToMeMergeRecord) -> go.Figure:
    """Per layer: mean token size (token-weighted) and mean size of a patch's group (patch-weighted)."""
    layers = list(range(len(record.schedule)))
    figure = go.Figure([
        go.Scatter(x=layers, y=record.mean_token_size(), name="patches per token", mode="lines+markers"),
        go.Scatter(x=layers, y=record.mean_group_size(), name="size of a patch's group", mode="lines+markers"),
    ])
    figure.update_layout(title=f"{model_label(record.model, record.note)}: ToMe group sizes by depth (r = {record.r}, "
                               f"{record.images} images)", xaxis_title="block", yaxis_title="patches",
                         hovermode="x unified")
    return figure


def _check_tome_supported(model: nn.Module) -> None:
    """ToMe's own model check, as a ValueError (bad input) rather than a TypeError."""
    try:
        check_supported(model)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
