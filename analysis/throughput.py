"""Throughput core: warm-up, timed iterations with device sync, interleaved runs, records, CLI.

Every page that shows speed and the CLI use ``benchmark``. A speed-up is the ratio of two runners'
throughputs measured in interleaved rounds in the same process, so that drift in clock speed or
background load hits both alike. img/s is the median round and the speed-up the ratio of those medians, so
the two agree by construction; each comes with its interquartile range over the rounds (the speed-up's over
the per-round ratios), and ``spread_warnings`` says in words when a spread is too large to trust a ratio.
Every timing runs with the memory allocator in one fixed state (``analysis.timing_env.control_allocator``)
and every row carries the environment it was measured in.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from analysis.memory import batch_refusal, batches_that_fit
from analysis.timing_env import control_allocator, environment_line, timing_environment, warm_until_steady
from models.device import autocast, default_device, hardware_info, synchronize
from models.loading import LoadedModel, load_model
from models.registry import IMAGE_INPUTS, VQA_INPUTS
from models.variants import forward_for, parse_variant

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
    engine: str = "eager"  # eager | torch.compile


@dataclass
class BenchSettings:
    batch: int = 16
    iters: int = 10  # timed iterations per round
    rounds: int = 3  # interleaved rounds; the median round counts
    warmup: int = 3
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; GPU only)


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
    environment: dict = field(default_factory=dict)  # analysis.timing_env.timing_environment


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


def measure_flops(run: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``run()`` under torch.utils.flop_counter; (its output, FLOPs counted, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        output = run()
    return output, float(counter.get_total_flops())


def count_flops(runner: Runner) -> float | None:
    """FLOPs of one image through the runner's forward."""
    try:
        inputs = runner.make_inputs(1)
        with torch.inference_mode():
            return measure_flops(lambda: runner.forward(inputs))[1]
    except Exception:  # noqa: BLE001 - a forward the counter cannot trace still gets timed
        return None


def extra_flop_formulas() -> dict:
    """The CPU flash-attention kernel has no formula in torch's counter; without one, fused attention on
    CPU would count as free. It computes what the other SDPA kernels compute, so reuse their formula."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_flash_flop}


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
    peak: dict[str, float | None] = {}
    is_cuda = torch.device(settings.device).type == "cuda"
    for index, r in enumerate(runners):
        where = f"{index + 1}/{len(runners)}: {r.name}"
        if r.flops_per_image is None:
            if progress:
                progress(0.0, f"counting FLOPs {where}")
            r.flops_per_image = count_flops(r)
        if progress:  # warm-up can take longer than the rounds (first calls, the allocator's steady state)
            progress(0.0, f"warming up {where}" + (" (compiling)" if r.engine == "torch.compile" else ""))
        if is_cuda:
            torch.cuda.reset_peak_memory_stats()
        _time_iters(r, inputs[r.name], max(1, settings.warmup), settings)
        if not is_cuda:  # until a forward runs without faulting in fresh pages (the allocator's steady state)
            warm_until_steady(lambda r=r: _time_iters(r, inputs[r.name], 1, settings))
        peak[r.name] = torch.cuda.max_memory_allocated() / 2**20 if is_cuda else None
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
    if baseline is not None:
        add_speedups(rows, baseline, per_round)
    return rows


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
          on_measure: Callable[[str, int, int, float], None] | None = None) -> tuple[list[ThroughputRow], list[str]]:
    """Benchmark at each batch size; on out-of-memory, retry at half the batch and stop going larger.

    On a CPU, batches whose estimated activations exceed the available memory are left out first
    (``analysis.memory.batches_that_fit``). Returns the rows and notes saying what was left out or backed off.
    """
    rows: list[ThroughputRow] = []
    notes: list[str] = []
    if torch.device(settings.device).type == "cpu":
        batches, notes = batches_that_fit(runners, batches)
    largest_done = 0
    for batch in sorted(batches):
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


def _with_batch(settings: BenchSettings, batch: int) -> BenchSettings:
    s = copy.copy(settings)
    s.batch = batch
    return s


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------- runners for variant names
# ``models.variants`` says which forward a name runs; timing adds deployment options applied to a private copy
# and synthetic inputs of the model's input kind.
def _is_channels_last(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def image_inputs(loaded: LoadedModel) -> Callable[[int], torch.Tensor]:
    """Random images at the model's input size (in its memory format)."""
    channels, height, width = loaded.data_config["input_size"]
    memory_format = torch.channels_last if _is_channels_last(loaded.model) else torch.contiguous_format

    def make(batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, channels, height, width, generator=generator).to(loaded.device)
        return x.contiguous(memory_format=memory_format)

    return make


