"""Root cause of history-dependent CPU timings: the memory allocator, measured.

    python -m analysis.bench.allocator [--quick] [--allocators default mallopt ...]

MobileNetV3-Large and EfficientViT-M5 (BN fused, batch 16, interleaved) in a fresh worker process and in a
"used" one (after the DeiT-S group, as inside the full benchmark), under each allocator: glibc as it comes
(``default``), the issue's MALLOC_* variables (``malloc-env``), the harness's ``mallopt`` control, and
jemalloc and tcmalloc preloaded where Debian's libraries are installed (a missing one is said so). Per run:
img/s and minor page faults per forward (``getrusage``). The page-fault count does not depend on how loaded
the machine is; img/s does.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

from analysis.bench.order import BASELINE, LABELS, OTHER, run_worker, settings_for
from analysis.timing.env import PRELOADABLE, allocator_env

ALLOCATORS = ("default", "malloc-env", "mallopt", "jemalloc", "tcmalloc")
CONTROLLED = "mallopt"  # the harness's own state: fresh and used processes must agree
FAULTS_TARGET = 100  # page faults per forward once warm, controlled allocator


def allocator_figures(allocator: str, fresh: dict, used: dict) -> list[dict]:
    rows = {state: {r["model"]: r for r in result["rows"]} for state, result in (("fresh", fresh), ("used", used))}
    figures = []
    for model in (BASELINE, OTHER):
        f, u = rows["fresh"][model], rows["used"][model]
        faults = max(f["faults_per_forward"], u["faults_per_forward"])
        controlled = allocator == CONTROLLED
        figures.append({
            "figure": f"allocator {allocator}: {LABELS[model]} page faults per forward, fresh / used process",
            "value": faults, "unit": "", "target": f"<= {FAULTS_TARGET}" if controlled else "",
            "passed": faults <= FAULTS_TARGET if controlled else None,
            "detail": f"{f['faults_per_forward']:.0f} / {u['faults_per_forward']:.0f} minor faults per forward; "
                      f"{f['img_per_s']:.1f} / {u['img_per_s']:.1f} img/s; {fresh['allocator']}"})
    f_speedup, u_speedup = rows["fresh"][OTHER]["speedup"], rows["used"][OTHER]["speedup"]
    figures.append({"figure": f"allocator {allocator}: {LABELS[OTHER]} vs {LABELS[BASELINE]}, used / fresh process",
                    "value": u_speedup / f_speedup, "unit": "ratio", "target": "", "passed": None,
                    "detail": f"speed-up {f_speedup:.2f}x fresh, {u_speedup:.2f}x used"})
    return figures


def measure(quick: bool = False, progress: Callable[[float, str], None] | None = None,
            allocators: Sequence[str] = ALLOCATORS) -> list[dict]:
    settings = dict(settings_for(quick), rounds=3 if quick else 5, models=[BASELINE, OTHER])
    figures = []
    for i, allocator in enumerate(allocators):
        env = allocator_env(allocator)
        if env is None:
            figures.append({"figure": f"allocator {allocator}", "value": None, "unit": "", "target": "",
                            "passed": None, "detail": f"not installed here ({PRELOADABLE[allocator]} is missing; "
                                                      f"Debian: apt-get install libjemalloc2 libtcmalloc-minimal4)"})
            continue
        results = {}
        for used in (False, True):
            if progress:
                progress((i + used / 2) / len(allocators), f"{allocator}, {'used' if used else 'fresh'} process")
            results[used] = run_worker(dict(settings, used=used), env=env)
        figures += allocator_figures(allocator, results[False], results[True])
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    from analysis.bench.suite import format_table

    p = argparse.ArgumentParser(prog="python -m analysis.bench.allocator", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    args = p.parse_args(argv)
    for allocator in args.allocators:  # one table per allocator as it finishes: each takes minutes
        print(format_table(measure(args.quick, allocators=[allocator]), details=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
