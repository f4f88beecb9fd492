"""The timing harness: warm-up, timed iterations with device sync, interleaved rounds, rows.

A speed-up is the ratio of two runners' throughputs measured in interleaved rounds in the same process, so
that drift in clock speed or background load hits both alike. img/s is the median round and the speed-up the
ratio of those medians, so the two agree by construction; each comes with its interquartile range over the
rounds (the speed-up's over the per-round ratios), and ``spread_warnings`` says in words when a spread is too
large to trust a ratio. Every timing runs with the memory allocator in one fixed state
(``analysis.timing.env.control_allocator``) and every row carries the environment it was measured in.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from analysis.timing.env import control_allocator, timing_environment, warm_until_steady
from analysis.timing.flops import measure_flops
from analysis.timing.memory import batches_that_fit, forward_peak_bytes, largest_batch_that_fits, memory_reduction
from models.device import autocast, synchronize

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Runner:
    """One thing to time: a forward over ready-made inputs of a given batch size."""
    name: str
    forward: Callable[[Any], Any]
    make_inputs: Callable[[int], Any]  # batch size -> inputs already on the device
    params: int = 0
    weights: str = ""
    flops_per_image: float | None = None  # filled by count_flops
    engine: str = "eager"  # a key of analysis.timing.engines.ENGINES
    warmup_note: str = ""  # what its first calls do ("compiling"), shown while it warms up
    reference: "Runner | None" = None  # the eager runner an engine runner wraps (same model, variant and inputs)


@dataclass
class BenchSettings:
    batch: int = 16
    iters: int = 10  # timed iterations per round
    rounds: int = 3  # interleaved rounds; the median round counts
    warmup: int = 3
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; GPU only)
    peak_memory: bool = False  # also measure one forward's peak memory, after the rounds (forward_peak_bytes)


@dataclass
class ThroughputRow:
    model: str
    batch: int
    device: str
    precision: str
    img_per_s: float
    ms_per_batch: float
    params_m: float
    gflops: float | None
    peak_mem_mib: float | None
    weights: str
    rounds: list[float] = field(default_factory=list)  # img/s of each interleaved round
    speedup: float | None = None  # img_per_s / the baseline's img_per_s (both the median round)
    baseline: str | None = None
    note: str = ""
    img_per_s_q1: float | None = None  # interquartile range of the rounds' img/s
    img_per_s_q3: float | None = None
    speedup_q1: float | None = None  # interquartile range of the per-round ratios to the baseline
    speedup_q3: float | None = None
    environment: dict = field(default_factory=dict)  # analysis.timing.env.timing_environment
    # One forward's peak memory at this batch, net of the weights and inputs (analysis.timing.memory
    # .forward_peak_bytes; CPU and CUDA), with BenchSettings.peak_memory; and 1 - it / the baseline's.
    forward_peak_mib: float | None = None
    memory_reduction: float | None = None


@dataclass
class LatencyRow:
    """Batch-1 latency of one runner: milliseconds per image over interleaved rounds."""
    model: str
    device: str
    precision: str
    median_ms: float
    p90_ms: float
    params_m: float
    gflops: float | None
    weights: str
    rounds_ms: list[float] = field(default_factory=list)  # ms per image of each interleaved round
    speedup: float | None = None  # baseline median ms / this median ms
    baseline: str | None = None
    speedup_q1: float | None = None  # interquartile range of the per-round ratios
    speedup_q3: float | None = None
    environment: dict = field(default_factory=dict)


def count_flops(runner: Runner) -> float | None:
    """FLOPs of one image through the runner's forward."""
    try:
        inputs = runner.make_inputs(1)
        with torch.inference_mode():
            return measure_flops(lambda: runner.forward(inputs))[1]
    except Exception:  # noqa: BLE001 - a forward the counter cannot trace still gets timed
        return None


def time_call(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Seconds for one call, with the device synchronised before each clock read."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _time_iters(runner: Runner, inputs: Any, iters: int, settings: BenchSettings) -> float:
    dtype = PRECISIONS[settings.precision]
    synchronize(settings.device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(settings.device, enabled=dtype is not None, dtype=dtype):
        for _ in range(iters):
            runner.forward(inputs)
    synchronize(settings.device)
    return time.perf_counter() - start


OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's and the CPU allocator's out-of-memory errors alike (DefaultCPUAllocator: can't allocate memory)."""
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError))
            or any(text in str(exc).lower() for text in OUT_OF_MEMORY_MESSAGES))


