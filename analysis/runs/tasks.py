"""The dataset tasks of ``python -m analysis.run``, as one table: accumulators of running sums, plus their records,
files and figures.

A task holds only float64 *sums* (never per-image results), so that the sums of several processes add up
with one all_reduce to exactly what one process would have summed, and so that a shard's progress can be
saved and resumed. ``build(subject, options)`` makes the task for a model, ``result(sums)`` turns (reduced) sums
into the record type the pages use; ``write`` saves that record as NPZ/CSV, ``load`` reads it back, ``figures``
draws it with the pages' own builders. One module per task kind (``analysis.runs.keep_frequency``, ``tome_merge``,
``head_similarity``, ``taylor``, ``frontier``, ``vqa_frontier``); what they share is ``analysis.runs.common``.
"""
from __future__ import annotations

from analysis.runs.common import DatasetTask
from analysis.runs.frontier import FrontierTask
from analysis.runs.head_similarity import HeadSimilarityTask
from analysis.runs.keep_frequency import KeepFrequencyTask
from analysis.runs.taylor import TaylorTask
from analysis.runs.tome_merge import ToMeMergeTask
from analysis.runs.vqa_frontier import VQAFrontierTask

TASKS: dict[str, type[DatasetTask]] = {t.name: t for t in (KeepFrequencyTask, ToMeMergeTask, HeadSimilarityTask,
                                                           TaylorTask, FrontierTask, VQAFrontierTask)}
