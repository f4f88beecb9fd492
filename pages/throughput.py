"""Live throughput: registry models and their token-reduction variants, timed on this machine."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from analysis.timing.engines import EAGER, ENGINES, refuse_batches
from analysis.provenance import RANDOM, label_rows
from analysis.timing.harness import PRECISIONS, BenchSettings, rows_to_records, spread_warnings
from analysis.timing.runners import ModelOptions
from analysis.throughput.figures import (accuracy_caption, accuracy_figure, engine_table, latency_figure,
                                         latency_table, live_figure, results_table)
from analysis.timing.env import environment_line
from analysis.timing.request import LATENCY, SWEEP, THROUGHPUT, TimingRefused, TimingRequest, run_in_fresh_process
from models.device import cpu_threads, device_hardware
from models.registry import REGISTRY
from models.variants import variant_groups
from pages._state import current_device, kept, latest_result, run_through_app, session_result
from pages._widgets import download_df, download_json, progress_bar, timm_model_names

SYNTHETIC_INPUT = "synthetic input (random tensor)"


def method_variants(models: list[str]) -> list[str]:
    """One multiselect per group of the method table's methods that apply to a picked model, and a checkbox for a
    group's paper setting; returns the variant names they ask for."""
    variants: list[str] = []
    for group in variant_groups(models):
        picked = kept(st.multiselect, f"{group.label}: {group.setting.label}", key=f"tp_{group.key}",
                      options=group.options, default=group.default, format_func=group.option_text, help=group.help)
        paper = bool(group.paper_targets) and kept(st.checkbox, f"{group.label} at the paper's setting",
                                                  key=f"tp_{group.label}_paper", default=True, help=group.paper_text)
        variants += group.variants(picked, paper)
    return variants


run_through_app()
st.title("Live throughput")
st.markdown(
    "Speed claims are made on someone else's V100. Here the models run on **this machine**, interleaved "
    "round by round in one process so that both sides of every speed-up see the same conditions; a fresh "
    "process for every run, so nothing this server ran before moves the figures. "
    "Timing does not depend on the weight values, so models run with random weights here."
)

device = current_device()
col_models, col_settings = st.columns([3, 2])
with col_models:
    models = kept(st.multiselect, "Models", key="tp_models", options=REGISTRY,
                  default=["deit_tiny_patch16_224", "efficientvit_m0", "mobilenetv3_large_100"])
    models += [n for n in timm_model_names("tp_timm", task=None) if n not in models]
    reduced = method_variants(models)
    extra = kept(st.text_input, "More variants (space separated, NAME@key=value)", key="tp_extra", default="",
                 help="e.g. deit_small_patch16_224@tome=decreasing:13  dynamicvit_deit_256_patch16_224@rho=0.6")
variants = list(dict.fromkeys(list(models) + reduced + extra.split()))
with col_models:
    baseline = kept(st.selectbox, "Baseline for speed-ups", key="tp_baseline", options=variants or ["(none)"])

with col_settings:
    toggle_latency, toggle_sweep = st.columns(2)
    latency_mode = kept(toggle_latency.toggle, "Batch-1 latency", key="tp_latency", default=False,
                                         help="One image per call: ms per image, median and p90 over the rounds.")
    sweep_mode = kept(toggle_sweep.toggle, "Batch sweep", key="tp_sweep", default=False, disabled=latency_mode)
    if latency_mode:
        sweep_mode, batches = False, [1]
        st.caption("Batch 1. The p90 is that of single calls with 1 timed iteration per round; it needs many rounds "
                   "(the CLI's `--latency` runs 20).")
    elif sweep_mode:
        batches = kept(st.multiselect, "Batch sizes", key="tp_batches", options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
                       default=[1, 8, 32])
    else:
        batches = [kept(st.number_input, "Batch size", 1, 1024, key="tp_batch", default=8)]
    on_gpu = device != "cpu"
    precision = kept(st.selectbox, "Precision", key="tp_precision", options=list(PRECISIONS) if on_gpu else ["fp32"],
                     help="fp16/bf16 autocast on GPU; CPU runs fp32.")
    chosen_engines = kept(st.multiselect, "Engines (timed interleaved in the same rounds)", key="tp_engines",
                          options=list(ENGINES), default=[EAGER.key], format_func=lambda k: ENGINES[k].label,
                          help="; ".join(f"{e.label}: {e.help}" for e in ENGINES.values()))
    iters = kept(st.number_input, "Timed iterations per round", 1, 1000, key="tp_iters", default=5)
    rounds = kept(st.number_input, "Interleaved rounds (median counts)", 1, 50, key="tp_rounds", default=3)
    channels_last = kept(st.checkbox, "channels_last", key="tp_channels_last", default=False)
    fuse_bn = kept(st.checkbox, "Fuse BatchNorm into convolutions (EfficientViT, MobileNetV3)", key="tp_fuse_bn",
                   default=False)
    threads = kept(st.number_input, "CPU threads", 1, max(1, cpu_threads() * 4), key="tp_threads",
                   default=cpu_threads(),
                   help="torch threads of the timing process (each run is timed in a fresh one).")

