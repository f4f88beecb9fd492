"""Does the throughput harness measure what a plain timing loop measures?

    python -m analysis.bench_fidelity [--models deit_tiny_patch16_224 efficientvit_m0] [--batch 16]

For each model, interleaved in one process: ``analysis.throughput.benchmark`` and an independent loop
(perf_counter around N forwards, synchronised). Prints both img/s and their ratio; they should agree within 10 %.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from analysis.throughput import BenchSettings, benchmark
from models.device import default_device, synchronize
from analysis.throughput import make_runner


def plain_loop_img_per_s(model, x: torch.Tensor, iters: int, device: str) -> float:
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        synchronize(device)
    return x.shape[0] * iters / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench_fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "efficientvit_m0"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="interleaved harness/loop pairs")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = args.device or default_device()
    settings = BenchSettings(batch=args.batch, iters=args.iters, rounds=1, warmup=2, device=device)
    print(f"device={device}, batch={args.batch}, {args.repeats} interleaved pairs of {args.iters} iterations")
    worst = 0.0
    for name in args.models:
        runner = make_runner(name, device=device, random_weights=True)
        x = runner.make_inputs(args.batch)
        harness, loop = [], []
        for _ in range(args.repeats):
            harness.append(benchmark([runner], settings)[0].img_per_s)
            loop.append(plain_loop_img_per_s(runner.forward, x, args.iters, device))
        h, l = statistics.median(harness), statistics.median(loop)
        worst = max(worst, abs(h / l - 1))
        print(f"{name:<32} harness {h:9.1f} img/s   plain loop {l:9.1f} img/s   ratio {h / l:.3f}")
    print(f"largest disagreement: {worst:.1%} ({'within' if worst <= 0.10 else 'OUTSIDE'} 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
