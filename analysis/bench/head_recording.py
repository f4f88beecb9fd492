"""Cost of head-redundancy analysis relative to a plain forward of the same batch.

    python -m analysis.bench.head_recording [--model deit_small_patch16_224] [--batch 8] [--repeats 5]

Random-init weights and random images (the cost does not depend on them). Recording + metrics and the plain
forward are interleaved in one process, so drifting machine load hits both alike; medians are compared.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from analysis.head_redundancy import analyze_model
from analysis.timing.harness import time_call
from models.attention_recording import record_attention

TARGET = 2.0


def time_recording(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> dict[str, float]:
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


def measure(quick: bool = False, progress=None, model_name: str = "deit_small_patch16_224", batch: int = 8,
            repeats: int | None = None, img_size: int = 224, device: str | None = None) -> list[dict]:
    """One figure: recording + metrics over a plain forward (target <= 2x)."""
    import timm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeats = repeats or (3 if quick else 5)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=img_size).eval().to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    if progress:
        progress(0.1, f"{model_name}: timing {repeats} interleaved repeats")
    medians = time_recording(model, x, repeats)
    base = medians["plain forward"]
    ratio = medians["recording + metrics"] / base
    return [{"figure": f"head recording + metrics vs plain forward, {model_name}, batch {batch}", "value": ratio,
             "unit": "x", "target": f"<= {TARGET:g}x", "passed": ratio <= TARGET,
             "detail": ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in medians.items())
                       + f" on {device}, median of {repeats}"}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    figure = measure(model_name=args.model, batch=args.batch, repeats=args.repeats, img_size=args.img_size,
                     device=args.device)[0]
    print(f"{figure['figure']}: {figure['value']:.2f}x (target {figure['target']}); {figure['detail']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
