"""``python -m analysis.breakdown --models ... --batch 1 16 --engine eager compile onnxruntime``: prints the
records and, with several engines, how much memory-bound time each removes; writes ops.csv, engines.csv,
breakdown.json and one Chrome trace per model, engine and batch."""
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
from analysis.breakdown.tables import ENGINE_NOTE, engine_comparison, ops_table, to_json
from analysis.timing.engines import EAGER, ENGINES, EngineRefused, engine as engine_named
from analysis.timing.roofline import below_roof_share, machine_roofline
from analysis.timing.runners import ModelOptions
from models.checkpoints import CheckpointError, WeightsNotFoundError


# --------------------------------------------------------------------------------------- CLI
def format_report(b: Breakdown, roof=None) -> str:
    lines = [f"{b.model}  batch {b.batch}  {b.device} {b.precision}  engine: {engine_named(b.engine).label}  "
             f"weights: {b.weights}"]
    lines.append("  operator class      " + "  ".join(f"{k}: {v:5.1%}" for k, v in b.shares().items()))
    lines.append("  component           " + "  ".join(f"{k}: {v:5.1%}" for k, v in b.shares("component").items()))
    lines.append(f"  memory-bound share (data movement, element-wise, norm, softmax, bookkeeping): "
                 f"{b.memory_bound_share():.1%}")
    if roof is not None:
        share = below_roof_share(b, roof)
        below = "n/a (no FLOPs or bytes counted)" if share is None else f"{share:.1%}"
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


def format_engines(rows: Sequence[dict]) -> str:
    """The memory-bound share and time per model, batch and engine, with the speed-up and the memory-bound ms
    removed against eager (``analysis.breakdown.tables.engine_comparison``)."""
    header = (f"{'model':<40} {'batch':>5} {'engine':<26} {'plain ms':>9} {'mem-bound':>9} {'mem ms':>8} "
              f"{'vs eager':>8} {'mem ms removed':>14}")
    lines = [header, "-" * len(header)]
    for r in rows:
        speedup = "" if r["speedup_over_eager"] is None else f"{r['speedup_over_eager']:.2f}x"
        removed = "" if r["memory_bound_ms_removed"] is None else f"{r['memory_bound_ms_removed']:.2f}"
        lines.append(f"{r['model']:<40} {r['batch']:>5} {r['engine']:<26} {r['plain_ms']:>9.2f} "
                     f"{r['memory_bound_share']:>9.1%} {r['memory_bound_ms']:>8.2f} {speedup:>8} {removed:>14}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.breakdown",
                                description="Where the time goes: runtime per operator class and component.")
    p.add_argument("--models", nargs="+", required=True, help="registry names or variants NAME@key=value")
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--engine", nargs="+", choices=list(ENGINES), default=[EAGER.key], metavar="ENGINE",
                   help="engines to profile each model in: " + "; ".join(f"{e.key}: {e.help}" for e in ENGINES.values()))
    p.add_argument("--fuse-bn", action="store_true",
                   help="the deployment form: BatchNorm folded into convolutions (EfficientViT, MobileNetV3) under "
                        "every engine")
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
    results = _profile_all(args, roof)
    if results is None:
        return 2
    if len(args.engine) > 1:
        print(format_engines(engine_comparison(results)))
        print(f"note: {ENGINE_NOTE}")
    if args.out:
        _write(Path(args.out), results, roof)
    return 0


def _profile_all(args: argparse.Namespace, roof) -> list[Breakdown] | None:
    """Every model at every batch under every engine, printed as it finishes; a (model, engine) an engine refuses
    is left out with its sentence; None after printing why when a model cannot be profiled at all."""
    options = ModelOptions(fuse_bn=args.fuse_bn)
    results = []
    for batch in args.batch:
        for text in args.models:
            for key in args.engine:
                try:
                    b = profile_model(text, batch=batch, device=args.device, precision=args.precision,
                                      iters=args.iters, warmup=args.warmup, engine=key, options=options)
                except EngineRefused as exc:
                    print(f"refused: {exc}")
                    continue
                except (KeyError, ValueError, WeightsNotFoundError, CheckpointError, RuntimeError) as exc:
                    print(f"error: {text}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
                    return None
                results.append(b)
                print(format_report(b, roof))
    return results


def _write(out: Path, results: Sequence[Breakdown], roof) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    ops_table(results).to_csv(out / "ops.csv", index=False)
    pd.DataFrame(engine_comparison(results)).to_csv(out / "engines.csv", index=False)
    (out / "breakdown.json").write_text(json.dumps(to_json(results, roof), indent=1))
    for b in results:
        if b.trace:
            name = f"{b.model}_{b.engine}_b{b.batch}".replace("@", "_").replace("=", "").replace(",", "_")
            (out / f"trace_{name}.json").write_text(b.trace)
    print(f"wrote {out}/ops.csv, engines.csv, breakdown.json and the traces")