def vqa_inputs(loaded: LoadedModel, text_len: int = 11) -> Callable[[int], dict]:
    """A CLS + 9 words + SEP question (BERT's special ids; the token values do not change the cost) and a square
    image at the model's size, as ViLT's or METER's processor would give."""
    config = loaded.model.config
    size = loaded.data_config["input_size"][-1]

    def make(batch: int) -> dict:
        generator = torch.Generator().manual_seed(0)
        high = min(config.vocab_size, 2000)
        ids = torch.randint(min(1000, high // 2), high, (batch, text_len), generator=generator)
        ids[:, 0], ids[:, -1] = 101 % config.vocab_size, 102 % config.vocab_size
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                      pixel_values=torch.randn(batch, 3, size, size, generator=generator),
                      pixel_mask=torch.ones(batch, size, size, dtype=torch.long))
        return {k: v.to(loaded.device) for k, v in inputs.items()}

    return make


INPUT_BUILDERS: dict[str, Callable[[LoadedModel], Callable[[int], object]]] = {
    IMAGE_INPUTS: image_inputs,
    VQA_INPUTS: vqa_inputs,
}


@dataclass(frozen=True)
class ModelOptions:
    """Deployment-style changes applied to a private copy of the model before timing."""
    channels_last: bool = False
    fuse_bn: bool = False  # fold BatchNorm into convolutions (EfficientViT, MobileNetV3)
    compile: bool = False  # torch.compile

    @property
    def any(self) -> bool:
        return self.channels_last or self.fuse_bn or self.compile


def prepared(loaded: LoadedModel, options: ModelOptions) -> LoadedModel:
    """A LoadedModel whose model is a transformed deep copy; the shared cached model is never touched."""
    if not options.any:
        return loaded
    model = copy.deepcopy(loaded.model)
    if options.fuse_bn:
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model, inplace=True)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if options.compile:
        model = torch.compile(model)
    return dataclasses.replace(loaded, model=model)


def make_runner(text: str, device: str = "cpu", random_weights: bool = False,
                loaded: LoadedModel | None = None, options: ModelOptions = ModelOptions()) -> Runner:
    """A throughput Runner for a variant name; loads the model unless one is given."""
    variant = parse_variant(text)
    loaded = prepared(loaded or load_model(variant.model, device=device, random_weights=random_weights), options)
    forward = forward_for(loaded.model, loaded.name, variant)
    return Runner(name=variant.label, forward=forward, make_inputs=INPUT_BUILDERS[loaded.spec.inputs](loaded),
                  params=loaded.num_params, weights=loaded.weights.description,
                  engine="torch.compile" if options.compile else "eager")


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


