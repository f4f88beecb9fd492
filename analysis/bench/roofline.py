"""Is this machine's roofline repeatable? Its limits measured twice in a row, side by side, and their ratio.

    python -m analysis.bench.roofline [--device cpu] [--precision fp32] [--threads N] [--quick]

Each measurement is ``analysis.timing.roofline.measure_roofline`` (the one the breakdown caches), with its
conditions (when, threads, load average, other processes' CPU use); nothing is read from or written to the
cache. The target: the second within 10 % of the first, for the matmul peak and for the copy bandwidth, on a
quiet machine (a measurement under load says so in the detail). Also printed: the measured peak as a share of
the hardware's own peak.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from analysis.bench.suite import format_table
from analysis.timing.roofline import BUDGET_S, Roofline, measure_roofline
from models.device import default_device

TOLERANCE = 0.10


def _load(roof: Roofline) -> str:
    return f"under load: {roof.under_load}" if roof.under_load else "quiet"


def figures(first: Roofline, second: Roofline) -> list[dict]:
    """Ratio rows (second / first) for the peak and the bandwidth, and the peak against the hardware's."""
    rows = []
    for what, attr, unit in (("matmul peak", "peak_gflops", "GFLOP/s"), ("copy bandwidth", "bandwidth_gbs", "GB/s")):
        a, b = getattr(first, attr), getattr(second, attr)
        ratio = b / a if a else None
        rows.append({"figure": f"roofline {what}: second / first measurement", "unit": "ratio",
                     "value": None if ratio is None else round(ratio, 3), "target": f"within {TOLERANCE:.0%}",
                     "passed": None if ratio is None else bool(abs(ratio - 1) <= TOLERANCE),
                     "detail": f"{a:.1f} then {b:.1f} {unit} ({_load(first)}; {_load(second)})"})
    for n, roof in enumerate((first, second), 1):
        share = roof.peak_gflops / roof.hardware_peak_gflops * 100 if roof.hardware_peak_gflops else None
        rows.append({"figure": f"roofline measurement {n}: matmul peak / hardware peak", "unit": "%",
                     "value": share, "target": "", "passed": None,
                     "detail": f"{roof.peak_gflops:.1f} GFLOP/s of {roof.hardware_peak_how}"})
    return rows


def measure(quick: bool = False, progress: Callable[[float, str], None] | None = None, device: str | None = None,
            precision: str = "fp32", print_each: bool = False) -> list[dict]:
    device = device or default_device()
    roofs = []
    for n in (0, 1):
        def report(fraction: float, message: str, n: int = n) -> None:
            if progress:
                progress((n + fraction) / 2, f"measurement {n + 1}: {message}")

        roofs.append(measure_roofline(device, precision, budget_s=BUDGET_S / 2 if quick else BUDGET_S,
                                      progress=report))
        if print_each:
            print(f"measurement {n + 1}:\n  " + "\n  ".join(roofs[-1].summary_lines()), flush=True)
    return figures(*roofs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: fastest present)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quick", action="store_true", help="half the time budget per measurement")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(quick=args.quick, device=args.device, precision=args.precision, print_each=True)
    print(format_table(rows, details=True))
    return 1 if any(r["passed"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
