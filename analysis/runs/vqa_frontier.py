"""The vision-language accuracy-throughput frontier: every variant of a VQA model (ViLT, METER) scored on the user's
own questions and images, and timed on this machine.

Variants are names of the method table (``NAME@key=value``): the unreduced model, each method that applies to the
model at its paper setting (``NAME@pumer``) and at the picks of its main setting, and the paper's ablations the
table lists (pruning only, merging only, other reduce layers, larger ratios); any other variant name can be given.
Accuracy: VQAv2's (``analysis.vision_language.vqa_accuracy``) against the annotators' answers, or, for a
questions file without answers, agreement of the top answer with the unreduced model's (not accuracy). Every
point carries a 95 % percentile-bootstrap interval over the questions, and every variant its drop from the
unreduced model with a paired bootstrap interval (the same resampled questions for both).

One pass over the questions: each batch runs every variant, a variant at another input size (``size=``) on the
model and the images at that size (``analysis.runs.vqa_sizes``). The task keeps, per variant and question, the answer's
index and its score as float64 sums (each question is filled by the one process that saw it), so the sums of
several processes add up exactly under torchrun and a stopped run resumes.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.data.folders import DatasetError
from analysis.data.questions import Question, QuestionImages
from analysis.runs.common import DatasetTask, OpenedRun, RunSource, TaskModel, TaskOptions, add_sum, zeros
from analysis.runs.vqa_points import (ACCURACY, AGREEMENT, UNREDUCED, VQAVariant, answers_frame, default_variants,
                                      points_frame, to_json, variant_of, vqa_frontier_figure)
from analysis.runs.vqa_sizes import ModelsAtSizes, variant_forward  # noqa: F401 - variant_forward: importable here
from analysis.timing.harness import BenchSettings, Runner, benchmark
from analysis.vision_language.models import pumer_models
from analysis.vision_language.vqa_accuracy import ScoredQuestion

VQA_FRONTIER = "vqa-frontier"
POINTS_CSV, POINTS_JSON, ANSWERS_CSV = "vqa_frontier.csv", "vqa_frontier.json", "vqa_answers.csv"


def _plain(value: Any) -> Any:
    """numpy scalars as JSON writes them."""
    return value.item() if hasattr(value, "item") else str(value)


# ----------------------------------------------------------------------------- the record

@dataclass
class VQAFrontierRecord:
    """Per variant and question: the predicted answer and its VQA accuracy (questions with answers only)."""

    model: str
    weights: str
    variants: list[VQAVariant]
    questions: list[Question]
    seen: np.ndarray  # [questions] bool: scored (readable image, processed)
    predicted: list[list[str]]  # [variants][questions] the top answer ('' where not seen)
    scores: np.ndarray  # [variants, questions] VQA accuracy (0 where the question has no answers)
    speed: pd.DataFrame | None = None  # per variant: img/s and the rest (``measure_speed``); None: not timed

    @property
    def labelled(self) -> np.ndarray:
        return self.seen & np.array([bool(q.answers) for q in self.questions], dtype=bool)

    @property
    def metric(self) -> str:
        return ACCURACY if self.labelled.any() else AGREEMENT

    def per_question(self) -> np.ndarray:
        """[variants, scored questions]: VQA accuracy on the labelled questions, else agreement (0/1)."""
        if self.labelled.any():
            return self.scores[:, self.labelled]
        reference = np.array(self.predicted[0], dtype=object)
        return np.stack([(np.array(p, dtype=object) == reference)[self.seen] for p in self.predicted]).astype(float)

    def to_frame(self) -> pd.DataFrame:
        return points_frame(self)

    def answers(self) -> pd.DataFrame:
        return answers_frame(self)


# ----------------------------------------------------------------------------- the accumulator

class VQAFrontierTask(DatasetTask):
    """Every variant of one VQA model on each batch of questions: answers and VQA accuracy per question."""

    name = VQA_FRONTIER
    files = (POINTS_CSV, POINTS_JSON, ANSWERS_CSV)

    def __init__(self, models: ModelsAtSizes, model_name: str, variants: Sequence[VQAVariant],
                 questions: Sequence[Question], note: str = "", weights: str = "",
                 timing_inputs: Callable[[int, int | None], dict] | None = None) -> None:
        super().__init__(model_name, note)
        self.models, self.weights = models, weights or note
        model = models.reference
        self.variants = list(variants)
        if not self.variants or self.variants[0].method != UNREDUCED:
            raise ValueError("The unreduced model must be the first variant (agreement and drops refer to it).")
        self.questions = list(questions)
        self.scored = [ScoredQuestion(q.answers) if q.answers else None for q in self.questions]
        self.labels = model.config.id2label
        self.forwards = [models.bind(v, model_name) for v in self.variants]
        self.timing_inputs = timing_inputs
        device = next(model.parameters()).device
        n, v = len(self.questions), len(self.variants)
        self.sums = {"images": zeros(device=device), "seen": zeros(n, device=device),
                     "answer": zeros(v, n, device=device), "score": zeros(v, n, device=device)}

    @staticmethod
    def settings(options: TaskOptions) -> dict[str, Any]:
        return {"variants": list(options.variants)}

    @classmethod
    def build(cls, subject: TaskModel, options: TaskOptions) -> "VQAFrontierTask":
        raise ValueError(f"{VQA_FRONTIER} runs on a questions file: open it with --images FOLDER --questions FILE.")

    @classmethod
    def open(cls, source: RunSource, options: TaskOptions) -> OpenedRun:
        """The model and its processor (the small random model with --random-weights), the questions and images."""
        entry = next((e for e in pumer_models() if e.name == source.model), None)
        if entry is None:
            names = ", ".join(e.name for e in pumer_models())
            raise DatasetError(f"{VQA_FRONTIER} answers questions with a VQA model ({names}), not {source.model}.")
        if not source.questions:
            raise DatasetError(f"{VQA_FRONTIER} needs --questions FILE.jsonl (image, question, answers a line).")
        variants = with_unreduced(source.model, [variant_of(source.model, t) for t in options.variants]
                                  or default_variants(source.model))
        names: dict[int | None, tuple[str, str]] = {}

        def load(size: int | None):
            model, processor, *names[size] = entry.load(source.random_weights, source.weights_folder,
                                                        source.weights, image_size=size)
            return model, processor

        models = ModelsAtSizes.load(variants, load, source.device,
                                    None if source.random_weights else entry.spec.input_size)
        dataset = models.questions(QuestionImages.from_files(source.data, source.questions, models.processors[None],
                                                             source.limit))
        name, weights = names[None]
        task = cls(models, source.model, variants, dataset.questions,
                   "random weights" if source.random_weights else "", f"{name}: {weights}",
                   timing_inputs=question_inputs(dataset, source.device))
        return OpenedRun(task, dataset, f"{name}: {weights}", source.random_weights,
                         sum(p.numel() for p in models.reference.parameters()))

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        raise TypeError(f"{VQA_FRONTIER} takes batches of questions (update_batch), not images alone.")

    def update_batch(self, batch, device: torch.device) -> None:
        if not len(batch.indices):
            return
        inputs = {size: {k: v.to(device) for k, v in sized.items()} for size, sized in batch.images.items()}
        indices = batch.indices.tolist()
        answer = torch.zeros(len(self.variants), len(indices), dtype=torch.float64)
        score = torch.zeros_like(answer)
        with torch.inference_mode():
            for v, forward in enumerate(self.forwards):
                for j, a in enumerate(forward(inputs).argmax(-1).tolist()):
                    answer[v, j] = a
                    scored = self.scored[indices[j]]
                    score[v, j] = scored.score(str(self.labels.get(a, a))) if scored is not None else 0.0
        # Only these questions' columns change (each question is seen by one process, once): sums stay exact.
        columns = batch.indices.to(self.sums["answer"].device)
        self.sums["answer"][:, columns] += answer.to(self.sums["answer"].device)
        self.sums["score"][:, columns] += score.to(self.sums["score"].device)
        self.sums["seen"][columns] += 1.0
        add_sum(self.sums, "images", len(indices))

    def result(self, sums: dict[str, torch.Tensor]) -> VQAFrontierRecord:
        seen = sums["seen"].cpu().numpy() > 0
        answers = sums["answer"].cpu().numpy().astype(int)
        predicted = [[str(self.labels.get(int(a), a)) if s else "" for a, s in zip(row, seen)] for row in answers]
        return VQAFrontierRecord(self.model_name, self.weights, self.variants, self.questions, seen, predicted,
                                 sums["score"].cpu().numpy())

    def complete(self, record: VQAFrontierRecord, options: TaskOptions) -> VQAFrontierRecord:
        if options.timing and self.timing_inputs is not None:
            bench = BenchSettings(batch=options.batch, iters=options.timing_iters, rounds=options.timing_rounds,
                                  warmup=1, device=options.device)
            record.speed = measure_speed(self.models, self.model_name, self.variants, self.timing_inputs, bench)
        return record

    @staticmethod
    def write(record: VQAFrontierRecord, out: Path) -> list[str]:
        points = record.to_frame()
        points.to_csv(out / POINTS_CSV, index=False)
        meta = {"model": record.model, "weights": record.weights, "metric": record.metric}
        (out / POINTS_JSON).write_text(json.dumps(to_json(points, meta), indent=1, default=_plain) + "\n")
        record.answers().to_csv(out / ANSWERS_CSV, index=False)
        return list(VQAFrontierTask.files)

    @staticmethod
    def load(folder: Path, run: dict) -> pd.DataFrame:
        return pd.read_csv(folder / POINTS_CSV)

    @staticmethod
    def figures(frame: pd.DataFrame) -> dict:
        return {"vqa_frontier": vqa_frontier_figure(frame)}


def with_unreduced(model_name: str, variants: Sequence[VQAVariant]) -> list[VQAVariant]:
    """The unreduced model first, then the other variants once each (in their order)."""
    unreduced = variant_of(model_name, UNREDUCED)
    rest = [v for v in dict.fromkeys(variants) if v.method != UNREDUCED]
    return [unreduced, *rest]


def question_inputs(dataset: QuestionImages, device: str | torch.device) -> Callable[[int, int | None], dict]:
    """A batch of ``b`` real questions at input ``size`` (None: the default) for timing: the first readable ones,
    repeated to fill the batch."""
    def make(batch: int, size: int | None = None) -> dict:
        samples = [s for s in (dataset[i] for i in range(min(len(dataset), batch * 2))) if s[2]][:batch]
        if not samples:
            raise DatasetError("No readable image among the first questions: nothing to time.")
        samples = (samples * batch)[:batch]
        return {k: v.to(device) for k, v in dataset.inputs(samples, size).items()}
    return make


# ----------------------------------------------------------------------------- throughput

def measure_speed(models: ModelsAtSizes, model_name: str, variants: Sequence[VQAVariant],
                  make_inputs: Callable[[int, int | None], dict], bench: BenchSettings,
                  progress: Callable[[float, str], None] | None = None) -> pd.DataFrame:
    """Questions per second of every variant on the same batch of real questions (each variant's model and images
    at its input size), in interleaved rounds (the harness of ``analysis.timing``), its speed-up over the unreduced
    model, GFLOPs and the peak memory of one forward (CPU or CUDA); the timing environment as ``env_*`` columns."""
    runners = []
    for sized in (models.bind(v, model_name) for v in variants):
        runners.append(Runner(sized.variant.name, sized.forward, functools.partial(make_inputs, size=sized.size),
                              sum(p.numel() for p in sized.model.parameters())))
    started, load = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0]
    # Peak memory of one forward per variant, after the timed rounds, on CPU and CUDA alike (the harness's
    # forward_peak_bytes: net of the weights and inputs); its reduction against the unreduced model.
    rows = benchmark(runners, dataclasses.replace(bench, peak_memory=True), baseline=variants[0].name,
                     progress=progress)
    return pd.DataFrame({
        "variant": [v.name for v in variants], "img_per_s": [r.img_per_s for r in rows],
        "img_per_s_q1": [r.img_per_s_q1 for r in rows], "img_per_s_q3": [r.img_per_s_q3 for r in rows],
        "speedup": [r.speedup for r in rows], "speedup_q1": [r.speedup_q1 for r in rows],
        "speedup_q3": [r.speedup_q3 for r in rows], "ms_per_batch": [r.ms_per_batch for r in rows],
        "gflops": [r.gflops for r in rows], "peak_mem_mib": [r.forward_peak_mib for r in rows],
        "memory_saving": [r.memory_reduction for r in rows],
        "batch": bench.batch, "device": bench.device, "timing_rounds": bench.rounds, "timing_iters": bench.iters,
        "measured_at": started.isoformat(timespec="seconds"), "load_1min_before": round(load, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        **{f"env_{k}": v for k, v in rows[0].environment.items()}})


# ----------------------------------------------------------------------------- in the app

def evaluate(models: ModelsAtSizes, model_name: str, dataset: QuestionImages, variants: Sequence[VQAVariant],
             batch_size: int, note: str = "", weights: str = "",
             progress: Callable[[float, str], None] | None = None) -> VQAFrontierRecord:
    """The in-app run of ``VQAFrontierTask`` over ``dataset`` (one process; its images processed at every size of
    ``models``), without timing."""
    from torch.utils.data import DataLoader

    task = VQAFrontierTask(models, model_name, with_unreduced(model_name, variants), dataset.questions, note, weights)
    dataset = models.questions(dataset)
    device = next(models.reference.parameters()).device
    loader: Iterable = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)
    total = len(loader)
    for done, batch in enumerate(loader, start=1):
        task.update_batch(batch, device)
        if progress:
            progress(done / total, f"{model_name}: batch {done}/{total} of questions, {len(task.variants)} variants")
    return task.result(task.sums)