def format_table(rows: Sequence[ThroughputRow]) -> str:
    header = (f"{'model':<48} {'batch':>5} {'img/s':>10} {'IQR img/s':>15} {'ms/batch':>10} {'params(M)':>10} "
              f"{'GFLOPs':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gflops = "n/a" if r.gflops is None else f"{r.gflops:.2f}"
        iqr = f"{r.img_per_s_q1:.1f}-{r.img_per_s_q3:.1f}" if r.img_per_s_q1 is not None else ""
        lines.append(f"{r.model:<48} {r.batch:>5} {r.img_per_s:>10.1f} {iqr:>15} {r.ms_per_batch:>10.1f} "
                     f"{r.params_m:>10.2f} {gflops:>8}")
    return "\n".join(lines)


def format_latency_table(rows: Sequence[LatencyRow]) -> str:
    header = f"{'model':<48} {'batch':>5} {'median ms':>10} {'p90 ms':>10} {'params(M)':>10} {'GFLOPs':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        gflops = "n/a" if r.gflops is None else f"{r.gflops:.2f}"
        lines.append(f"{r.model:<48} {1:>5} {r.median_ms:>10.2f} {r.p90_ms:>10.2f} {r.params_m:>10.2f} {gflops:>8}")
    return "\n".join(lines)


def speedup_text(row: ThroughputRow | LatencyRow) -> str:
    """'1.57x (IQR 1.52-1.61x over rounds)' or '1.57x'."""
    if row.speedup_q1 is None:
        return f"{row.speedup:.2f}x"
    return f"{row.speedup:.2f}x (IQR {row.speedup_q1:.2f}-{row.speedup_q3:.2f}x over rounds)"


def speedup_lines(rows: Sequence[ThroughputRow | LatencyRow]) -> list[str]:
    at = " at batch 1" if rows and isinstance(rows[0], LatencyRow) else ""
    return [f"speedup {r.model} vs {r.baseline}{at}: {speedup_text(r)}" for r in rows
            if r.baseline is not None and r.model != r.baseline and r.speedup is not None]


def write_results(rows: Sequence[ThroughputRow | LatencyRow], path: str | Path, settings: BenchSettings) -> None:
    path = Path(path)
    if path.suffix == ".json":
        payload = {"settings": asdict(settings), "hardware": hardware_info(),
                   "environment": rows[0].environment if rows else {}, "rows": rows_to_records(rows)}
        path.write_text(json.dumps(payload, indent=2))
    else:
        rows_to_dataframe(rows).to_csv(path, index=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis.throughput",
        description="Measure img/s of registry models and their token-reduction variants on this machine.")
    p.add_argument("--models", nargs="+", required=True,
                   help="registry names, optionally with settings: NAME@key=value[,key=value] (see README)")
    p.add_argument("--baseline", help="print 'speedup <model> vs <baseline>' for every other model")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: fastest present)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", help="a batch sweep instead of one batch")
    p.add_argument("--latency", action="store_true",
                   help="batch-1 latency: ms per image, median and p90 over rounds (default 20 rounds of 1 iteration)")
    p.add_argument("--iters", type=int, help="timed iterations per round (default 10; 1 with --latency)")
    p.add_argument("--rounds", type=int, help="interleaved rounds, the median counts (default 3; 20 with --latency)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fuse-bn", action="store_true", help="fold BatchNorm into convolutions (EfficientViT, MobileNetV3)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--random-weights", action="store_true", help="use untrained weights (fine for timing)")
    p.add_argument("--engine", choices=["eager", "onnxruntime"], default="eager",
                   help="onnxruntime: also time each model exported to ONNX, interleaved with its eager runs "
                        "(refused unless ONNX Runtime equals eager within 1e-4)")
    p.add_argument("--out", help="write results to .csv or .json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from models.checkpoints import CheckpointError, WeightsNotFoundError
    control_allocator()  # before any model or tensor is allocated
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.latency and args.batches:
        parser.error("--latency measures batch 1; it cannot be combined with --batches")
    iters = args.iters or (1 if args.latency else 10)
    rounds = args.rounds or (20 if args.latency else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    settings = BenchSettings(batch=1 if args.latency else args.batch, iters=iters, rounds=rounds, warmup=args.warmup,
                             device=device, precision=args.precision)
    if args.baseline and args.baseline not in args.models:
        args.models = [args.baseline] + list(args.models)
    try:
        options = ModelOptions(channels_last=args.channels_last, fuse_bn=args.fuse_bn, compile=args.compile)
        runners = [make_runner(name, device=device, random_weights=args.random_weights, options=options)
                   for name in args.models]
        # A sweep leaves out what cannot fit (``sweep``); a single batch is refused the same way, before it runs.
        refusal = (batch_refusal(runners, settings.batch)
                   if torch.device(device).type == "cpu" and not (args.latency or args.batches) else None)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        if args.engine == "onnxruntime":
            from analysis.onnx_engine import onnx_runners

            if args.latency or args.batches:
                parser.error("--engine onnxruntime exports at one batch: use --batch, not --latency or --batches")
            for r in runners:  # the exported graph runs the same FLOPs; torch's counter cannot see inside ORT
                r.flops_per_image = count_flops(r)
            runners += onnx_runners(runners, settings.batch, device)
    except (KeyError, ValueError, WeightsNotFoundError, CheckpointError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    engine = "torch.compile" if args.compile else "eager"
    print(f"device={device}: {environment_line(timing_environment(device, args.precision, settings.batch, engine))}; "
          f"rounds={rounds}x{iters} iters, interleaved")

    def report(fraction: float, message: str) -> None:
        print(f"  [{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    if args.latency:
        rows = latency(runners, settings, baseline=args.baseline, progress=report)
        print(format_latency_table(rows))
    else:
        if args.batches:
            rows, notes = sweep(runners, settings, args.batches, baseline=args.baseline, progress=report)
            for note in notes:
                print(f"note: {note}")
        else:
            try:
                rows = benchmark(runners, settings, baseline=args.baseline, progress=report)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory becomes a sentence; the rest propagates
                if not is_out_of_memory(exc):
                    raise
                print(f"error: out of memory at batch {settings.batch} on {device}: use a smaller --batch, or "
                      f"--batches for a sweep that backs off.", file=sys.stderr)
                return 2
        print(format_table(rows))
    for warning in spread_warnings(rows):
        print(f"warning: {warning}")
    for line in speedup_lines(rows):
        print(line)
    if args.engine == "onnxruntime" and args.baseline:
        from analysis.onnx_engine import ENGINE_SUFFIX

        engine_rows = [dataclasses.replace(r) for r in rows if r.model.endswith(ENGINE_SUFFIX)]
        add_speedups(engine_rows, args.baseline + ENGINE_SUFFIX, {r.model: r.rounds for r in engine_rows})
        for line in speedup_lines(engine_rows):
            print(line)
    if args.out:
        write_results(rows, args.out, settings)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
