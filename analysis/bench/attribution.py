"""Does the breakdown add up? Per model and batch, the operators' attributed time (the profiler's calibrated cost
per event taken out) against the forward timed without the profiler.

    python -m analysis.bench.attribution [--models ...] [--batches 1 16] [--iters 5] [--threads N] [--quick]

Random weights and random images (time does not depend on them), every model profiled by
``analysis.breakdown.profile_model`` as the page and the CLI do. Prints one table: model, batch, plain and
profiled ms (medians of interleaved rounds), the profiler's overhead (profiled / plain), its calibrated cost per
event and the events per forward, the attributed ms, attributed / plain and whether that is within 10 %, with the
1-minute load average before and after. The target holds on a quiet machine; a busy one misses it, and says so.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

MODELS = ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "efficientvit_m2", "mobilenetv3_large_100",
          "deit_small_patch16_224@tome=13")
QUICK_MODELS = ("deit_tiny_patch16_224", "efficientvit_m2")
BATCHES = (1, 16)


def profile_all(models: Sequence[str], batches: Sequence[int], *, iters: int, warmup: int, device: str = "cpu",
                progress: Callable[[float, str], None] | None = None) -> list:
    """``Breakdown`` of every model at every batch, random weights, each model loaded once."""
    from analysis.breakdown import profile_model
    from models.loading import load_model
    from models.variants import parse_variant

    results, steps = [], len(models) * len(batches)
    for i, text in enumerate(models):
        loaded = load_model(parse_variant(text).model, device=device, random_weights=True)
        for j, batch in enumerate(batches):
            index = i * len(batches) + j

            def step(fraction: float, message: str, index=index) -> None:
                if progress:
                    progress((index + fraction) / steps, message)

            results.append(profile_model(text, batch=batch, device=device, iters=iters, warmup=warmup,
                                         loaded=loaded, progress=step))
    return results


def figures_of(results: Sequence) -> list[dict]:
    """One suite figure per profile: attributed / plain, target within the tolerance."""
    from analysis.breakdown import TOLERANCE

    out = []
    for b in results:
        cost = "" if b.per_event_us is None else (f", profiler {b.per_event_us:.2f} us/event x "
                                                   f"{b.events_per_forward:,.0f} events")
        load = "" if b.load_1min is None else f", load {b.load_1min:.1f}"
        out.append({"figure": f"attributed / plain, {b.model}, batch {b.batch}", "value": b.attributed_vs_plain,
                    "unit": "ratio", "target": f"within {TOLERANCE:.0%}", "passed": b.adds_up,
                    "detail": f"plain {b.plain_median_ms:.1f} ms, profiled {b.profiled_median_ms:.1f} ms "
                              f"(x{b.overhead:.2f}){cost}, attributed {b.attributed_ms:.1f} ms{load}, "
                              f"{b.threads} threads"})
    return out


def measure(quick: bool = False, progress=None, models: Sequence[str] | None = None,
            batches: Sequence[int] = BATCHES, iters: int | None = None, device: str | None = None) -> list[dict]:
    from models.device import default_device

    models = models or (QUICK_MODELS if quick else MODELS)
    results = profile_all(models, (1,) if quick and batches == BATCHES else batches, iters=iters or (3 if quick else 5),
                          warmup=1 if quick else 2, device=device or default_device(), progress=progress)
    return figures_of(results)


def format_table(results: Sequence) -> str:
    from analysis.breakdown import attribution_table

    table = attribution_table(results).drop(columns=["engine"])
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="n/a",
                           formatters={"events": lambda v: "n/a" if v != v else f"{v:.0f}"})


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.breakdown import quiet_profiler_logs
    from analysis.breakdown.attribution import load_average

    p = argparse.ArgumentParser(prog="python -m analysis.bench.attribution", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--iters", type=int, default=5, help="interleaved rounds of a plain and a profiled forward")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_profiler_logs()
    before = load_average()
    results = profile_all(args.models, args.batches, iters=3 if args.quick else args.iters,
                          warmup=1 if args.quick else args.warmup, device=args.device,
                          progress=lambda f, m: print(f"  [{f:4.0%}] {m}", file=sys.stderr, flush=True))
    after = load_average()
    print(format_table(results))
    missed = [b for b in results if not b.adds_up]
    loads = "n/a" if before is None else f"{before:.2f} before, {after:.2f} after"
    print(f"{len(results) - len(missed)} of {len(results)} within 10 %; {torch.get_num_threads()} threads on "
          f"{args.device}; 1-minute load average {loads} (a quiet machine has it well below its core count)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
