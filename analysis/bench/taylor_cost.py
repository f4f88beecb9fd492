"""How much a Taylor-importance pass costs relative to a plain forward of the same batch.

    python -m analysis.bench.taylor_cost [--models deit_small_patch16_224 efficientvit_m0] [--batch 8] [--repeats 3]

Random-init weights (timing does not depend on them). Taylor and forward runs are interleaved in one
process so that both see the same machine state (the allocator in the harness's controlled state); the medians
are compared. A fast forward (EfficientViT-M0: about 27 ms at batch 8) is repeated within each sample until one
sample lasts at least ``MIN_SAMPLE_S``, so that clock resolution and scheduling jitter do not decide the ratio.
"""
from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from analysis.channel_importance import taylor_importance
from analysis.timing.harness import time_call
from analysis.timing.env import control_allocator

MODELS = ("deit_small_patch16_224", "efficientvit_m0")
TARGET = 3.5
MIN_SAMPLE_S = 0.25  # each timed sample of a forward lasts at least this long
MAX_CALLS = 20  # ... up to this many calls per sample


@dataclass(frozen=True)
class TaylorTiming:
    model: str
    batch: int
    device: str
    forward_s: float  # median seconds of model(x) under inference_mode
    taylor_s: float  # median seconds of taylor_importance on the same batch (copy + forward + backward + products)
    calls: int = 1  # calls of each per timed sample

    @property
    def ratio(self) -> float:
        return self.taylor_s / self.forward_s


def time_taylor_vs_forward(model: nn.Module, x: torch.Tensor, repeats: int = 3, name: str = "") -> TaylorTiming:
    """Median time of ``taylor_importance`` on one batch and of a forward of it, interleaved, after a warm-up;
    each sample repeats both calls ``calls`` times (enough for a forward sample of ``MIN_SAMPLE_S``)."""
    device = x.device
    control_allocator()

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def taylor() -> None:
        taylor_importance(model, [(x, None)])

    for _ in range(2):  # warm-up: allocator at its steady state, kernels, lazy caches
        forward(), taylor()
    calls = min(MAX_CALLS, max(1, math.ceil(MIN_SAMPLE_S / time_call(forward, device))))

    def repeated(fn):
        return lambda: [fn() for _ in range(calls)]

    forward_times, taylor_times = [], []
    for _ in range(repeats):
        forward_times.append(time_call(repeated(forward), device) / calls)
        taylor_times.append(time_call(repeated(taylor), device) / calls)
    return TaylorTiming(name, x.shape[0], str(device), statistics.median(forward_times),
                        statistics.median(taylor_times), calls)


def time_model(name: str, batch: int, repeats: int, device: str) -> TaylorTiming:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return time_taylor_vs_forward(model, torch.randn(batch, *size, device=device), repeats, name)


def measure(quick: bool = False, progress=None, models: Sequence[str] = MODELS, batch: int = 8,
            repeats: int | None = None, device: str | None = None) -> list[dict]:
    """One figure per model: Taylor importance over a forward of the same batch (target <= 3.5x)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeats = repeats or (3 if quick else 5)
    figures = []
    for i, name in enumerate(models):
        if progress:
            progress(i / len(models), f"{name}: timing {repeats} interleaved repeats")
        t = time_model(name, batch, repeats, device)
        figures.append({"figure": f"Taylor importance vs forward, {name}, batch {batch}", "value": t.ratio,
                        "unit": "x", "target": f"<= {TARGET:g}x", "passed": t.ratio <= TARGET,
                        "detail": f"forward {t.forward_s * 1e3:.0f} ms, Taylor {t.taylor_s * 1e3:.0f} ms on {device}, "
                                  f"median of {repeats} samples of {t.calls} call{'s' if t.calls > 1 else ''}"})
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    for f in measure(models=args.models, batch=args.batch, repeats=args.repeats, device=args.device):
        print(f"{f['figure']}: {f['value']:.2f}x (target {f['target']}); {f['detail']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
