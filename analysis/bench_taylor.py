"""How much a Taylor-importance pass costs relative to a plain forward of the same batch.

    python -m analysis.bench_taylor [--model deit_small_patch16_224] [--batch 8] [--repeats 3]

Random-init weights (timing does not depend on them). Taylor and forward runs are interleaved in one
process so that both see the same machine state; the medians are compared.
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from analysis.taylor import taylor_importance
from analysis.throughput import time_call


@dataclass(frozen=True)
class TaylorTiming:
    model: str
    batch: int
    device: str
    forward_s: float  # median seconds of model(x) under inference_mode
    taylor_s: float  # median seconds of taylor_importance on the same batch (copy + forward + backward + products)

    @property
    def ratio(self) -> float:
        return self.taylor_s / self.forward_s


def time_taylor_vs_forward(model: nn.Module, x: torch.Tensor, repeats: int = 3, name: str = "") -> TaylorTiming:
    """Median time of ``taylor_importance`` on one batch and of a forward of it, interleaved, after a warm-up."""
    device = x.device

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def taylor() -> None:
        taylor_importance(model, [(x, None)])

    forward(), taylor()  # warm-up: allocator, kernels, lazy caches
    forward_times, taylor_times = [], []
    for _ in range(repeats):
        forward_times.append(time_call(forward, device))
        taylor_times.append(time_call(taylor, device))
    return TaylorTiming(name, x.shape[0], str(device), statistics.median(forward_times),
                        statistics.median(taylor_times))


def main(argv: list[str] | None = None) -> TaylorTiming:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(args.batch, *size, device=device)
    timing = time_taylor_vs_forward(model, x, args.repeats, args.model)
    print(f"{timing.model} batch {timing.batch} on {timing.device} (random weights): "
          f"forward {timing.forward_s * 1e3:.1f} ms, Taylor {timing.taylor_s * 1e3:.1f} ms, "
          f"ratio {timing.ratio:.2f}x (target <= 3.5x)")
    return timing


if __name__ == "__main__":
    main()
