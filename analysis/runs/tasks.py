"""The four dataset-scale analyses as accumulators of running sums, plus their records, files and figures.

A task holds only float64 *sums* (never per-image results), so that the sums of several processes add up
with one all_reduce to exactly what one process would have summed, and so that a shard's progress can be
saved and resumed. ``result(sums)`` turns (reduced) sums into the record type the pages use; ``write``
saves that record as NPZ/CSV, ``load`` reads it back, ``figures`` draws it with the pages' own builders.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, get_args, get_origin, get_type_hints

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
from analysis.head_redundancy import (
    BlockRedundancy,
    HeadSimilaritySums,
    RedundancyResult,
    redundancy_vs_depth,
    similarity_dataframe,
    similarity_heatmaps,
    to_dataframe,
)
from analysis.token_reduction import keep_frequency_figure
from models.attention_recording import record_attention
from models.dynamic_zoo import as_stage_trace
from models.dynamicvit import dynamicvit_forward
from models.methods import METHODS, methods_for
from models.registry import get_spec
from models.tome import check_supported, merge_schedule, tome_forward
from models.vit_forward import token_count

KEEP_FREQUENCY, TOME_MERGE, HEAD_SIMILARITY, TAYLOR = "keep-frequency", "tome-merge", "head-similarity", "taylor"


@dataclass(frozen=True)
class TaskOptions:
    """Every setting a task may use; each task records only the ones it depends on."""

    keep_ratio: float = 0.7
    r: str = "13"
    proportional_attention: bool = True
    loss_target: str = "self"
    # frontier: "unreduced", "tome=8", "evit=0.7,fuse=off", "rho=0.7[:untrained]"; () = defaults
    frontier_settings: tuple[str, ...] = ()


def _zeros(*shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64, device=device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class DatasetTask(ABC):
    """Running sums over batches of images; subclasses size them from the model so every rank agrees."""

    name: ClassVar[str]

    def __init__(self, model_name: str, note: str = "") -> None:
        self.model_name = model_name
        self.note = note  # e.g. "random weights": shown in every figure title and in run.json
        self.sums: dict[str, torch.Tensor] = {}

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        """The options this task's result depends on (stored in the resume state and run.json)."""
        return {}

    @abstractmethod
    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of preprocessed images (on the model's device) to the sums."""

    @abstractmethod
    def result(self, sums: dict[str, torch.Tensor]) -> Any:
        """The record computed from (all-reduced) sums."""

    def load_sums(self, saved: dict[str, torch.Tensor]) -> None:
        """Continue from saved sums; they must have this task's names and shapes."""
        if set(saved) != set(self.sums) or any(saved[k].shape != self.sums[k].shape for k in saved):
            raise ValueError("The saved sums do not fit this task and model (different model or settings).")
        for k, current in self.sums.items():  # in place: a task's accumulator holds this same dict
            current.copy_(saved[k])

    def title(self, text: str) -> str:
        return f"{text} ({self.note})" if self.note else text


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor | float) -> None:
    """sums[name] += value, same shape required (no silent broadcasting into a whole table)."""
    value = torch.as_tensor(value, dtype=torch.float64).to(sums[name].device)
    if value.shape != sums[name].shape:
        raise ValueError(f"{name}: adding shape {tuple(value.shape)} to a sum of shape {tuple(sums[name].shape)}.")
    sums[name] += value


def _save_record(path: Path, record, **extra: Any) -> None:
    """A flat record dataclass as NPZ: each field under its name (tuples as arrays), plus ``extra`` arrays."""
    values = {f.name: getattr(record, f.name) for f in fields(record)}
    np.savez(path, **{name: np.array(v) if isinstance(v, tuple) else v for name, v in values.items()}, **extra)


def _read_value(value: np.ndarray, kind):
    """One NPZ entry as the type its record field declares (str, int, float, tuple of those, or ndarray)."""
    if kind in (str, int, float, bool):
        return kind(value)
    if get_origin(kind) is tuple:
        element = get_args(kind)[0]
        return tuple(element(v) for v in value)
    return value


