"""``python -m analysis.breakdown --models ... --batch 8 --device cpu``: prints the records, writes ops.csv,
breakdown.json and one Chrome trace per model."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from analysis.breakdown.eager import profile_model
from analysis.breakdown.attribution import attribution_warning
from analysis.breakdown.records import TOLERANCE, Breakdown
from analysis.breakdown.tables import ops_table, to_json
from analysis.timing.roofline import below_roof_share, machine_roofline
from models.checkpoints import CheckpointError, WeightsNotFoundError


# --------------------------------------------------------------------------------------- CLI
def format_report(b: Breakdown, roof=None) -> str:
    lines = [f"{b.model}  batch {b.batch}  {b.device} {b.precision}  engine {b.engine}  weights: {b.weights}"]
    lines.append("  operator class      " + "  ".join(f"{k}: {v:5.1%}" for k, v in b.shares().items()))
    lines.append("  component           " + "  ".join(f"{k}: {v:5.1%}" for k, v in b.shares("component").items()))
    lines.append(f"  memory-bound share (data movement, element-wise, norm, softmax, bookkeeping): "
                 f"{b.memory_bound_share():.1%}")
    if roof is not None:
        below = f"{below_roof_share(b, roof):.1%}" if b.costs_counted else "n/a (no FLOPs or bytes counted)"
        lines.append(f"  time below the bandwidth roof ({roof.ridge:.1f} FLOP/byte): {below}")
    lines.append(f"  plain {b.plain_median_ms:.2f} ms, profiled {b.profiled_median_ms:.2f} ms per forward "
                 f"(profiled/plain {b.overhead:.2f}){_profiler_cost(b)}; attributed {b.attributed_ms:.2f} ms = "
                 f"{b.attributed_vs_plain:.2f}x the plain time ({'within' if b.adds_up else 'OUTSIDE'} "
                 f"{TOLERANCE:.0%}{_load(b)})")
    warning = attribution_warning(b)
    if warning:
        lines.append(f"  warning: {warning}")
    if b.note:
        lines.append(f"  note: {b.note}")
    return "\n".join(lines)


def _profiler_cost(b: Breakdown) -> str:
    if b.per_event_us is None:
        return ""
    return f"; profiler cost {b.per_event_us:.2f} us per event x {b.events_per_forward:,.0f} events taken out"


def _load(b: Breakdown) -> str:
    return "" if b.load_1min is None else f"; load average {b.load_1min:.1f}, {b.threads} threads"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.breakdown",
                                description="Where the time goes: runtime per operator class and component.")
    p.add_argument("--models", nargs="+", required=True, help="registry names or variants NAME@key=value")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--engine", choices=["eager", "onnxruntime"], default="eager")
    p.add_argument("--iters", type=int, default=5, help="profiled forwards (each interleaved with a plain one)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads for torch (and ONNX Runtime)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the machine's limits")
    p.add_argument("--refresh-roofline", action="store_true",
                   help="measure the machine's limits again instead of reading them from the cache (the new "
                        "measurement is cached only when taken on a quiet machine)")
    p.add_argument("--out", help="folder for ops.csv, breakdown.json and one Chrome trace per model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    roof = None
    if not args.no_roofline:
        roof = machine_roofline(args.device, args.precision, refresh=args.refresh_roofline,
                                progress=lambda fraction, message: print(f"  measuring the roofline: {message}",
                                                                         file=sys.stderr, flush=True))
        print(f"roofline {roof.device} {roof.dtype}: " + "\n  ".join(roof.summary_lines()))
    results = []
    for text in args.models:
        try:
            b = profile_model(text, batch=args.batch, device=args.device, precision=args.precision,
                              iters=args.iters, warmup=args.warmup, engine=args.engine)
        except (KeyError, ValueError, WeightsNotFoundError, CheckpointError, RuntimeError) as exc:
            print(f"error: {text}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 2
        results.append(b)
        print(format_report(b, roof))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ops_table(results).to_csv(out / "ops.csv", index=False)
        (out / "breakdown.json").write_text(json.dumps(to_json(results, roof), indent=1))
        for b in results:
            if b.trace:
                (out / f"trace_{b.model.replace('@', '_').replace('=', '').replace(',', '_')}.json").write_text(b.trace)
        print(f"wrote {out}/ops.csv, breakdown.json and the traces")
    return 0
