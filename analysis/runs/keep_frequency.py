"""The keep-frequency task: how often each position survives each pruning stage of a DynamicViT-family model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
from analysis.token_reduction import keep_frequency_figure
from models.dynamic_zoo import as_stage_trace
from models.dynamicvit import dynamicvit_forward
from models.methods import METHODS, methods_for
from models.registry import get_spec

KEEP_FREQUENCY = "keep-frequency"


@dataclass
class KeepFrequencyRecord:
    """How often each position survives each pruning stage of a DynamicViT-family model, over a dataset.

    Positions are the cells of the grid the predictors score (DeiT/LV-ViT: the patch grid; ConvNeXt/Swin: the
    pruned stage's feature map, 14 x 14 at 224 px)."""

    model: str
    note: str
    keep_ratio: float
    grid_size: tuple[int, int]
    stage_blocks: tuple[str, ...]    # the block each predictor sits before
    kept_tokens: tuple[int, ...]     # positions kept by each stage
    images: int
    kept_count: np.ndarray           # [stages, cells]: images in which the position survived the stage
    keep_score_sum: np.ndarray       # [stages, cells]: sum of its predicted keep probability where scored
    scored_count: np.ndarray         # [stages, cells]: images in which it was there to be scored

    def frequency(self, stage: int = -1) -> np.ndarray:
        """[grid_h, grid_w] fraction of images in which each position survives ``stage``."""
        return (self.kept_count[stage] / max(self.images, 1)).reshape(self.grid_size)

    def mean_keep_score(self, stage: int = -1) -> np.ndarray:
        """[grid_h, grid_w] mean keep probability where the position was scored (NaN where it never was)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.keep_score_sum[stage] / self.scored_count[stage]).reshape(self.grid_size)

    def summary(self) -> pd.DataFrame:
        rows = []
        for s, block in enumerate(self.stage_blocks):
            freq = self.kept_count[s] / max(self.images, 1)
            rows.append({"model": self.model, "weights": self.note or "pretrained", "stage": s + 1,
                         "before_block": block, "kept_tokens": self.kept_tokens[s],
                         "images": self.images, "min_frequency": freq.min(), "max_frequency": freq.max(),
                         "always_kept": int((self.kept_count[s] == self.images).sum()),
                         "never_kept": int((self.kept_count[s] == 0).sum())})
        return pd.DataFrame(rows)


class KeepFrequencyTask(DatasetTask):
    """DynamicViT-family pruning over a dataset: per stage, how often each position is kept.

    ``forward`` is the family's pruned forward (``models.methods``); the sums are sized by one probe forward."""

    name = KEEP_FREQUENCY
    files = ("keep_frequency.npz", "keep_frequency.csv")

    def __init__(self, model: nn.Module, keep_ratio: float, model_name: str, note: str = "",
                 forward: Callable | None = None, input_size: tuple[int, int, int] = (3, 224, 224)) -> None:
        super().__init__(model_name, note)
        self.model, self.keep_ratio = model, keep_ratio
        self.forward = forward or dynamicvit_forward
        device = device_of(model)
        probe = self._trace(torch.zeros(1, *input_size, device=device))
        if len(set(probe.stage_grids)) != 1:
            raise ValueError(f"{model_name}: its pruning stages score grids of different sizes {probe.stage_grids}.")
        self.grid_size, self.stage_blocks = tuple(probe.stage_grids[0]), tuple(probe.stage_blocks)
        self.kept_tokens = tuple(probe.kept_counts)
        stages, cells = len(probe.stage_grids), self.grid_size[0] * self.grid_size[1]
        self.sums = {"images": zeros(device=device), "kept": zeros(stages, cells, device=device),
                     "keep_score": zeros(stages, cells, device=device),
                     "scored": zeros(stages, cells, device=device)}

    def _trace(self, images: torch.Tensor):
        with torch.inference_mode():
            _, trace = self.forward(self.model, images, keep_ratio=self.keep_ratio, return_trace=True)
        return as_stage_trace(trace, tuple(images.shape[-2:]))

    @classmethod
    def build(cls, subject: TaskModel, options: TaskOptions) -> "KeepFrequencyTask":
        pruner, forward, extra = _pruner_for(subject.model, subject.name)
        return cls(pruner, options.keep_ratio, subject.name, ", ".join(n for n in (subject.note, extra) if n),
                   forward, subject.input_size)

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        return {"keep_ratio": options.keep_ratio}

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        trace = self._trace(images)
        scores = torch.stack([m.flatten(1) for m in trace.score_maps()]).double()  # [stages, B, cells]
        add_sum(self.sums, "kept", torch.stack([m.flatten(1) for m in trace.keep_masks()]).double().sum(1))
        add_sum(self.sums, "keep_score", scores.nan_to_num(0.0).sum(1))
        add_sum(self.sums, "scored", (~scores.isnan()).double().sum(1))
        add_sum(self.sums, "images", images.shape[0])

    def result(self, sums: dict[str, torch.Tensor]) -> KeepFrequencyRecord:
        return KeepFrequencyRecord(
            self.model_name, self.note, self.keep_ratio, self.grid_size, self.stage_blocks, self.kept_tokens,
            int(sums["images"].item()), sums["kept"].cpu().numpy(), sums["keep_score"].cpu().numpy(),
            sums["scored"].cpu().numpy())

    @staticmethod
    def write(record: KeepFrequencyRecord, out: Path) -> list[str]:
        save_record(out / "keep_frequency.npz", record, frequency=record.kept_count / max(record.images, 1))
        record.summary().to_csv(out / "keep_frequency.csv", index=False)
        return list(KeepFrequencyTask.files)

    @staticmethod
    def load(folder: Path, run: dict) -> KeepFrequencyRecord:
        return load_record(folder / "keep_frequency.npz", KeepFrequencyRecord)

    @staticmethod
    def figures(record: KeepFrequencyRecord) -> dict[str, go.Figure]:
        label = model_label(record.model, record.note)
        return {f"stage {s + 1}": keep_frequency_figure(
                    record.frequency(s), f"{label}: how often each position survives stage {s + 1} "
                                         f"(before {b}, keep {record.kept_tokens[s]}), {record.images} images")
                for s, b in enumerate(record.stage_blocks)}


# ============================================================================= the pruned forward of a model

def _pruner_for(model: nn.Module, model_name: str) -> tuple[nn.Module, Callable, str]:
    """(model, its pruned forward, note): a DynamicViT-family model with its own forward from the method table,
    else a plain DeiT/ViT wrapped with untrained (seeded) predictors."""
    from timm.models.vision_transformer import VisionTransformer

    spec = get_spec(model_name)
    pruning = [m for m in methods_for(spec) if m.stage_pruning]
    if pruning:
        return model, pruning[0].forward_function(), ""
    attachable = [m for m in METHODS.values() if m.needs_attachment(spec) and m.stage_pruning]
    if attachable and isinstance(model, VisionTransformer):
        method = attachable[0]
        return method.with_untrained_parts(model, seed=0), method.forward_function(), "untrained score predictors"
    raise ValueError(f"keep-frequency needs a DynamicViT-family model or a DeiT/ViT backbone, not {model_name}.")
