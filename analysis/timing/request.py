"""One throughput-page run (models, settings, mode), timed in a fresh worker process.

A long-lived Streamlit server has run other models, pages and sessions before; what a process ran before moves
a CPU timing even with the allocator controlled (``analysis.timing.fresh_process``). So the page sends what it wants
timed to ``python -m analysis.timing.request --worker SPEC``: the worker loads the models (random weights:
timing does not depend on them), times them exactly as the CLI does, streams progress and every round to the
page's live chart, and sends the rows back. ``run_request`` is the same run in this process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from analysis.timing.engines import EAGER, engine_runners, engines, refuse_batches
from analysis.timing.fresh_process import report_measure, report_progress, report_result
from analysis.timing.harness import (
    BenchSettings,
    LatencyRow,
    ThroughputRow,
    benchmark,
    is_out_of_memory,
    latency,
    rows_to_records,
    sweep,
)
from analysis.timing.runners import ModelOptions, make_runner

THROUGHPUT, LATENCY, SWEEP = "throughput", "latency", "sweep"
Progress = Callable[[float, str], None]
Measure = Callable[[str, int, int, float], None]


class TimingRefused(ValueError):
    """The run could not be timed: a model that does not load, a bad variant, or out of memory (one sentence)."""

    def __init__(self, message: str, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


@dataclass(frozen=True)
class TimingRequest:
    variants: tuple[str, ...]
    settings: BenchSettings
    options: ModelOptions = ModelOptions()
    baseline: str | None = None
    mode: str = THROUGHPUT  # throughput | latency | sweep
    batches: tuple[int, ...] = ()  # the sweep's batch sizes
    engines: tuple[str, ...] = (EAGER.key,)  # keys of analysis.timing.engines.ENGINES, timed interleaved
    threads: int | None = None  # torch CPU threads in the timing process
    # (module name, file) of each module outside timm that registered a requested timm model in this process:
    # the worker imports them first, so a model registered at run time is known there too
    model_modules: tuple[tuple[str, str], ...] = ()

    def to_spec(self) -> dict:
        return {**asdict(self), "variants": list(self.variants), "batches": list(self.batches),
                "engines": list(self.engines), "model_modules": [list(m) for m in self.model_modules]}

    @classmethod
    def from_spec(cls, spec: dict) -> "TimingRequest":
        return cls(variants=tuple(spec["variants"]), settings=BenchSettings(**spec["settings"]),
                   options=ModelOptions(**spec["options"]), baseline=spec.get("baseline"),
                   mode=spec.get("mode", THROUGHPUT), batches=tuple(spec.get("batches", ())),
                   engines=tuple(spec.get("engines", (EAGER.key,))), threads=spec.get("threads"),
                   model_modules=tuple(tuple(m) for m in spec.get("model_modules", ())))


@dataclass
class TimingResult:
    rows: list[ThroughputRow | LatencyRow]
    notes: list[str] = field(default_factory=list)


def run_request(request: TimingRequest, progress: Progress | None = None,
                on_measure: Measure | None = None) -> TimingResult:
    """Load and time ``request`` in this process; a load or memory failure becomes ``TimingRefused``."""
    import torch

    from models.checkpoints import CheckpointError, WeightsNotFoundError

    if request.threads and request.settings.device == "cpu":
        torch.set_num_threads(int(request.threads))
    settings = request.settings
    try:
        runners, notes = _runners(request, progress)
    except (KeyError, ValueError, WeightsNotFoundError, CheckpointError) as exc:
        raise TimingRefused(str(exc.args[0] if exc.args else exc)) from exc
    baseline = _baseline(request, runners)
    try:
        if request.mode == LATENCY:
            return TimingResult(latency(runners, settings, baseline=baseline, progress=progress,
                                        on_measure=on_measure), notes)
        if request.mode == SWEEP:
            rows, more = sweep(runners, settings, list(request.batches), baseline=baseline,
                               progress=progress, on_measure=on_measure)
            return TimingResult(rows, notes + more)
        return TimingResult(benchmark(runners, settings, baseline=baseline, progress=progress,
                                      on_measure=on_measure), notes)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise TimingRefused(f"Out of memory at batch {settings.batch} on {settings.device}: choose a smaller "
                            f"batch, or a batch sweep (it backs off and keeps what it measured).",
                            out_of_memory=True) from exc


def _runners(request: TimingRequest, progress: Progress | None) -> tuple[list, list[str]]:
    """The eager runner of every variant under every engine asked for, and one sentence per (variant, engine)
    refused; ValueError (one sentence) when an engine cannot run the mode or no runner is left."""
    refusal = refuse_batches(request.engines, request.mode == SWEEP)
    if refusal:
        raise ValueError(refusal)
    eager = []
    for index, text in enumerate(request.variants):
        if progress:
            progress(0.0, f"loading {index + 1}/{len(request.variants)}: {text}")
        eager.append(make_runner(text, device=request.settings.device, random_weights=True, options=request.options))
    batch = 1 if request.mode == LATENCY else request.settings.batch
    runners, notes = engine_runners(request.engines, eager, batch, request.settings.device, progress)
    if not runners:
        raise ValueError(" ".join(notes))
    return runners, notes


def _baseline(request: TimingRequest, runners: Sequence) -> str | None:
    """The baseline's runner under the first engine that ran it (None when none did)."""
    if request.baseline is None:
        return None
    names = {r.name for r in runners}
    return next((e.tag(request.baseline) for e in engines(request.engines) if e.tag(request.baseline) in names), None)