def benchmark(runners: Sequence[Runner], settings: BenchSettings, baseline: str | None = None,
              progress: Callable[[float, str], None] | None = None,
              on_measure: Callable[[str, int, int, float], None] | None = None) -> list[ThroughputRow]:
    """Time every runner in interleaved rounds; img/s is the median over rounds. Raises on out-of-memory.

    The allocator is put into its controlled state first; the warm-up (at least one call, on CPU continued
    until a call faults no fresh pages in) brings it, the kernels and the caches to their steady state, so no
    cold first call is ever timed.

    ``progress(fraction, message)`` says when each runner's FLOP counting and warm-up start and follows each timed
    round, like every analysis's progress callback.
    ``on_measure(model, batch, round, img_per_s)`` sees each round as it finishes (for live charts).
    """
    if baseline is not None and baseline not in {r.name for r in runners}:
        raise ValueError(f"baseline {baseline!r} is not among the models {[r.name for r in runners]}")
    control_allocator()
    inputs = {r.name: r.make_inputs(settings.batch) for r in runners}
    peak = _warm_up(runners, inputs, settings, progress)
    per_round: dict[str, list[float]] = {r.name: [] for r in runners}
    steps, done = settings.rounds * len(runners), 0
    for round_index in range(settings.rounds):
        for r in runners:
            seconds = _time_iters(r, inputs[r.name], settings.iters, settings)
            per_round[r.name].append(settings.batch * settings.iters / seconds)
            if on_measure:
                on_measure(r.name, settings.batch, round_index, per_round[r.name][-1])
            done += 1
            if progress:
                progress(done / steps, f"round {round_index + 1}/{settings.rounds}: {r.name}")
    rows = []
    for r in runners:
        img_s = statistics.median(per_round[r.name])
        q1, q3 = quartiles(per_round[r.name])
        rows.append(ThroughputRow(
            model=r.name, batch=settings.batch, device=settings.device, precision=settings.precision,
            img_per_s=img_s, ms_per_batch=1000.0 * settings.batch / img_s, params_m=r.params / 1e6,
            gflops=None if r.flops_per_image is None else r.flops_per_image / 1e9,
            peak_mem_mib=peak[r.name], weights=r.weights, rounds=per_round[r.name], img_per_s_q1=q1,
            img_per_s_q3=q3, environment=timing_environment(settings.device, settings.precision, settings.batch,
                                                             r.engine)))
    if settings.peak_memory:
        _add_forward_peaks(rows, runners, inputs, settings, progress)
    if baseline is not None:
        add_speedups(rows, baseline, per_round)
    return rows


def _warm_up(runners: Sequence[Runner], inputs: dict, settings: BenchSettings,
             progress: Callable[[float, str], None] | None) -> dict[str, float | None]:
    """Count each runner's FLOPs where unknown and warm it up; its CUDA peak (weights included) in MiB, else None."""
    peak: dict[str, float | None] = {}
    is_cuda = torch.device(settings.device).type == "cuda"
    for index, r in enumerate(runners):
        where = f"{index + 1}/{len(runners)}: {r.name}"
        if r.flops_per_image is None:
            if progress:
                progress(0.0, f"counting FLOPs {where}")
            r.flops_per_image = count_flops(r)
        if progress:  # warm-up can take longer than the rounds (first calls, the allocator's steady state)
            progress(0.0, f"warming up {where}" + (f" ({r.warmup_note})" if r.warmup_note else ""))
        if is_cuda:
            torch.cuda.reset_peak_memory_stats()
        _time_iters(r, inputs[r.name], max(1, settings.warmup), settings)
        if not is_cuda:  # until a forward runs without faulting in fresh pages (the allocator's steady state)
            warm_until_steady(lambda r=r: _time_iters(r, inputs[r.name], 1, settings))
        peak[r.name] = torch.cuda.max_memory_allocated() / 2**20 if is_cuda else None
    return peak


