"""Live throughput: registry models and their token-reduction variants, timed on this machine."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st
import torch

from analysis.provenance import RANDOM, label_rows
from analysis.throughput import PRECISIONS, BenchSettings, ModelOptions, benchmark, make_runner, rows_to_records, sweep
from analysis.throughput_figures import accuracy_figure, live_figure, results_table
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.registry import DYNAMICVIT, MHSA, REGISTRY
from models.variants import parse_variant
from pages._ui import (cached_model, current_device, download_df, download_json, follow_options, latest_result,
                       progress_bar, run_through_app, session_result)

SYNTHETIC_INPUT = "synthetic input (random tensor)"

run_through_app()
st.title("Live throughput")
st.markdown(
    "Speed claims are made on someone else's V100. Here the models run on **this machine**, interleaved "
    "round by round in one process so that both sides of every speed-up see the same conditions. "
    "Timing does not depend on the weight values, so models run with random weights here."
)

device = current_device()
col_models, col_settings = st.columns([3, 2])
with col_models:
    models = st.multiselect("Models", list(REGISTRY), key="tp_models",
                            default=["deit_tiny_patch16_224", "efficientvit_m0", "mobilenetv3_large_100"])
    vit_models = [m for m in models if REGISTRY[m].family == MHSA]
    dyn_models = [m for m in models if REGISTRY[m].family == DYNAMICVIT]
    tome_rs = st.multiselect("ToMe merge r per layer (applied to the ViT/DeiT models above)",
                             list(range(1, 25)), default=[], disabled=not vit_models)
    rhos = st.multiselect("DynamicViT keep ratio rho (applied to the DynamicViT models above)",
                          [0.5, 0.6, 0.7, 0.8, 0.9], default=[0.7] if dyn_models else [], disabled=not dyn_models)
    pumer = st.checkbox("ViLT + PuMer at the paper's setting (layers 2, 5, 8; prune 0.1, merge 0.3 / 0.2)",
                        value="vilt_b32_vqa" in models, disabled="vilt_b32_vqa" not in models)
    extra = st.text_input("More variants (space separated, NAME@key=value)", "",
                          help="e.g. deit_small_patch16_224@tome=decreasing:13  dynamicvit_deit_256_patch16_224@rho=0.6")
variants = list(models)
variants += [f"{m}@tome={r}" for m in vit_models for r in tome_rs]
variants += [f"{m}@rho={rho}" for m in dyn_models for rho in rhos]
variants += ["vilt_b32_vqa@pumer"] if pumer and "vilt_b32_vqa" in models else []
variants += extra.split()
with col_models:
    follow_options("tp_baseline", variants)
    baseline = st.selectbox("Baseline for speed-ups", variants or ["(none)"], key="tp_baseline")

with col_settings:
    sweep_mode = st.toggle("Batch sweep", value=False)
    if sweep_mode:
        batches = st.multiselect("Batch sizes", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512], default=[1, 8, 32])
    else:
        batches = [st.number_input("Batch size", 1, 1024, 8, key="tp_batch")]
    on_gpu = device != "cpu"
    precision = st.selectbox("Precision", list(PRECISIONS) if on_gpu else ["fp32"],
                             help="fp16/bf16 autocast on GPU; CPU runs fp32.")
    iters = st.number_input("Timed iterations per round", 1, 1000, 5, key="tp_iters")
    rounds = st.number_input("Interleaved rounds (median counts)", 1, 50, 3, key="tp_rounds")
    channels_last = st.checkbox("channels_last", value=False, key="tp_channels_last")
    fuse_bn = st.checkbox("Fuse BatchNorm into convolutions (EfficientViT, MobileNetV3)", value=False)
    compile_model = st.checkbox("torch.compile (slow first run)", value=False)
    threads = st.number_input("CPU threads", 1, max(1, torch.get_num_threads() * 4), torch.get_num_threads(),
                              help="Process-wide: other sessions share it while this runs.")

hardware = torch.cuda.get_device_name() if device.startswith("cuda") else device
options = ModelOptions(channels_last=channels_last, fuse_bn=fuse_bn, compile=compile_model)
settings = BenchSettings(batch=int(batches[0]), iters=int(iters), rounds=int(rounds),
                         warmup=max(2, int(iters) // 2), device=device, precision=precision)
request = (tuple(variants), baseline, tuple(int(b) for b in batches), sweep_mode, repr(settings), repr(options))
run = st.button("Run benchmark", type="primary", disabled=not variants, key="tp_run")


def run_benchmark() -> dict:
    """Time every variant; the live chart and the progress bar update as rounds arrive."""
    live_chart = st.empty()
    measurements: list[dict] = []

    def on_measure(model: str, batch: int, round_index: int, img_per_s: float) -> None:
        measurements.append({"model": model, "batch": batch, "round": round_index, "img_per_s": img_per_s})
        live_chart.plotly_chart(live_figure(pd.DataFrame(measurements)), key=f"live-{len(measurements)}")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with st.status("Benchmarking ...", expanded=True) as status:
            show = progress_bar()
            runners = []
            for index, text in enumerate(variants):
                status.update(label=f"Preparing {index + 1}/{len(variants)}: {text}")
                variant = parse_variant(text)
                loaded = cached_model(variant.model, random_weights=True)
                if loaded is None:
                    st.stop()
                runners.append(make_runner(text, device=device, loaded=loaded, options=options))

            def progress(first, second) -> None:
                # (fraction, message); analysis.throughput of this version still calls (message, fraction).
                fraction, message = (first, second) if isinstance(first, (int, float)) else (second, first)
                message = f"Timing {message}"
                status.update(label=message)
                show(fraction, message)

            if sweep_mode:
                rows, notes = sweep(runners, settings, [int(b) for b in batches], baseline=baseline,
                                    progress=progress, on_measure=on_measure)
            else:
                rows, notes = benchmark(runners, settings, baseline=baseline, progress=progress,
                                        on_measure=on_measure), []
            shapes = f"{len(runners)} model{'s' if len(runners) != 1 else ''}"
            if len(batches) > 1:
                shapes += f" x {len(batches)} batch sizes"
            status.update(label=f"Done: {len(measurements)} measurements ({shapes} x {int(rounds)} "
                                f"round{'s' if int(rounds) != 1 else ''}) on {device}", state="complete")
    except (KeyError, ValueError, WeightsNotFoundError, CheckpointError) as exc:
        st.error(str(exc.args[0] if exc.args else exc))
        st.stop()
    finally:
        torch.set_num_threads(previous_threads)
    live_chart.empty()
    return {"rows": rows, "notes": notes, "measurements": measurements, "hardware": hardware,
            "settings": vars(settings), "options": vars(options), "request": request}


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

table = results_table(result["rows"], hardware=result["hardware"])
st.subheader("Results")
st.caption(f"{shown['device']} ({result['hardware']}), {shown['precision']}, {shown['rounds']} interleaved "
           f"round{'s' if shown['rounds'] != 1 else ''} x {shown['iters']} iteration"
           f"{'s' if shown['iters'] != 1 else ''}; speed-up = median of per-round ratios against the baseline. "
           "GFLOPs count 2 per multiply-add (papers' 'FLOPs' are half). A paper's claim is compared only on "
           "the hardware it was measured on; otherwise it is marked not comparable.")
st.dataframe(table, hide_index=True,
             column_config={"speedup": st.column_config.NumberColumn("speed-up", format="%.2fx")})
st.plotly_chart(live_figure(pd.DataFrame(result["measurements"])), key="tp_rounds_chart")
st.plotly_chart(accuracy_figure(table), key="tp_accuracy_chart")
st.caption("Throughput against published ImageNet top-1; token-reduction variants have no single published top-1 "
           "and are left out of this chart. Models run with random weights: timing does not depend on them.")
d1, d2 = st.columns(2)
with d1:
    download_df(label_rows(table, None, RANDOM, SYNTHETIC_INPUT), "throughput.csv")
with d2:
    download_json({"weights": RANDOM, "image": SYNTHETIC_INPUT, "hardware": result["hardware"], "settings": shown,
                   "options": result["options"], "rows": rows_to_records(result["rows"])}, "throughput.json")
