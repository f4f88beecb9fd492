"""The speed-ups the README reports, at their batch and at batch 1, each group interleaved in one process.

    python -m analysis.bench.speedups [--quick] [--device cpu]

DynamicViT-DeiT-S (rho 0.7) and ToMe (r = 13; the full run adds r = 4, 8, 16 and decreasing:13) against
DeiT-S at batch 16; ViLT + PuMer against ViLT at batch 8; EfficientViT-M5 (the full run adds M0..M4)
against MobileNetV3-Large with BatchNorm fused, at batch 16. The full run adds DynamicViT's zoo (ConvNeXt-T,
Swin-T, LV-ViT-S at rho 0.7 against their backbones, batch 16) and METER + PuMer against METER (batch 8). Random weights (timing does not depend on
them). Every group is also timed at batch 1 (``analysis.timing.harness.latency``); batch 1 has no target.
Each group runs in its own fresh worker process (``analysis.timing.fresh_process``; ``--in-process`` to run them all in
this one), so a group's figures are the same inside the full benchmark and alone.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from analysis.bench.suite import format_table
from analysis.timing.fresh_process import report_progress, report_result, run_in_fresh_process
from analysis.timing.harness import BenchSettings, LatencyRow, ThroughputRow, benchmark, latency
from models.device import default_device

FEWER_FLOPS_TARGET = 0.30  # DynamicViT rho 0.7: at least 30 % fewer FLOPs than DeiT-S


@dataclass(frozen=True)
class Comparison:
    label: str  # what the table calls the model, e.g. "DynamicViT-DeiT-S rho 0.7"
    model: str  # variant name for models.variants.make_runner
    target: float | None = None  # least speed-up at the group's batch on CPU; None: reported only
    gpu_target: float | None = None  # the same on a GPU, where the issue gives one
    paper: str = ""
    full_only: bool = False  # timed only outside --quick
    fewer_flops_target: float | None = None  # a token-pruning model: report its FLOP saving (with this target)
    reports_flops: bool = False
    # The target as a fraction of the FLOP bound (baseline / model FLOPs) measured in the same run (METER + PuMer:
    # only the fusion blocks shrink, so the bound is far below the paper's whole-model figure).
    flop_bound_fraction: float | None = None


@dataclass(frozen=True)
class Group:
    """Models timed together, interleaved, against one baseline."""

    baseline_label: str
    baseline: str
    batch: int
    comparisons: tuple[Comparison, ...]
    fuse_bn: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    full_only: bool = False  # the whole group is timed only outside --quick
    input_size: int | None = None  # one of the entry's input_sizes (METER); None: its default


GROUPS = (
    Group("DeiT-S", "deit_small_patch16_224", 16, (
        Comparison("DynamicViT-DeiT-S rho 0.7", "dynamicvit_deit_small_patch16_224@rho=0.7", 1.62,
                   paper="paper +43-54 % throughput (GPU)", fewer_flops_target=FEWER_FLOPS_TARGET, reports_flops=True),
        Comparison("ToMe DeiT-S r = 13", "deit_small_patch16_224@tome=13", 1.6, paper="paper 1.64x (V100)"),
        *(Comparison(f"ToMe DeiT-S r = {r}", f"deit_small_patch16_224@tome={r}", full_only=True)
          for r in ("4", "8", "16", "decreasing:13")),
    )),
    Group("ViLT-B/32", "vilt_b32_vqa", 8, (
        Comparison("ViLT-B/32 + PuMer", "vilt_b32_vqa@pumer", 1.5, gpu_target=1.7, paper="paper 1.7-2x (GPU)"),
    ), notes=("384 px, 11-token question",)),
    Group("MobileNetV3-Large", "mobilenetv3_large_100", 16, (
        Comparison("EfficientViT-M5", "efficientvit_m5", paper="paper 1.45x (Xeon CPU)"),
        *(Comparison(f"EfficientViT-M{i}", f"efficientvit_m{i}", full_only=True) for i in range(5)),
    ), fuse_bn=True, notes=("BN fused",)),
    # DynamicViT's zoo (T-PAMI extension): no speed target in the issue; FLOPs against the paper's multiply-adds.
    Group("ConvNeXt-T", "convnext_tiny", 16, (
        Comparison("DynamicCNN ConvNeXt-T rho 0.7", "dynamiccnn_convnext_tiny@rho=0.7", reports_flops=True,
                   paper="paper 4.5 -> 3.6 G multiply-adds"),
    ), full_only=True),
    Group("Swin-T", "swin_tiny_patch4_window7_224", 16, (
        Comparison("DynamicSwin-T rho 0.7", "dynamicswin_tiny@rho=0.7", reports_flops=True,
                   paper="paper 4.5 -> 4.0 G multiply-adds"),
    ), full_only=True),
    Group("LV-ViT-S (unpruned)", "dynamicvit_lvvit_s", 16, (
        Comparison("DynamicViT-LV-ViT-S rho 0.7", "dynamicvit_lvvit_s@rho=0.7", reports_flops=True,
                   paper="paper 6.6 -> 4.6 G multiply-adds"),
    ), full_only=True),
    # METER's checkpoint runs at 576 px; the CPU benchmark keeps 288 px (a quarter of the image tokens), where
    # the FLOP bound at PuMer's setting is about the same (1.42-1.44x); 576 px is timed at batch 2 and reported.
    Group("METER", "meter_clip16_288_vqa", 8, (
        Comparison("METER + PuMer", "meter_clip16_288_vqa@pumer", reports_flops=True, flop_bound_fraction=0.9,
                   paper="paper 1.8-2x (GPU); PuMer reduces only the 6 fusion blocks"),
    ), notes=("288 px, 11-token question",), full_only=True, input_size=288),
    Group("METER", "meter_clip16_288_vqa", 2, (
        Comparison("METER + PuMer", "meter_clip16_288_vqa@pumer", reports_flops=True,
                   paper="the checkpoint's fine-tuned size"),
    ), notes=("576 px, 11-token question",), full_only=True, input_size=576),
)


def batch_settings(quick: bool, batch: int, device: str) -> BenchSettings:
    if quick:
        return BenchSettings(batch=batch, iters=1, rounds=3, warmup=1, device=device)
    return BenchSettings(batch=batch, iters=3, rounds=5, warmup=2, device=device)


def latency_settings(quick: bool, device: str) -> BenchSettings:
    return BenchSettings(batch=1, iters=1, rounds=10 if quick else 30, warmup=2 if quick else 3, device=device)


def _runners(group: Group, comparisons: list[Comparison], device: str) -> list:
    """One runner per model; variants of the same registry model share one loaded model."""
    from analysis.timing.runners import ModelOptions, make_runner
    from models.loading import load_model
    from models.variants import parse_variant

    loaded: dict[str, object] = {}
    runners = []
    for name in [group.baseline] + [c.model for c in comparisons]:
        model = parse_variant(name).model
        if model not in loaded:
            torch.manual_seed(0)
            loaded[model] = load_model(model, device=device, random_weights=True, input_size=group.input_size)
        runners.append(make_runner(name, loaded=loaded[model], options=ModelOptions(fuse_bn=group.fuse_bn)))
    return runners


def _gflops(row: ThroughputRow) -> str:
    return "n/a" if row.gflops is None else f"{row.gflops:.2f}"


def group_figures(group: Group, comparisons: list[Comparison], rows: list[ThroughputRow],
                  lat: list[LatencyRow], device: str) -> list[dict]:
    by_model = {r.model: r for r in rows}
    lat_by_model = {r.model: r for r in lat}
    base, base_lat = by_model[group.baseline], lat_by_model[group.baseline]
    suffix = "".join(f", {n}" for n in group.notes)
    on_gpu = torch.device(device).type == "cuda"
    figures = []
    for c in comparisons:
        row, one = by_model[c.model], lat_by_model[c.model]
        target = c.gpu_target if on_gpu and c.gpu_target else c.target
        if c.flop_bound_fraction and row.gflops and base.gflops:
            target = round(c.flop_bound_fraction * base.gflops / row.gflops, 2)
        detail = f"{row.img_per_s:.1f} vs {base.img_per_s:.1f} img/s; {_gflops(base)} -> {_gflops(row)} GFLOPs"
        figures.append({"figure": f"{c.label} vs {group.baseline_label}{suffix}, batch {group.batch}",
                        "value": row.speedup, "unit": "x", "target": f">= {target:g}x" if target else "",
                        "passed": None if target is None else row.speedup >= target,
                        "detail": detail + (f"; {c.paper}" if c.paper else "")})
        figures.append({"figure": f"{c.label} vs {group.baseline_label}{suffix}, batch 1",
                        "value": one.speedup, "unit": "x", "target": "", "passed": None,
                        "detail": f"median {one.median_ms:.1f} vs {base_lat.median_ms:.1f} ms, "
                                  f"p90 {one.p90_ms:.1f} vs {base_lat.p90_ms:.1f} ms"})
        if c.reports_flops and row.gflops and base.gflops:
            fewer, goal = 1 - row.gflops / base.gflops, c.fewer_flops_target
            figures.append({"figure": f"{c.label} FLOPs vs {group.baseline_label}", "value": 100 * fewer, "unit": "%",
                            "target": f">= {goal * 100:.0f} % fewer" if goal else "",
                            "passed": None if goal is None else fewer >= goal,
                            "detail": f"{_gflops(base)} -> {_gflops(row)} GFLOPs per image (2 FLOPs per multiply-add)"
                                      + (f"; {c.paper}" if c.paper else "")})
    return figures


def time_group(index: int, quick: bool, device: str, progress: Callable[[float, str], None] | None = None) -> list[dict]:
    """The figures of ``GROUPS[index]``, timed in this process."""
    group = GROUPS[index]
    comparisons = [c for c in group.comparisons if not (quick and c.full_only)]

    def step(message: str, fraction: float, offset: float = 0.0, share: float = 1.0) -> None:
        if progress:
            progress(offset + share * fraction, message)

    step("loading models", 0.0)
    runners = _runners(group, comparisons, device)
    rows = benchmark(runners, batch_settings(quick, group.batch, device), baseline=group.baseline,
                     progress=lambda f, m: step(f"batch {group.batch}, {m}", f, share=0.7))
    lat = latency(runners, latency_settings(quick, device), baseline=group.baseline,
                  progress=lambda f, m: step(f"batch 1, {m}", f, offset=0.7, share=0.3))
    return group_figures(group, comparisons, rows, lat, device)


def measure(quick: bool = False, progress: Callable[[float, str], None] | None = None,
            device: str | None = None, isolate: bool = True) -> list[dict]:
    """Every group's speed-ups at its batch (with targets) and at batch 1 (reported). With ``isolate`` (the
    default) each group is timed in a fresh worker process, so no group's figures depend on the groups before it."""
    device = device or default_device()
    figures = []
    indices = [i for i, g in enumerate(GROUPS) if not (quick and g.full_only)]
    for done, index in enumerate(indices):
        label = f"{GROUPS[index].baseline_label} group"

        def step(fraction: float, message: str, done=done, label=label) -> None:
            if progress:
                progress((done + fraction) / len(indices), f"{label}: {message}")

        if isolate:
            figures += run_in_fresh_process("analysis.bench.speedups",
                                            {"group": index, "quick": quick, "device": device}, progress=step)
        else:
            figures += time_group(index, quick, device, step)
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.bench.speedups", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, headline models only")
    p.add_argument("--device", default=None)
    p.add_argument("--in-process", action="store_true",
                   help="time every group in this process instead of one fresh process per group")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        from analysis.timing.env import control_allocator

        control_allocator()  # before the group's models are built
        spec = json.loads(args.worker)
        report_result(time_group(spec["group"], spec["quick"], spec["device"], report_progress))
        return 0
    print(format_table(measure(args.quick, device=args.device, isolate=not args.in_process), details=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
