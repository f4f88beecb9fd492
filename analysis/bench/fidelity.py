"""Does the throughput harness measure what a plain timing loop measures?

    python -m analysis.bench.fidelity [--models deit_tiny_patch16_224 efficientvit_m0] [--batch 16] [--quick]

For each model, interleaved in one process: ``analysis.timing.harness.benchmark`` and an independent loop
(perf_counter around N forwards, synchronised). Prints both img/s and their ratio; they should agree within 10 %.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import torch

from analysis.timing.harness import BenchSettings, benchmark
from models.device import default_device, synchronize

MODELS = ("deit_tiny_patch16_224", "efficientvit_m0")
TOLERANCE = 0.10


def plain_loop_img_per_s(model, x: torch.Tensor, iters: int, device: str) -> float:
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        synchronize(device)
    return x.shape[0] * iters / (time.perf_counter() - start)


def measure(quick: bool = False, progress=None, models: Sequence[str] = MODELS, batch: int = 16,
            iters: int | None = None, repeats: int | None = None, device: str | None = None) -> list[dict]:
    """One figure per model: harness img/s over plain-loop img/s, medians of interleaved pairs."""
    from analysis.timing.runners import make_runner

    device = device or default_device()
    iters = iters or (2 if quick else 5)
    repeats = repeats or (3 if quick else 5)
    settings = BenchSettings(batch=batch, iters=iters, rounds=1, warmup=1 if quick else 2, device=device)
    figures = []
    for i, name in enumerate(models):
        runner = make_runner(name, device=device, random_weights=True)
        x = runner.make_inputs(batch)
        harness, loop = [], []
        for r in range(repeats):
            harness.append(benchmark([runner], settings)[0].img_per_s)
            loop.append(plain_loop_img_per_s(runner.forward, x, iters, device))
            if progress:
                progress((i + (r + 1) / repeats) / len(models), f"{name}: pair {r + 1}/{repeats}")
        h, l = statistics.median(harness), statistics.median(loop)
        figures.append({"figure": f"harness vs plain timing loop, {name}, batch {batch}", "value": h / l,
                        "unit": "ratio", "target": f"within {TOLERANCE * 100:.0f} %",
                        "passed": abs(h / l - 1) <= TOLERANCE,
                        "detail": f"{h:.1f} vs {l:.1f} img/s on {device}, median of {repeats} pairs of {iters} iters"})
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int)
    p.add_argument("--repeats", type=int, help="interleaved harness/loop pairs")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    figures = measure(args.quick, models=args.models, batch=args.batch, iters=args.iters, repeats=args.repeats,
                      device=args.device)
    for f in figures:
        print(f"{f['figure']:<60} ratio {f['value']:.3f} ({f['detail']})")
    worst = max(abs(f["value"] - 1) for f in figures)
    print(f"largest disagreement: {worst:.1%} ({'within' if worst <= TOLERANCE else 'OUTSIDE'} 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