def _add_forward_peaks(rows: Sequence[ThroughputRow], runners: Sequence[Runner], inputs: dict,
                       settings: BenchSettings, progress: Callable[[float, str], None] | None) -> None:
    """Each row's ``forward_peak_mib``: one more forward of its runner (warm, after the timed rounds, so that the
    measurement cannot disturb them) under ``forward_peak_bytes``."""
    for row, r in zip(rows, runners):
        if progress:
            progress(1.0, f"peak memory of one forward: {r.name}")
        peak = forward_peak_bytes(lambda r=r: _time_iters(r, inputs[r.name], 1, settings), settings.device)
        row.forward_peak_mib = None if peak is None else peak / 2**20


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method; one value is its own range)."""
    values = list(values)
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def add_speedups(rows: list[ThroughputRow], baseline: str, per_round: dict[str, list[float]] | None = None) -> None:
    """Speed-up against the baseline: the ratio of the two img/s shown (median rounds), so table and speed-up
    agree by construction; its spread is the interquartile range of the per-round ratios of the interleaved
    runs (where rounds pair up)."""
    base = next(r for r in rows if r.model == baseline)
    for row in rows:
        row.speedup = row.img_per_s / base.img_per_s
        row.baseline = baseline
        row.memory_reduction = memory_reduction(base.forward_peak_mib, row.forward_peak_mib)
        paired = per_round is not None and len(per_round.get(row.model, [])) == len(per_round.get(baseline, []))
        if paired:
            row.speedup_q1, row.speedup_q3 = quartiles(
                [a / b for a, b in zip(per_round[row.model], per_round[baseline])])


TRUST_SPREAD = 0.10  # the middle half of the rounds spread wider than this fraction of the median: not reliable


AGREEMENT = 0.05  # median of per-round ratios vs ratio of medians


def spread_warnings(rows: Sequence[ThroughputRow | LatencyRow], limit: float = TRUST_SPREAD) -> list[str]:
    """One sentence per row whose rounds (or per-round speed-up ratios) spread too widely to trust a ratio:
    how wide, and what to do about it."""
    advice = ("Run more rounds, use fewer threads (1-2 on a shared machine), or time on a quieter machine.")
    out = []
    for row in rows:
        rounds = row.rounds if isinstance(row, ThroughputRow) else [1000.0 / ms for ms in row.rounds_ms]
        if len(rounds) < 2:
            continue
        q1, q3 = quartiles(rounds)
        median = statistics.median(rounds)
        problems, too_wide = [], False
        if (q3 - q1) / median > limit:
            too_wide = True
            problems.append(f"its rounds range from {min(rounds):.1f} to {max(rounds):.1f} img/s, the middle half of "
                            f"them between {q1:.1f} and {q3:.1f} img/s ({(q3 - q1) / median:.0%} of the median)")
        if row.speedup is not None and row.speedup_q1 is not None and row.model != row.baseline:
            width = (row.speedup_q3 - row.speedup_q1) / row.speedup
            if width > limit:
                too_wide = True
                problems.append(f"the middle half of its per-round speed-ups lies between {row.speedup_q1:.2f}x and "
                                f"{row.speedup_q3:.2f}x ({width:.0%} of the speed-up)")
            middle = (row.speedup_q1 + row.speedup_q3) / 2
            if abs(middle - row.speedup) / row.speedup > AGREEMENT:
                problems.append(f"the middle of its per-round ratios ({middle:.2f}x) and the ratio of medians "
                                f"({row.speedup:.2f}x) differ by more than {AGREEMENT:.0%}")
        if problems:
            subject = f"its speed-up of {row.speedup:.2f}x" if row.speedup is not None and row.model != row.baseline \
                else "its img/s"
            reason = (f"the middle half spreads wider than {limit:.0%} of the median" if too_wide
                      else "the two ways of taking the ratio disagree")
            out.append(f"{row.model}: " + "; ".join(problems) + f". Since {reason}, {subject} is not reliable. "
                       f"{advice}")
    return out


def latency(runners: Sequence[Runner], settings: BenchSettings, baseline: str | None = None,
            progress: Callable[[float, str], None] | None = None,
            on_measure: Callable[[str, int, int, float], None] | None = None) -> list[LatencyRow]:
    """Batch-1 latency: ``benchmark`` at batch 1, each round read as ms per image; median and p90 over rounds.

    With ``settings.iters == 1`` every round is one forward, so the p90 is that of single calls. The speed-up
    is ``benchmark``'s: the median of per-round ratios of the interleaved runs.
    """
    import numpy as np

    rows = benchmark(runners, _with_batch(settings, 1), baseline=baseline, progress=progress, on_measure=on_measure)
    out = []
    for row in rows:
        ms = [1000.0 / img_s for img_s in row.rounds]
        out.append(LatencyRow(
            model=row.model, device=row.device, precision=row.precision, median_ms=statistics.median(ms),
            p90_ms=float(np.percentile(ms, 90)), params_m=row.params_m, gflops=row.gflops, weights=row.weights,
            rounds_ms=ms, speedup=row.speedup, baseline=row.baseline, speedup_q1=row.speedup_q1,
            speedup_q3=row.speedup_q3, environment=row.environment))
    return out


def sweep(runners: Sequence[Runner], settings: BenchSettings, batches: Sequence[int], baseline: str | None = None,
          progress: Callable[[float, str], None] | None = None,
          on_measure: Callable[[str, int, int, float], None] | None = None,
          time_limit: float | None = None) -> tuple[list[ThroughputRow], list[str]]:
    """Benchmark at each batch size; on out-of-memory, retry at half the batch and stop going larger.

    On a CPU, batches whose estimated activations exceed the available memory are left out first
    (``analysis.timing.memory.batches_that_fit``). With ``time_limit`` (seconds), no batch starts once the sweep has
    run that long. Returns the rows and notes saying what was left out, backed off or stopped.
    """
    rows: list[ThroughputRow] = []
    notes: list[str] = []
    if torch.device(settings.device).type == "cpu":
        batches, notes = batches_that_fit(runners, batches)
    largest_done, started = 0, time.monotonic()
    for batch in sorted(batches):
        if time_limit is not None and largest_done and time.monotonic() - started >= time_limit:
            notes.append(f"stopped the sweep before batch {batch}: the time limit of {time_limit:g} s was reached "
                         f"after batch {largest_done}.")
            break
        current, step = batch, []
        while current > largest_done:
            try:
                step = benchmark(runners, _with_batch(settings, current), baseline=baseline, progress=progress,
                                 on_measure=on_measure)
                break
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest propagates
                if not is_out_of_memory(exc):
                    raise
                _free_memory(settings.device)
                notes.append(f"batch {current}: out of memory; backed off to batch {current // 2}.")
                current //= 2
        for row in step:
            row.note = f"asked for batch {batch}" if current != batch else ""
        rows.extend(step)
        if current != batch:
            notes.append(f"stopped the sweep at batch {batch}: it does not fit"
                         + (f"; batch {current} was measured instead." if step else "."))
            break
        largest_done = batch
    return rows, notes


def growing_sweep(runners: Sequence[Runner], settings: BenchSettings, start: int, step: int,
                  time_limit: float | None = None, max_batch: int = 4096, baseline: str | None = None,
                  progress: Callable[[float, str], None] | None = None,
                  on_measure: Callable[[str, int, int, float], None] | None = None
                  ) -> tuple[list[ThroughputRow], list[str]]:
    """PuMer's throughput protocol: ``sweep`` over start, start + step, ... (up to ``max_batch``), which stops at the
    first batch that runs out of memory (or, on a CPU, the first whose estimate does not fit) or at ``time_limit``.
    ``best_batch`` of the rows picks the batch to report."""
    if start < 1 or step < 1:
        raise ValueError(f"the batch grows from {start} in steps of {step}: both must be at least 1")
    if torch.device(settings.device).type == "cpu":  # list one batch past the estimate: the sweep says why it stops
        fits = largest_batch_that_fits(runners)
        max_batch = max_batch if fits is None else min(max_batch, max(fits, start) + step)
    rows, notes = sweep(runners, settings, range(start, max(start, max_batch) + 1, step), baseline=baseline,
                        progress=progress, on_measure=on_measure, time_limit=time_limit)
    left_out = [n for n in notes if " left out: " in n]  # the available memory moves between two estimates
    if len(left_out) > 1:
        notes = [f"{left_out[0][:-1]}; {len(left_out) - 1} larger batches likewise."] + \
                [n for n in notes if n not in left_out]
    return rows, notes


def best_batch(rows: Sequence[ThroughputRow], baseline: str | None = None) -> int | None:
    """The batch at which ``baseline`` (else the first model) reached its highest img/s; None without rows. Every
    model is reported at this one batch, so speed-up and memory reduction compare like with like."""
    model = baseline if baseline is not None else (rows[0].model if rows else None)
    ranked = [r for r in rows if r.model == model]
    return max(ranked, key=lambda r: r.img_per_s).batch if ranked else None


def _with_batch(settings: BenchSettings, batch: int) -> BenchSettings:
    s = copy.copy(settings)
    s.batch = batch
    return s


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def rows_to_records(rows: Sequence[ThroughputRow | LatencyRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def rows_to_dataframe(rows: Sequence[ThroughputRow | LatencyRow]):
    """One row per record, the rounds left out and the environment spread into ``env_*`` columns."""
    import pandas as pd

    records = rows_to_records(rows)
    for record in records:
        record.update({f"env_{k}": v for k, v in record.pop("environment", {}).items()})
    df = pd.DataFrame(records)
    return df.drop(columns=[c for c in ("rounds", "rounds_ms") if c in df])
