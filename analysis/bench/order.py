"""Order independence: the same models timed alone, in two orders, in fresh and in "used" processes.

    python -m analysis.bench.order [--quick] [--rounds N]

A check that the timing harness cannot fool: EfficientViT-M5 and MobileNetV3-Large (BatchNorm fused, batch 16,
the speed-ups benchmark's pair) are timed in separate worker processes: each alone, both in either order,
and both again in a process that first ran the DeiT-S group (DeiT-S, DynamicViT rho 0.7, ToMe r = 13 at
batch 16, what the full benchmark runs before them). Every model's img/s must stay within 10 % across the
runs (max - min over the median) and M5's speed-up within 5 %. Every worker puts its allocator into the
harness's controlled state (``analysis.timing.env.control_allocator``), as every timing of the app does.

What is compared is the order, not one process's luck: each run is repeated in ``repeats`` fresh processes,
the runs interleaved round-robin (run 1, 2, ..., 6, then 1, 2, ... again), and a run's figure is the median over
its processes (``--quick``: one process per run). ``--threads 1`` times every worker on one torch thread: on a
shared two-core machine a second thread waits on whatever else runs.

A worker is ``python -m analysis.bench.order --worker SPEC`` (``analysis.timing.fresh_process``).
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable, Sequence

from analysis.timing.fresh_process import report_result, run_in_fresh_process

BASELINE, OTHER = "mobilenetv3_large_100", "efficientvit_m5"
LABELS = {BASELINE: "MobileNetV3-Large", OTHER: "EfficientViT-M5"}
USED_PRELUDE = ("deit_small_patch16_224", "dynamicvit_deit_small_patch16_224@rho=0.7",
                "deit_small_patch16_224@tome=13")
IMG_S_TARGET, SPEEDUP_TARGET = 0.10, 0.05


def settings_for(quick: bool, rounds: int | None = None, threads: int | None = None) -> dict:
    """Batch 16 like the speed-ups benchmark; more rounds than it, since a round-to-round spread is the point."""
    return {"batch": 16, "iters": 2 if quick else 3, "rounds": rounds or (5 if quick else 9), "warmup": 2,
            "threads": threads}


def repeats_for(quick: bool) -> int:
    """Fresh processes per run: the median of these is the run's figure."""
    return 1 if quick else 3


# ----------------------------------------------------------------------------------------------- worker side
def run_prelude(batch: int, forwards: int = 2) -> None:
    """What the full benchmark does before the MobileNetV3 group: the DeiT-S group's models at batch 16."""
    import torch

    from analysis.timing.runners import make_runner

    runners = [make_runner(name, random_weights=True) for name in USED_PRELUDE]
    with torch.inference_mode():
        for runner in runners:
            x = runner.make_inputs(batch)
            for _ in range(forwards):
                runner.forward(x)
    del runners


def faults_per_forward(runner, batch: int, forwards: int = 3) -> float:
    """Minor page faults per forward, after the timing (the allocator's steady state)."""
    import torch

    from analysis.timing.env import minor_faults

    x = runner.make_inputs(batch)
    with torch.inference_mode():
        runner.forward(x)
        before = minor_faults()
        for _ in range(forwards):
            runner.forward(x)
    return (minor_faults() - before) / forwards


def worker(spec: dict) -> dict:
    """Time ``spec['models']`` (interleaved, after the prelude when ``spec['used']``) in this process."""
    from analysis.timing.env import control_allocator

    allocator = control_allocator()  # before anything large is allocated
    import torch

    from analysis.timing.harness import BenchSettings, benchmark
    from analysis.timing.runners import ModelOptions, make_runner

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("used"):
        run_prelude(spec["batch"])
    torch.manual_seed(0)
    runners = [make_runner(name, random_weights=True, options=ModelOptions(fuse_bn=True)) for name in spec["models"]]
    settings = BenchSettings(batch=spec["batch"], iters=spec["iters"], rounds=spec["rounds"], warmup=spec["warmup"])
    baseline = BASELINE if BASELINE in spec["models"] and len(spec["models"]) > 1 else None
    rows = benchmark(runners, settings, baseline=baseline)
    faults = {r.name: faults_per_forward(r, spec["batch"]) for r in runners}
    return {"allocator": allocator, "environment": rows[0].environment,
            "rows": [{"model": r.model, "img_per_s": r.img_per_s, "rounds": r.rounds, "speedup": r.speedup,
                      "faults_per_forward": faults[r.model]} for r in rows]}


