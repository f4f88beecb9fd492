"""How close do DynamicViT and ToMe come to the speed of their own token schedules?

    python -m analysis.bench.ceiling [--quick] [--device cpu]

The ceiling of a token-reduction method is its token schedule alone: the same backbone blocks run on the
same token counts, the tokens chosen for free (DynamicViT: the first k patches; ToMe: truncation), no
predictors, no matching. Everything is timed in interleaved rounds in one process (random weights; speed
does not depend on them): DeiT-S, DynamicViT-S at rho 0.7 and its schedule, ToMe r = 13 and its schedule.
A method's fraction is the median over rounds of (its img/s / its schedule's img/s), which equals its
speed-up over DeiT-S divided by the schedule's.
"""
from __future__ import annotations

import argparse
import functools
import statistics
from typing import Callable

import timm
import torch

from analysis.bench.suite import format_table
from analysis.timing.harness import BenchSettings, Runner, ThroughputRow, benchmark
from models.device import default_device, hardware_info
from models.dynamicvit import build_dynamicvit, dynamicvit_forward, dynamicvit_schedule_forward
from models.tome import tome_forward, tome_schedule_forward

DEIT = "deit_small_patch16_224"
DYNAMICVIT = "dynamicvit_deit_small_patch16_224"
KEEP_RATIO = 0.7
TOME_R = 13
CEILING_TARGET = 0.95
BATCHES = (16, 1)


def _settings(batch: int, quick: bool, device: str) -> BenchSettings:
    """Enough iterations per round that one round of a batch-1 runner is not a single noisy forward."""
    iters = (2 if quick else 3) if batch > 1 else (5 if quick else 10)
    rounds = 3 if quick else (7 if batch > 1 else 15)
    return BenchSettings(batch=batch, iters=iters, rounds=rounds, warmup=1 if quick else 2, device=device)


def build_runners(device: str) -> list[Runner]:
    """DeiT-S, DynamicViT-S (pruned and its schedule) and ToMe on DeiT-S (merging and its schedule)."""
    torch.manual_seed(0)
    deit = timm.create_model(DEIT).to(device).eval()
    dynamic = build_dynamicvit(DYNAMICVIT).to(device).eval()

    def make_inputs(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)

    def runner(name: str, forward: Callable, model: torch.nn.Module) -> Runner:
        return Runner(name=name, forward=forward, make_inputs=make_inputs,
                      params=sum(p.numel() for p in model.parameters()), weights="random")

    return [
        runner(DEIT, deit, deit),
        runner(f"{DYNAMICVIT}@rho={KEEP_RATIO}", functools.partial(dynamicvit_forward, dynamic, keep_ratio=KEEP_RATIO),
               dynamic),
        runner(f"{DYNAMICVIT} schedule only", functools.partial(dynamicvit_schedule_forward, dynamic,
                                                                keep_ratio=KEEP_RATIO), dynamic),
        runner(f"{DEIT}@tome={TOME_R}", functools.partial(tome_forward, deit, r=TOME_R), deit),
        runner(f"{DEIT} ToMe schedule only", functools.partial(tome_schedule_forward, deit, r=TOME_R), deit),
    ]


def _fraction(method: ThroughputRow, ceiling: ThroughputRow) -> float:
    return statistics.median(m / c for m, c in zip(method.rounds, ceiling.rounds))


def _gflops(row: ThroughputRow) -> str:
    return "n/a" if row.gflops is None else f"{row.gflops:.2f}"


def figures_for_batch(rows: list[ThroughputRow], batch: int) -> list[dict]:
    """The figures of one interleaved run: speed-ups over DeiT-S and fractions of the schedule ceilings."""
    deit, dynamic, dynamic_schedule, tome, tome_schedule = rows
    figures = []
    for method, ceiling, label, target in ((dynamic, dynamic_schedule, f"DynamicViT-S rho {KEEP_RATIO}", True),
                                           (tome, tome_schedule, f"ToMe r={TOME_R} on DeiT-S", False)):
        fraction = _fraction(method, ceiling)
        figures += [
            {"figure": f"{label} vs DeiT-S, batch {batch}", "value": round(method.speedup, 3), "unit": "x",
             "target": "", "passed": None,
             "detail": f"{method.img_per_s:.1f} vs {deit.img_per_s:.1f} img/s; "
                       f"{_gflops(deit)} -> {_gflops(method)} GFLOPs"},
            {"figure": f"{label} schedule only (ceiling) vs DeiT-S, batch {batch}",
             "value": round(ceiling.speedup, 3), "unit": "x", "target": "", "passed": None,
             "detail": f"{ceiling.img_per_s:.1f} img/s; {_gflops(ceiling)} GFLOPs"},
            {"figure": f"{label}: fraction of its schedule ceiling, batch {batch}", "value": round(fraction, 3),
             "unit": "ratio", "target": f">= {CEILING_TARGET}" if target else "",
             "passed": bool(fraction >= CEILING_TARGET) if target else None,
             "detail": f"median over {len(method.rounds)} interleaved rounds of the img/s ratio; "
                       f"speed-ups {method.speedup:.2f}x / {ceiling.speedup:.2f}x"},
        ]
    return figures


def measure(quick: bool = False, progress: Callable[[float, str], None] | None = None,
            device: str | None = None) -> list[dict]:
    """DynamicViT's and ToMe's speed-ups over DeiT-S next to their schedule ceilings, at batch 16 and batch 1."""
    device = device or default_device()
    runners = build_runners(device)
    figures = []
    for step, batch in enumerate(BATCHES):
        def report(fraction: float, message: str, step: int = step) -> None:
            if progress:
                progress((step + fraction) / len(BATCHES), f"batch {batch}: {message}")

        rows = benchmark(runners, _settings(batch, quick, device), baseline=DEIT, progress=report)
        figures += figures_for_batch(rows, batch)
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (well under a minute on 2 cores)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: fastest present)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (1 is steadier on a machine shared with other jobs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    hw = hardware_info()
    print(f"device={device} ({hw['gpu'] if device == 'cuda' else hw['cpu']}), threads={torch.get_num_threads()}, "
          f"random weights, interleaved rounds")
    print(format_table(measure(quick=args.quick, device=device), details=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
