"""What every dataset task shares: the options, the model a task runs on, the task base class (running sums
that add up across processes) and the helpers that size, add to, save and read back those sums and records."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

import numpy as np
import torch
from torch import nn

from analysis.data.folders import Batch, FolderImages
from models.loading import LoadedModel, load_model


@dataclass(frozen=True)
class TaskOptions:
    """Every setting a task may use; each task records only the ones it depends on."""

    keep_ratio: float = 0.7
    r: str = "13"
    proportional_attention: bool = True
    loss_target: str = "self"
    # frontier: "unreduced", "tome=8", "evit=0.7,fuse=off", "rho=0.7[:untrained]"; () = defaults
    frontier_settings: tuple[str, ...] = ()
    # vqa-frontier: variant names ("NAME@pumer", "pumer,prune=0" for the run's model); () = the method table's
    variants: tuple[str, ...] = ()
    timing: bool = True  # vqa-frontier: time every variant after scoring it (interleaved, at the run's batch)
    timing_iters: int = 3
    timing_rounds: int = 3
    batch: int = 8
    device: str = "cpu"


@dataclass(frozen=True)
class RunSource:
    """Where a run's model and data come from: the command line's choices, as a task's ``open`` reads them."""

    model: str
    data: str
    device: str = "cpu"
    random_weights: bool = False
    weights: str | None = None  # a checkpoint file
    weights_folder: str | None = None
    limit: int | None = None
    labels: str = "self"
    questions: str | None = None  # vqa-frontier: the questions file (JSON Lines)


@dataclass
class OpenedRun:
    """A task ready to stream its data: the task, the dataset (``len``, ``root``, ``path(i)``, ``table()``,
    ``collate(samples)``), and the model's weights and size in words for run.json."""

    task: "DatasetTask"
    dataset: Any
    weights: str
    random_weights: bool
    parameters: int


@dataclass(frozen=True)
class TaskModel:
    """The model a task runs on: the module (only read), its name, the input size it takes and its weights."""

    model: nn.Module
    name: str
    input_size: tuple[int, int, int] = (3, 224, 224)
    random_weights: bool = False
    weights: str = ""  # the weights source in words (run.json, frontier rows); empty: the note

    @property
    def note(self) -> str:
        """Shown in every figure title and in run.json."""
        return "random weights" if self.random_weights else ""

    @classmethod
    def of(cls, loaded: LoadedModel) -> "TaskModel":
        return cls(loaded.model, loaded.name, tuple(loaded.data_config["input_size"]), loaded.weights.is_random,
                   loaded.weights.description)


def zeros(*shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64, device=device)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class DatasetTask(ABC):
    """Running sums over batches of images; subclasses size them from the model so every rank agrees."""

    name: ClassVar[str]

    def __init__(self, model_name: str, note: str = "") -> None:
        self.model_name = model_name
        self.note = note  # e.g. "random weights": shown in every figure title and in run.json
        self.sums: dict[str, torch.Tensor] = {}

    @classmethod
    @abstractmethod
    def build(cls, subject: TaskModel, options: TaskOptions) -> "DatasetTask":
        """This task on ``subject`` with the options it depends on (the task table builds every task so)."""

    @classmethod
    def open(cls, source: RunSource, options: TaskOptions) -> OpenedRun:
        """Load the model and the data and build the task (an image folder through the model's transform)."""
        loaded = load_model(source.model, device=source.device, user_file=source.weights,
                            random_weights=source.random_weights, weights_folder=source.weights_folder)
        dataset = FolderImages.from_folder(source.data, loaded.transform, source.limit, source.labels)
        return OpenedRun(cls.build(TaskModel.of(loaded), options), dataset, loaded.weights.description,
                         loaded.weights.is_random, loaded.num_params)

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        """The options this task's result depends on (stored in the resume state and run.json)."""
        return {}

    @abstractmethod
    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of preprocessed images (on the model's device) to the sums."""

    def update_batch(self, batch: Batch, device: torch.device) -> None:
        """Add one loader batch (the dataset's ``collate`` output, some samples readable) to the sums."""
        self.update(batch.images.to(device, non_blocking=True), batch.labels)

    def complete(self, record: Any, options: TaskOptions) -> Any:
        """The record as written, after the last all-reduce on the main process (vqa-frontier times its variants
        here); by default the record itself."""
        return record

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


def add_sum(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor | float) -> None:
    """sums[name] += value, same shape required (no silent broadcasting into a whole table)."""
    value = torch.as_tensor(value, dtype=torch.float64).to(sums[name].device)
    if value.shape != sums[name].shape:
        raise ValueError(f"{name}: adding shape {tuple(value.shape)} to a sum of shape {tuple(sums[name].shape)}.")
    sums[name] += value


def save_record(path: Path, record, **extra: Any) -> None:
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


def load_record(path: Path, record_type):
    """The record ``save_record`` wrote (extra arrays are ignored)."""
    hints = get_type_hints(record_type)
    with np.load(path, allow_pickle=False) as z:
        return record_type(**{f.name: _read_value(z[f.name], hints[f.name]) for f in fields(record_type)})


def model_label(model: str, note: str) -> str:
    return f"{model} ({note})" if note else model