# ----------------------------------------------------------------------------------------------- parent side
def run_worker(spec: dict, env: dict[str, str] | None = None, timeout: float = 900) -> dict:
    """Run ``worker(spec)`` in a fresh Python process (with environment ``env``, default: this one's)."""
    return run_in_fresh_process("analysis.bench.order", spec, env=env, timeout=timeout)


RUNS = (  # (label, models in order, used)
    ("fresh, MobileNetV3 alone", (BASELINE,), False),
    ("fresh, M5 alone", (OTHER,), False),
    ("fresh, MobileNetV3 then M5", (BASELINE, OTHER), False),
    ("fresh, M5 then MobileNetV3", (OTHER, BASELINE), False),
    ("used, MobileNetV3 then M5", (BASELINE, OTHER), True),
    ("used, M5 then MobileNetV3", (OTHER, BASELINE), True),
)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart the same figure came out across runs."""
    return (max(values) - min(values)) / statistics.median(values)


def order_figures(results: dict[str, dict | list[dict]]) -> list[dict]:
    """Per model the img/s spread over every run, and M5's speed-up spread over the paired runs. A run given as a
    list of workers' results (the same run in several processes) counts with its median."""
    img_s: dict[str, dict[str, float]] = {BASELINE: {}, OTHER: {}}
    speedups: dict[str, float] = {}
    for label, result in results.items():
        workers = result if isinstance(result, list) else [result]
        rows = [row for worker_result in workers for row in worker_result["rows"]]
        for model in img_s:
            values = [row["img_per_s"] for row in rows if row["model"] == model]
            if values:
                img_s[model][label] = statistics.median(values)
        ratios = [row["speedup"] for row in rows if row["model"] == OTHER and row["speedup"] is not None]
        if ratios:
            speedups[label] = statistics.median(ratios)
    first = next(iter(results.values()))
    allocator = (first[0] if isinstance(first, list) else first)["allocator"]
    figures = []
    for model, values in img_s.items():
        s = spread(list(values.values()))
        figures.append({"figure": f"order independence: {LABELS[model]} img/s across {len(values)} runs",
                        "value": 100 * s, "unit": "%", "target": f"<= {IMG_S_TARGET:.0%}",
                        "passed": s <= IMG_S_TARGET,
                        "detail": "; ".join(f"{k} {v:.1f}" for k, v in values.items()) + f"; allocator: {allocator}"})
    s = spread(list(speedups.values()))
    figures.append({"figure": f"order independence: {LABELS[OTHER]} vs {LABELS[BASELINE]} speed-up across "
                              f"{len(speedups)} runs", "value": 100 * s, "unit": "%",
                    "target": f"<= {SPEEDUP_TARGET:.0%}", "passed": s <= SPEEDUP_TARGET,
                    "detail": "; ".join(f"{k} {v:.2f}x" for k, v in speedups.items())
                              + f"; BN fused, batch 16, each run in {len(first) if isinstance(first, list) else 1} "
                                "fresh process(es), the median"})
    return figures


def measure(quick: bool = False, progress: Callable[[float, str], None] | None = None,
            rounds: int | None = None, repeats: int | None = None, threads: int | None = None) -> list[dict]:
    settings = settings_for(quick, rounds, threads)
    repeats = repeats or repeats_for(quick)
    results: dict[str, list[dict]] = {label: [] for label, _, _ in RUNS}
    total = repeats * len(RUNS)
    for repeat in range(repeats):  # round-robin: a slow minute of the machine falls on every run alike
        for i, (label, models, used) in enumerate(RUNS):
            done = repeat * len(RUNS) + i
            if progress:
                progress(done / total, f"worker {done + 1}/{total}: {label}")
            results[label].append(run_worker(dict(settings, models=list(models), used=used)))
    return order_figures(results)


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.bench.suite import format_table

    p = argparse.ArgumentParser(prog="python -m analysis.bench.order", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--rounds", type=int, help="interleaved rounds per worker")
    p.add_argument("--repeats", type=int, help="fresh processes per run (default 1 with --quick, else 3)")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's own)")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        report_result(worker(json.loads(args.worker)))
        return 0
    print(format_table(measure(args.quick, rounds=args.rounds, repeats=args.repeats, threads=args.threads),
                       details=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
