"""Benchmark: the frontier task's cost against the sum of its settings' plain forwards (target: at most 1.2x).

One pass of ``FrontierTask.update`` runs the unreduced model once and each reducing setting once; the reference
is the same forwards called one after the other with nothing else. Interleaved rounds in one process, random
DeiT-S weights (timing does not depend on the values), ``python -m analysis.bench.frontier [--quick]``.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

from analysis.data.folders import NO_LABEL
from analysis.runs.frontier import FrontierSetting, FrontierTask, _is_neutral, setting_forward
from analysis.timing.harness import time_call
from models.loading import load_model

TARGET = 1.2
SETTINGS = ["unreduced", "tome=4", "tome=8", "tome=13", "tome=16", "rho=0.7:untrained", "rho=0.5:untrained"]


def measure(quick: bool = False, progress: Callable[[float, str], None] | None = None) -> list[dict]:
    model_name = "deit_tiny_patch16_224" if quick else "deit_small_patch16_224"
    batch, rounds = (4, 3) if quick else (16, 5)
    loaded = load_model(model_name, random_weights=True)
    settings = [FrontierSetting.parse(t) for t in SETTINGS]
    task = FrontierTask(loaded.model, model_name, settings)
    forwards = [loaded.model] + [setting_forward(loaded.model, model_name, s) for s in settings if not _is_neutral(s)]
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.full((batch,), NO_LABEL)

    def plain() -> None:
        with torch.inference_mode():
            for forward in forwards:
                forward(images)

    task.update(images, labels)  # warm-up
    plain()
    ratios = []
    for r in range(rounds):
        task_s = time_call(lambda: task.update(images, labels), "cpu")
        plain_s = time_call(plain, "cpu")
        ratios.append(task_s / plain_s)
        if progress:
            progress((r + 1) / rounds, f"frontier round {r + 1}/{rounds}")
    ratio = statistics.median(ratios)
    return [{"figure": f"frontier task vs its settings' plain forwards ({model_name}, {len(settings)} settings, "
                       f"batch {batch})", "value": round(ratio, 3), "unit": "ratio", "target": f"<= {TARGET}",
             "passed": ratio <= TARGET,
             "detail": f"{len(forwards)} forwards per batch; per-round ratios " + ", ".join(f"{x:.3f}" for x in ratios)}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.bench.frontier", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for row in measure(args.quick):
        print(f"{row['figure']}: {row['value']:.3f}x the cost (target {row['target']}; {row['detail']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
