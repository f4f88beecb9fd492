"""`python -m analysis.throughput`: time models and variants side by side on this machine, print and write the rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from analysis.timing.engines import ENGINES, EAGER, engine_runners, engines, over_eager, refuse_batches, within_engines
from analysis.timing.env import control_allocator, environment_line, timing_environment
from analysis.timing.harness import (
    PRECISIONS,
    BenchSettings,
    LatencyRow,
    Runner,
    ThroughputRow,
    benchmark,
    best_batch,
    growing_sweep,
    is_out_of_memory,
    latency,
    rows_to_dataframe,
    rows_to_records,
    spread_warnings,
    sweep,
)
from analysis.timing.memory import PEAK_MEMORY_METHODS, batch_refusal
from analysis.timing.runners import ModelOptions, make_runner
from models.device import default_device, hardware_info
from models.registry import batch_growth, get_spec
from models.variants import parse_variant


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


def peak_memory_lines(rows: Sequence[ThroughputRow | LatencyRow]) -> list[str]:
    """One line per row with a measured one-forward peak (latency rows have none): MiB, and the reduction against
    the baseline's."""
    lines = []
    for r in (r for r in rows if getattr(r, "forward_peak_mib", None) is not None):
        against = (f" ({100 * r.memory_reduction:.1f} % less than {r.baseline})"
                   if r.memory_reduction is not None and r.baseline not in (None, r.model) else "")
        lines.append(f"peak memory {r.model} at batch {r.batch}: {r.forward_peak_mib:.1f} MiB{against}")
    return lines


def write_results(rows: Sequence[ThroughputRow | LatencyRow], path: str | Path, settings: BenchSettings,
                  extra: dict | None = None) -> None:
    """Rows as JSON (with settings, hardware, environment and ``extra``) or CSV (``extra`` as constant columns)."""
    path, extra = Path(path), extra or {}
    if path.suffix == ".json":
        payload = {"settings": asdict(settings), "hardware": hardware_info(),
                   "environment": rows[0].environment if rows else {}, **extra, "rows": rows_to_records(rows)}
        path.write_text(json.dumps(payload, indent=2))
    else:
        rows_to_dataframe(rows).assign(**extra).to_csv(path, index=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis.throughput",
        description="Measure img/s of registry models and their token-reduction variants on this machine.")
    p.add_argument("--models", nargs="+", required=True,
                   help="registry names, optionally with settings: NAME@key=value[,key=value] (see README); "
                        "ViLT and METER also at another input size: NAME@size=320, NAME@pumer,size=320")
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
    p.add_argument("--random-weights", action="store_true", help="use untrained weights (fine for timing)")
    p.add_argument("--engine", nargs="+", choices=list(ENGINES), default=[EAGER.key], metavar="ENGINE",
                   help="engines to time each model in, interleaved in the same rounds: " +
                        "; ".join(f"{e.key}: {e.help}" for e in ENGINES.values()))
    p.add_argument("--peak-memory", action="store_true",
                   help="also measure one forward's peak memory per model (CPU: the allocator's live bytes through "
                        "torch.profiler; CUDA: max_memory_allocated), net of the weights, and its reduction against "
                        "--baseline")
    p.add_argument("--paper-protocol", action="store_true",
                   help="PuMer's throughput protocol: grow the batch from the family's start (ViLT 32, METER 16) in "
                        "steps of 8 until out of memory or --time-limit; report every model at the batch where "
                        "the baseline is fastest, with peak memory")
    p.add_argument("--time-limit", type=float, default=600.0,
                   help="seconds after which --paper-protocol starts no larger batch (default 600)")
    p.add_argument("--out", help="write results to .csv or .json")
    return p


