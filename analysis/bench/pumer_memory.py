"""PuMer's memory claim on this machine: the peak memory of one forward without and with PuMer at the same batch.

    python -m analysis.bench.pumer_memory [--batch 8] [--models vilt_b32_vqa meter_clip16_288_vqa] [--kept-batch 1]

Random weights (memory does not depend on the weights' values), each registry model at its own input size (METER
576 px, the VQAv2 checkpoint's; ViLT 384 px). Two peaks per model (``analysis.timing.memory``): under
``inference_mode`` (what serving needs: one layer's activations alive at a time) at ``--batch``, and with autograd
on (every layer's activations kept, as in training or a forward outside no_grad) at ``--kept-batch``. The paper
reports 35-51 % less peak memory; the figures carry no pass/fail target. The paper's throughput protocol is
``python -m analysis.throughput --paper-protocol`` (README).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

from analysis.timing.memory import forward_peak_bytes, kept_activations_peak_bytes, memory_reduction
from models.device import default_device

MODELS = ("vilt_b32_vqa", "meter_clip16_288_vqa")
PAPER = "paper: 35-51 % less"


def peaks(name: str, batch: int, kept_batch: int | None, device: str) -> dict:
    """MiB of one forward of ``name`` and ``name@pumer`` (the paper's setting) at ``batch`` under inference, and
    with autograd on at ``kept_batch`` (None: not measured)."""
    from analysis.timing.runners import make_runner

    found: dict = {"inference": [], "kept": []}
    for text in (name, f"{name}@pumer"):
        runner = make_runner(text, device=device, random_weights=True)
        inputs = runner.make_inputs(batch)
        with torch.inference_mode():
            runner.forward(inputs)  # warm: one-time allocations do not count
            found["inference"].append(forward_peak_bytes(lambda inputs=inputs: runner.forward(inputs), device) / 2**20)
        del inputs
        if kept_batch:
            found["kept"].append(kept_activations_peak_bytes(runner.forward, runner.make_inputs(kept_batch),
                                                             device) / 2**20)
    return found


def _figure(name: str, what: str, batch: int, full: float, reduced: float, device: str) -> dict:
    saving = memory_reduction(full, reduced)
    return {"figure": f"PuMer peak memory reduction, {name}, {what}, batch {batch}", "value": 100 * saving,
            "unit": "%", "target": PAPER, "passed": None,
            "detail": f"{full:.1f} -> {reduced:.1f} MiB on {device} (one forward, net of weights and inputs)"}


def measure(quick: bool = False, progress=None, models: Sequence[str] | None = None, batch: int | None = None,
            kept_batch: int | None = 1, device: str | None = None) -> list[dict]:
    """One figure per model and mode: the reduction in %, with both peaks in the detail. ``quick``: ViLT only, batch
    2."""
    device = device or default_device()
    models = list(models or (MODELS[:1] if quick else MODELS))
    batch = batch or (2 if quick else 8)
    figures = []
    for i, name in enumerate(models):
        if progress:
            progress(i / len(models), f"{name}: peak memory at batch {batch}")
        found = peaks(name, batch, kept_batch, device)
        figures.append(_figure(name, "inference", batch, *found["inference"], device))
        if found["kept"]:
            figures.append(_figure(name, "autograd on", kept_batch, *found["kept"], device))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench.pumer_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=8, help="the batch of the inference peaks (default 8)")
    p.add_argument("--kept-batch", type=int, default=1, help="the batch of the autograd-on peaks; 0: skip them")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in measure(models=args.models, batch=args.batch, kept_batch=args.kept_batch or None, device=args.device,
                       progress=lambda f, m: print(f"  [{f:4.0%}] {m}", flush=True)):
        print(f"{row['figure']}: {row['value']:.1f} % less ({row['detail']}; {PAPER})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
