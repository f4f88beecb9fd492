"""Cost of head-redundancy analysis relative to a plain forward of the same batch.

    python -m analysis.bench_head_redundancy [--model deit_small_patch16_224] [--batch 8] [--repeats 5]

Random-init weights and random images (the cost does not depend on them). Recording + metrics and the plain
forward are interleaved in one process, so drifting machine load hits both alike; medians are compared.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from analysis.head_redundancy import analyze_model
from analysis.throughput import time_call
from models.attention_recording import record_attention


def benchmark(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of a plain forward, a recording forward, and recording + all metrics, interleaved."""
    device = batch.device

    def plain():
        with torch.inference_mode():
            model(batch)

    runs = {
        "plain forward": plain,
        "recording forward": lambda: record_attention(model, batch),
        "recording + metrics": lambda: analyze_model(model, batch, "bench", chunk=batch.shape[0]),
    }
    for fn in runs.values():  # warm-up: imports, allocator, kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(time_call(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    import timm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval().to(args.device)
    batch = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    medians = benchmark(model, batch, args.repeats)
    base = medians["plain forward"]
    print(f"{args.model}, batch {args.batch}, {args.img_size}px, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"  {name:<22} {seconds * 1000:9.1f} ms   {seconds / base:5.2f}x")
    ratio = medians["recording + metrics"] / base
    print(f"ratio recording+metrics / plain forward: {ratio:.2f}x (target <= 2x)")
    return medians


if __name__ == "__main__":
    main()