def _bench_settings(args: argparse.Namespace) -> BenchSettings:
    """The harness settings the arguments ask for (batch 1 and more rounds for --latency); sets the thread count and
    puts the baseline first among the models."""
    iters = args.iters or (1 if args.latency else 10)
    rounds = args.rounds or (20 if args.latency else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    if args.baseline and args.baseline not in args.models:
        args.models = [args.baseline] + list(args.models)
    return BenchSettings(batch=1 if args.latency else args.batch, iters=iters, rounds=rounds, warmup=args.warmup,
                         device=device, precision=args.precision, peak_memory=args.peak_memory or args.paper_protocol)


class _Refused(Exception):
    """A batch refused before it runs; the message is the sentence to print."""


def _runners(args: argparse.Namespace, parser: argparse.ArgumentParser, settings: BenchSettings) -> list[Runner]:
    """One runner per model under each --engine (a model an engine refuses is left out with a sentence); _Refused
    when the batch cannot fit or nothing is left, the errors of loading otherwise."""
    device = settings.device
    refusal = refuse_batches(args.engine, bool(args.batches or args.paper_protocol))
    if refusal:
        parser.error(refusal)
    options = ModelOptions(channels_last=args.channels_last, fuse_bn=args.fuse_bn)
    runners = [make_runner(name, device=device, random_weights=args.random_weights, options=options)
               for name in args.models]
    # A sweep leaves out what cannot fit (``sweep``); a single batch is refused the same way, before it runs.
    refusal = (batch_refusal(runners, settings.batch) if torch.device(device).type == "cpu"
               and not (args.latency or args.batches or args.paper_protocol) else None)
    if refusal:
        raise _Refused(refusal)
    runners, notes = engine_runners(args.engine, runners, settings.batch, device, progress=_report)
    for note in notes:
        print(f"refused: {note}")
    if not runners:
        raise _Refused("no model runs under the engines asked for.")
    args.baseline_variant = args.baseline
    if args.baseline:  # the baseline under the first engine that runs it
        names = {r.name for r in runners}
        args.baseline = next((e.tag(args.baseline) for e in engines(args.engine) if e.tag(args.baseline) in names),
                             None)
    return runners


def _report(fraction: float, message: str) -> None:
    print(f"  [{fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def _measure(args: argparse.Namespace, runners: list[Runner], settings: BenchSettings) -> list | None:
    """Time the runners as asked (latency, a sweep of batches, or one batch) and print the table; None after
    printing why when one batch runs out of memory."""
    if args.latency:
        rows = latency(runners, settings, baseline=args.baseline, progress=_report)
        print(format_latency_table(rows))
        return rows
    if args.batches or args.paper_protocol:
        if args.paper_protocol:
            start, step = protocol_growth(args.baseline or args.models[0])
            print(f"paper protocol: batch grown from {start} in steps of {step} until out of memory or "
                  f"{args.time_limit:g} s")
            rows, notes = growing_sweep(runners, settings, start, step, time_limit=args.time_limit,
                                        baseline=args.baseline, progress=_report)
        else:
            rows, notes = sweep(runners, settings, args.batches, baseline=args.baseline, progress=_report)
        for note in notes:
            print(f"note: {note}")
    else:
        try:
            rows = benchmark(runners, settings, baseline=args.baseline, progress=_report)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory becomes a sentence; the rest propagates
            if not is_out_of_memory(exc):
                raise
            print(f"error: out of memory at batch {settings.batch} on {settings.device}: use a smaller --batch, or "
                  f"--batches for a sweep that backs off.", file=sys.stderr)
            return None
    print(format_table(rows))
    return rows


def protocol_growth(model: str) -> tuple[int, int]:
    """(first batch, step) of the paper's protocol for a variant name's family (``models.registry.batch_growth``);
    ValueError naming the families that have one."""
    spec = get_spec(parse_variant(model).model)
    growth = batch_growth(spec.family)
    if growth is None:
        raise ValueError(f"--paper-protocol: the paper gives no batch protocol for {spec.name} ({spec.family_label}); "
                         f"use --batches for a sweep.")
    return growth


def _print_findings(args: argparse.Namespace, rows: list, settings: BenchSettings) -> None:
    """Spread warnings, speed-ups (within each engine too), peak memory, and the rows written to --out; with
    --paper-protocol, the speed-ups and memory at the best batch only."""
    extra = {}
    if args.paper_protocol:
        best = best_batch(rows, args.baseline)
        extra = {"protocol": "paper", "best_batch": best}
        print(f"paper protocol: best batch {best} (where {args.baseline or rows[0].model} is fastest)")
        rows_shown = [r for r in rows if r.batch == best]
    else:
        rows_shown = rows
    for warning in spread_warnings(rows_shown):
        print(f"warning: {warning}")
    for line in speedup_lines(rows_shown):
        print(line)
    if args.baseline:
        for line in speedup_lines(within_engines(rows_shown, args.baseline_variant)):
            print(f"{line} (same engine)")
    for line in speedup_lines(over_eager(rows_shown)):
        print(f"{line} (engine over eager)")
    memory = peak_memory_lines(rows_shown)
    for line in memory:
        print(line)
    if memory:
        print(f"peak memory: {PEAK_MEMORY_METHODS[torch.device(settings.device).type]}")
    if args.out:
        write_results(rows, args.out, settings, extra)
        print(f"wrote {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    from models.checkpoints import CheckpointError, WeightsNotFoundError
    control_allocator()  # before any model or tensor is allocated
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(map(bool, (args.latency, args.batches, args.paper_protocol))) > 1:
        parser.error("--latency, --batches and --paper-protocol choose the batches three ways: pick one")
    settings = _bench_settings(args)
    try:
        if args.paper_protocol:
            protocol_growth(args.baseline or args.models[0])  # refused before any model loads
        runners = _runners(args, parser, settings)
    except _Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, WeightsNotFoundError, CheckpointError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    engine = ", ".join(e.label for e in engines(args.engine))
    print(f"device={settings.device}: "
          f"{environment_line(timing_environment(settings.device, args.precision, settings.batch, engine))}; "
          f"rounds={settings.rounds}x{settings.iters} iters, interleaved")
    rows = _measure(args, runners, settings)
    if rows is None:
        return 2
    _print_findings(args, rows, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
