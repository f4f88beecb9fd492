"""The dataset tasks of ``python -m analysis.run``, as one table: accumulators of running sums, plus their records,
files and figures.

A task holds only float64 *sums* (never per-image results), so that the sums of several processes add up
with one all_reduce to exactly what one process would have summed, and so that a shard's progress can be
saved and resumed. ``build(subject, options)`` makes the task for a model, ``result(sums)`` turns (reduced) sums
into the record type the pages use; ``write`` saves that record as NPZ/CSV, ``load`` reads it back, ``figures``
draws it with the pages' own builders. One module per task kind (``analysis.runs.keep_frequency``, ``tome_merge``,
``head_similarity``, ``taylor``, ``frontier``); what they share is ``analysis.runs.common``.
"""
from __future__ import annotations

from torch import nn

from analysis.runs.common import DatasetTask, TaskModel, TaskOptions
from analysis.runs.frontier import FRONTIER, FrontierTask
from analysis.runs.head_similarity import HEAD_SIMILARITY, HeadSimilarityTask
from analysis.runs.keep_frequency import (
    KEEP_FREQUENCY,
    KeepFrequencyRecord,
    KeepFrequencyTask,
)
from analysis.runs.taylor import TAYLOR, TaylorTask
from analysis.runs.tome_merge import (
    TOME_MERGE,
    ToMeMergeRecord,
    ToMeMergeTask,
    group_size_figure,
    merged_frequency_figure,
)

__all__ = ["FRONTIER", "HEAD_SIMILARITY", "KEEP_FREQUENCY", "TASKS", "TAYLOR", "TOME_MERGE", "DatasetTask",
           "FrontierTask", "HeadSimilarityTask", "KeepFrequencyRecord", "KeepFrequencyTask", "TaskModel",
           "TaskOptions", "TaylorTask", "ToMeMergeRecord", "ToMeMergeTask", "build_task", "group_size_figure",
           "merged_frequency_figure"]

TASKS: dict[str, type[DatasetTask]] = {t.name: t for t in (KeepFrequencyTask, ToMeMergeTask, HeadSimilarityTask,
                                                           TaylorTask, FrontierTask)}


def build_task(name: str, model: nn.Module, model_name: str, options: TaskOptions,
               input_size: tuple[int, int, int] = (3, 224, 224), random_weights: bool = False) -> DatasetTask:
    """The accumulator for task ``name`` on ``model`` (which is only read; Taylor works on a private copy)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name].build(TaskModel(model, model_name, input_size, random_weights), options)