def _load_record(path: Path, record_type):
    """The record ``_save_record`` wrote (extra arrays are ignored)."""
    hints = get_type_hints(record_type)
    with np.load(path, allow_pickle=False) as z:
        return record_type(**{f.name: _read_value(z[f.name], hints[f.name]) for f in fields(record_type)})


def _label(model: str, note: str) -> str:
    return f"{model} ({note})" if note else model


# ============================================================================= DynamicViT keep frequency

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
        device = _device_of(model)
        probe = self._trace(torch.zeros(1, *input_size, device=device))
        if len(set(probe.stage_grids)) != 1:
            raise ValueError(f"{model_name}: its pruning stages score grids of different sizes {probe.stage_grids}.")
        self.grid_size, self.stage_blocks = tuple(probe.stage_grids[0]), tuple(probe.stage_blocks)
        self.kept_tokens = tuple(probe.kept_counts)
        stages, cells = len(probe.stage_grids), self.grid_size[0] * self.grid_size[1]
        self.sums = {"images": _zeros(device=device), "kept": _zeros(stages, cells, device=device),
                     "keep_score": _zeros(stages, cells, device=device),
                     "scored": _zeros(stages, cells, device=device)}

    def _trace(self, images: torch.Tensor):
        with torch.inference_mode():
            _, trace = self.forward(self.model, images, keep_ratio=self.keep_ratio, return_trace=True)
        return as_stage_trace(trace, tuple(images.shape[-2:]))

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        return {"keep_ratio": options.keep_ratio}

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        trace = self._trace(images)
        scores = torch.stack([m.flatten(1) for m in trace.score_maps()]).double()  # [stages, B, cells]
        _add(self.sums, "kept", torch.stack([m.flatten(1) for m in trace.keep_masks()]).double().sum(1))
        _add(self.sums, "keep_score", scores.nan_to_num(0.0).sum(1))
        _add(self.sums, "scored", (~scores.isnan()).double().sum(1))
        _add(self.sums, "images", images.shape[0])

    def result(self, sums: dict[str, torch.Tensor]) -> KeepFrequencyRecord:
        return KeepFrequencyRecord(
            self.model_name, self.note, self.keep_ratio, self.grid_size, self.stage_blocks, self.kept_tokens,
            int(sums["images"].item()), sums["kept"].cpu().numpy(), sums["keep_score"].cpu().numpy(),
            sums["scored"].cpu().numpy())

    @staticmethod
    def write(record: KeepFrequencyRecord, out: Path) -> list[str]:
        _save_record(out / "keep_frequency.npz", record, frequency=record.kept_count / max(record.images, 1))
        record.summary().to_csv(out / "keep_frequency.csv", index=False)
        return list(KeepFrequencyTask.files)

    @staticmethod
    def load(folder: Path, run: dict) -> KeepFrequencyRecord:
        return _load_record(folder / "keep_frequency.npz", KeepFrequencyRecord)

    @staticmethod
    def figures(record: KeepFrequencyRecord) -> dict[str, go.Figure]:
        label = _label(record.model, record.note)
        return {f"stage {s + 1}": keep_frequency_figure(
                    record.frequency(s), f"{label}: how often each position survives stage {s + 1} "
                                         f"(before {b}, keep {record.kept_tokens[s]}), {record.images} images")
                for s, b in enumerate(record.stage_blocks)}