def registering_modules(variants: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(name, file) of the modules outside timm whose ``@register_model`` made a requested model known here."""
    import sys

    import timm.models

    from models.variants import parse_variant

    found = {}
    for text in variants:
        try:
            module = timm.models.model_entrypoint(parse_variant(text).model).__module__
        except (KeyError, RuntimeError, ValueError):
            continue  # not a timm model (the registry's own, or unknown: the worker says so)
        file = getattr(sys.modules.get(module), "__file__", None)
        if not module.startswith("timm.") and file:
            found[module] = file
    return tuple(found.items())


def import_registering_modules(modules: Sequence[Sequence[str]]) -> None:
    """Worker side: import each (name, file) not imported yet, so that its models register with timm."""
    import importlib.util
    import sys

    for name, file in modules:
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def rows_from_records(records: Sequence[dict]) -> list[ThroughputRow | LatencyRow]:
    return [LatencyRow(**r) if "median_ms" in r else ThroughputRow(**r) for r in records]


def run_in_fresh_process(request: TimingRequest, progress: Progress | None = None,
                         on_measure: Measure | None = None) -> TimingResult:
    """``run_request`` in a new worker process (``python -m analysis.timing.request --worker``)."""
    from analysis.timing import fresh_process

    request = dataclasses.replace(request, model_modules=registering_modules(request.variants))
    answer = fresh_process.run_in_fresh_process("analysis.timing.request", request.to_spec(), progress=progress,
                                                on_measure=on_measure)
    if "refused" in answer:
        raise TimingRefused(answer["refused"], out_of_memory=answer.get("out_of_memory", False))
    return TimingResult(rows_from_records(answer["rows"]), answer["notes"])


def worker(spec: dict, progress: Progress = report_progress, on_measure: Measure = report_measure) -> dict:
    """The worker process's answer to ``spec``; progress and measurements go to the parent as lines (a caller in
    the same process, as the page tests are, passes its own callbacks)."""
    from analysis.timing.env import control_allocator

    control_allocator()  # before any model is built
    request = TimingRequest.from_spec(spec)
    import_registering_modules(request.model_modules)
    try:
        result = run_request(request, progress, on_measure)
    except TimingRefused as exc:
        return {"refused": str(exc), "out_of_memory": exc.out_of_memory}
    return {"rows": rows_to_records(result.rows), "notes": result.notes}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.timing.request", description=__doc__.splitlines()[0])
    p.add_argument("--worker", metavar="SPEC", required=True, help="the request as JSON (the page writes it)")
    args = p.parse_args(argv)
    report_result(worker(json.loads(args.worker)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