hardware = device_hardware(device)
options = ModelOptions(channels_last=channels_last, fuse_bn=fuse_bn)
settings = BenchSettings(batch=int(batches[0]), iters=int(iters), rounds=int(rounds),
                         warmup=max(2, int(iters) // 2), device=device, precision=precision)
mode = LATENCY if latency_mode else THROUGHPUT
request = (mode, tuple(chosen_engines), tuple(variants), baseline, tuple(int(b) for b in batches), sweep_mode, repr(settings), repr(options))
engine_refusal = refuse_batches(chosen_engines, sweep_mode and len(batches) > 1)
if engine_refusal:
    st.warning(engine_refusal)
run = st.button("Run benchmark", type="primary", disabled=not variants or not chosen_engines or bool(engine_refusal),
                key="tp_run")


def run_benchmark() -> dict:
    """Time every variant in a fresh worker process; the live chart and the progress bar update as rounds arrive."""
    live_chart = st.empty()
    measurements: list[dict] = []

    def on_measure(model: str, batch: int, round_index: int, img_per_s: float) -> None:
        measurements.append({"model": model, "batch": batch, "round": round_index, "img_per_s": img_per_s,
                             "ms": 1000.0 / img_per_s})
        frame = pd.DataFrame(measurements)
        live_chart.plotly_chart(latency_figure(frame) if latency_mode else live_figure(frame),
                                key=f"live-{len(measurements)}")

    timing = TimingRequest(tuple(variants), settings, options, baseline=baseline,
                           mode=LATENCY if latency_mode else SWEEP if sweep_mode else THROUGHPUT,
                           batches=tuple(int(b) for b in batches), engines=tuple(chosen_engines),
                           threads=int(threads))
    try:
        with st.status("Starting a fresh timing process ...", expanded=True) as status:
            show = progress_bar()

            def progress(fraction: float, message: str) -> None:
                status.update(label=f"Timing: {message}")
                show(fraction, message)

            timed = run_in_fresh_process(timing, progress=progress, on_measure=on_measure)
            timed_models = len({row.model for row in timed.rows})
            shapes = f"{timed_models} model{'s' if timed_models != 1 else ''}"
            if len(batches) > 1:
                shapes += f" x {len(batches)} batch sizes"
            status.update(label=f"Done: {len(measurements)} measurements ({shapes} x {int(rounds)} "
                                f"round{'s' if int(rounds) != 1 else ''}) on {device}", state="complete")
    except TimingRefused as exc:
        st.error(str(exc))
        st.stop()
    live_chart.empty()
    return {"mode": mode, "rows": timed.rows, "notes": timed.notes, "measurements": measurements,
            "hardware": hardware, "settings": vars(settings), "options": vars(options), "request": request,
            "baseline": baseline}


if run:
    session_result("throughput", time.time_ns(), run_benchmark)
stored = latest_result("throughput")
if stored is None:
    st.info("Pick models and press **Run benchmark**. Every round's result appears in the chart as it arrives.")
    st.stop()
result = stored[1]
shown = result["settings"]
if result["request"] != request:
    st.caption("Results of the last run; the settings above have changed since: press **Run benchmark** to "
               "time them.")
for note in result["notes"]:
    st.warning(note)
rounds_text = (f"{shown['rounds']} interleaved round{'s' if shown['rounds'] != 1 else ''} x {shown['iters']} "
               f"iteration{'s' if shown['iters'] != 1 else ''}")
environment = result["rows"][0].environment if result["rows"] else {}
provenance = {"weights": RANDOM, "image": SYNTHETIC_INPUT, "hardware": result["hardware"], "settings": shown,
              "options": result["options"], "environment": environment}
if environment:
    st.markdown(f"**Measured on** {environment_line(environment)}.")
for warning in spread_warnings(result["rows"]):
    st.warning(warning)


def _downloads(table, stem: str) -> None:
    """The shown table as CSV and the raw rows as JSON, both with their provenance."""
    d1, d2 = st.columns(2)
    with d1:
        download_df(label_rows(table, None, RANDOM, SYNTHETIC_INPUT), f"{stem}.csv")
    with d2:
        download_json(dict(provenance, rows=rows_to_records(result["rows"])), f"{stem}.json")


SPREAD_COLUMNS = {"speedup_q1": st.column_config.NumberColumn("speed-up Q1 (per-round ratios)", format="%.2fx"),
                  "speedup_q3": st.column_config.NumberColumn("speed-up Q3 (per-round ratios)", format="%.2fx")}


def show_engines() -> None:
    """With several engines: each variant's speed-up over eager and over the baseline in the same engine."""
    if len({row.environment.get("engine") for row in result["rows"]}) < 2:
        return
    st.subheader("Engines")
    table = engine_table(result["rows"], result.get("baseline"))
    st.dataframe(table, hide_index=True)
    st.caption("Each engine's runs were checked against eager PyTorch on the same input and timed in the same "
               "interleaved rounds; speed-ups are ratios of median rounds. The last column: does a token-reduction "
               "variant keep its speed-up over the baseline under that engine? A variant an engine refused is "
               "named above, with the reason.")
    download_df(table, "engines.csv", label="Engines table (CSV)")


def show_latency() -> None:
    table = latency_table(result["rows"])
    st.subheader("Batch-1 latency")
    st.caption(f"{shown['device']}, {shown['precision']}, batch 1, {rounds_text}; median and p90 of the rounds' "
               "ms per image; speed-up = the baseline's median ms / this median ms; the middle half of the per-round "
               "ratios lies between the speed-up's Q1 and Q3. Models run with random weights: timing does not "
               "depend on them.")
    st.dataframe(table, hide_index=True, column_config={
        "median_ms": st.column_config.NumberColumn("median ms", format="%.2f"),
        "p90_ms": st.column_config.NumberColumn("p90 ms", format="%.2f"),
        "speedup": st.column_config.NumberColumn("batch-1 speed-up (ratio of medians)", format="%.2fx"),
        **SPREAD_COLUMNS})
    st.plotly_chart(latency_figure(pd.DataFrame(result["measurements"])), key="tp_latency_chart")
    st.info("Token reduction often gains less at batch 1 on CPU than at larger batches: one image leaves the "
            "matrix products too small to keep the cores busy, so dropping tokens saves less time, while the "
            "methods' own work (matching, top-k, gathers) and the per-call overhead stay. Compare with a "
            "throughput run at batch 8 or more.")
    _downloads(table, "latency")


def show_throughput() -> None:
    table = results_table(result["rows"], hardware=result["hardware"])
    st.subheader("Results")
    st.caption(f"{shown['device']}, {shown['precision']}, {rounds_text}; img/s = the median round; "
               "speed-up = img/s / the baseline's img/s (the same medians); the middle half of the rounds (or of "
               "the per-round ratios) lies between Q1 and Q3. "
               "GFLOPs count 2 per multiply-add (papers' 'FLOPs' are half). A paper's claim is compared only on "
               "the hardware it was measured on; otherwise it is marked not comparable.")
    st.dataframe(table, hide_index=True, column_config={
        "img_per_s": st.column_config.NumberColumn("img/s (median round)", format="%.1f"),
        "speedup": st.column_config.NumberColumn("speed-up (ratio of median img/s)", format="%.2fx"),
        "img_per_s_q1": st.column_config.NumberColumn("img/s Q1", format="%.1f"),
        "img_per_s_q3": st.column_config.NumberColumn("img/s Q3", format="%.1f"), **SPREAD_COLUMNS})
    st.plotly_chart(live_figure(pd.DataFrame(result["measurements"])), key="tp_rounds_chart")
    st.plotly_chart(accuracy_figure(table), key="tp_accuracy_chart")
    st.caption(accuracy_caption(table) + " Models run with random weights: timing does not depend on them.")
    _downloads(table, "throughput")


if result["mode"] == LATENCY:
    show_latency()
else:
    show_throughput()
show_engines()