# ============================================================================= ToMe merge statistics

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
        device = _device_of(model)
        self.sums = {"images": _zeros(device=device), "size_hist": _zeros(depth, patches + 1, device=device),
                     "merged": _zeros(depth, patches, device=device),
                     "group_size": _zeros(depth, patches, device=device)}

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
        _add(self.sums, "size_hist", torch.stack(histograms))  # [layers, patches + 1]
        _add(self.sums, "merged", torch.stack(merged))
        _add(self.sums, "group_size", torch.stack(group_sizes))
        _add(self.sums, "images", images.shape[0])

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
        _save_record(out / "tome_merge.npz", record)
        record.summary().to_csv(out / "tome_merge.csv", index=False)
        return list(ToMeMergeTask.files)

    @staticmethod
    def load(folder: Path, run: dict) -> ToMeMergeRecord:
        return _load_record(folder / "tome_merge.npz", ToMeMergeRecord)

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
    figure.update_layout(title=f"{_label(record.model, record.note)}: how often each patch is in a merged token "
                               f"after block {index} (r = {record.r}), {record.images} images", height=380)
    return figure


def group_size_figure(record: ToMeMergeRecord) -> go.Figure:
    """Per layer: mean token size (token-weighted) and mean size of a patch's group (patch-weighted)."""
    layers = list(range(len(record.schedule)))
    figure = go.Figure([
        go.Scatter(x=layers, y=record.mean_token_size(), name="patches per token", mode="lines+markers"),
        go.Scatter(x=layers, y=record.mean_group_size(), name="size of a patch's group", mode="lines+markers"),
    ])
    figure.update_layout(title=f"{_label(record.model, record.note)}: ToMe group sizes by depth (r = {record.r}, "
                               f"{record.images} images)", xaxis_title="block", yaxis_title="patches",
                         hovermode="x unified")
    return figure


# ============================================================================= head similarity

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
        device = _device_of(model)
        _, layout = record_attention(model, torch.zeros(1, *input_size, device=device))
        self.accumulator = HeadSimilaritySums(layout, device)
        self.sums = self.accumulator.sums

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


# ============================================================================= Taylor importance

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


TASKS: dict[str, type[DatasetTask]] = {t.name: t for t in (KeepFrequencyTask, ToMeMergeTask, HeadSimilarityTask,
                                                           TaylorTask)}


# ============================================================================= building a task for a model

def _pruner_for(model: nn.Module, model_name: str) -> tuple[nn.Module, Callable, str]:
    """(model, its pruned forward, note): a DynamicViT-family model with its own forward from the method table,
    else a plain DeiT/ViT wrapped with untrained (seeded) predictors."""
    from timm.models.vision_transformer import VisionTransformer


    spec = get_spec(model_name)
    pruning = [m for m in methods_for(spec) if m.main_setting.key == "rho"]
    if pruning:
        return model, pruning[0].forward_function(), ""
    attachable = [m for m in METHODS.values() if m.needs_attachment(spec) and m.main_setting.key == "rho"]
    if attachable and isinstance(model, VisionTransformer):
        method = attachable[0]
        return method.with_untrained_parts(model, seed=0), method.forward_function(), "untrained score predictors"
    raise ValueError(f"keep-frequency needs a DynamicViT-family model or a DeiT/ViT backbone, not {model_name}.")


def _check_tome_supported(model: nn.Module) -> None:
    """ToMe's own model check, as a ValueError (bad input) rather than a TypeError."""
    try:
        check_supported(model)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


def build_task(name: str, model: nn.Module, model_name: str, options: TaskOptions,
               input_size: tuple[int, int, int] = (3, 224, 224), random_weights: bool = False) -> DatasetTask:
    """The accumulator for task ``name`` on ``model`` (which is only read; Taylor works on a private copy)."""
    note = "random weights" if random_weights else ""
    if name == KEEP_FREQUENCY:
        pruner, forward, extra = _pruner_for(model, model_name)
        return KeepFrequencyTask(pruner, options.keep_ratio, model_name, ", ".join(n for n in (note, extra) if n),
                                 forward, input_size)
    if name == TOME_MERGE:
        _check_tome_supported(model)
        return ToMeMergeTask(model, options.r, options.proportional_attention, model_name, note)
    if name == HEAD_SIMILARITY:
        return HeadSimilarityTask(model, input_size, model_name, random_weights, note)
    if name == TAYLOR:
        return TaylorTask(model, options.loss_target, model_name, note)
    raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
