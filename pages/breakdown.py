"""Where the time goes: runtime per operator class and component, against this machine's roofline."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from analysis.breakdown import (TOLERANCE, attribution_table, attribution_warning, baseline_of, component_table,
                                engine_comparison, ops_table, profile_model, reduction_savings, summary_table,
                                to_json)
from analysis.breakdown.figures import block_figure, engine_figure, roofline_figure, savings_figure, share_figure
from analysis.breakdown.tables import ENGINE_NOTE
from analysis.timing.engines import EAGER, ENGINES, EngineRefused, engine as engine_named
from analysis.timing.runners import ModelOptions
from analysis.provenance import RANDOM
from analysis.timing.roofline import machine_roofline
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.registry import IMAGE_INPUTS, REGISTRY
from models.variants import parse_variant
from pages._state import current_device, kept, latest_result, run_through_app, session_result, set_kept
from pages._widgets import cached_model, download_df, download_json, progress_bar, timm_model_names

AGAIN_KEY = "bd_profile_again_requested"
PAPER_MODELS = ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", *[f"efficientvit_m{i}" for i in range(6)],
                "mobilenetv3_large_100", "mobilevit_xxs"]

run_through_app()
st.title("Where the time goes")
st.markdown(
    "EfficientViT's first finding: vision transformers lose much of their time in **memory-bound operators** "
    "(reshapes and copies, element-wise functions, normalisation, the softmax of attention) rather than in their "
    "FLOPs. Here each model's forward is profiled with `torch.profiler` on **this machine**: every operator's "
    "own time goes to an operator class and to a component (patch embedding, attention, FFN, token-reduction "
    "machinery, head), and each class is placed on this machine's roofline. Timing does not depend on the "
    "weight values, so models run with random weights."
)

device = current_device()
image_models = [n for n, s in REGISTRY.items() if s.inputs == IMAGE_INPUTS]
left, right = st.columns([3, 2])


def _paper_models() -> None:
    set_kept("bd_models", list(PAPER_MODELS))


with left:
    st.button("The paper's models (DeiT-T, Swin-T, EfficientViT-M0..M5, MobileNetV3-Large, MobileViT-XXS)",
              on_click=_paper_models, key="bd_paper")
    models = kept(st.multiselect, "Models", key="bd_models", options=image_models,
                  default=["deit_tiny_patch16_224", "efficientvit_m0"],
                  help="The paper's comparison: " + ", ".join(PAPER_MODELS))
    models += [n for n in timm_model_names("bd_timm", task=None) if n not in models]
    extra = kept(st.text_input, "Token-reduction variants (space separated, NAME@key=value)", key="bd_variants",
                 default="", help="e.g. deit_small_patch16_224@tome=13  dynamicvit_deit_256_patch16_224@rho=0.7; each "
                                   "is compared with its unreduced model, which is profiled too.")
with right:
    batches = kept(st.multiselect, "Batch sizes", key="bd_batches", options=[1, 2, 4, 8, 16, 32, 64], default=[8],
                   help="Batch 1 and the throughput batch show why token reduction gains less at batch 1.")
    precision = kept(st.selectbox, "Precision", key="bd_precision",
                     options=["fp32", "fp16", "bf16"] if device != "cpu" else ["fp32"])
    chosen_engines = kept(st.multiselect, "Engines", key="bd_engines", options=list(ENGINES), default=[EAGER.key],
                          format_func=lambda k: ENGINES[k].label,
                          help="Each model is profiled under each engine, checked against eager on the same input "
                               "first. " + "; ".join(f"{e.label}: {e.help}" for e in ENGINES.values()))
    fuse_bn = kept(st.checkbox, "Deployment form: BatchNorm folded into convolutions", key="bd_fuse_bn",
                   default=False, help="As the throughput page's option: under every engine (EfficientViT, "
                                       "MobileNetV3; models without BatchNorm are unchanged).")
    iters = kept(st.number_input, "Profiled forwards (each next to a plain one)", 1, 50, key="bd_iters", default=3)

variants = list(dict.fromkeys(models + extra.split()))
for text in list(variants):
    base = baseline_of(text)
    if base and base not in variants:
        variants.insert(variants.index(text), base)
request = (tuple(variants), tuple(sorted(int(b) for b in batches)), precision, tuple(chosen_engines), fuse_bn,
           int(iters), device)
run = st.button("Profile", type="primary", disabled=not variants or not batches or not chosen_engines, key="bd_run")
run = run or st.session_state.pop(AGAIN_KEY, False)  # "Profile again" under a warning that the times miss


def run_profiles() -> dict:
    with st.status("Profiling ...", expanded=True) as status:
        show = progress_bar()
        status.update(label=f"This machine's limits on {device}: from the cache, or measured (10-20 s) ...")
        roof = machine_roofline(device, precision, progress=lambda f, m: show(f, f"this machine's limits: {m}"))
        results, refused = [], []
        runs = [(t, b, e) for b in sorted(batches) for t in variants for e in chosen_engines]
        for index, (text, batch, key) in enumerate(runs):
            loaded = cached_model(parse_variant(text).model, random_weights=True)
            if loaded is None:
                st.stop()

            def progress(fraction: float, message: str, index=index, batch=batch, key=key) -> None:
                status.update(label=f"Profiling {message} (batch {batch}, {ENGINES[key].label})")
                show((index + fraction) / len(runs), message)

            try:
                results.append(profile_model(text, batch=int(batch), device=device, precision=precision,
                                             iters=int(iters), warmup=1, loaded=loaded, engine=key,
                                             options=ModelOptions(fuse_bn=fuse_bn), progress=progress))
            except EngineRefused as exc:
                refused.append(str(exc))
        if not results:
            raise EngineRefused(" ".join(refused))
        status.update(label=f"Done: {len(results)} profiles on {device}", state="complete")
    return {"results": results, "roof": roof, "request": request, "refused": refused}


def _profile_again() -> None:
    st.session_state[AGAIN_KEY] = True


def _attribution_check(results) -> None:
    """Whether the operators' time adds up to the forward timed without the profiler, first and at full width;
    a warning with the figure and a button to profile again where it misses."""
    table = attribution_table(results)
    ratios = table["attributed_vs_plain"]
    missed = [b for b in results if not b.adds_up]
    st.markdown(f"**Does the attribution add up?** attributed / plain {ratios.min():.2f} to {ratios.max():.2f} over "
                f"{len(results)} profile{'s' if len(results) > 1 else ''}; profiled / plain "
                f"{table['profiled_vs_plain'].min():.2f} to {table['profiled_vs_plain'].max():.2f}"
                + ("" if missed else f" (all within {TOLERANCE:.0%})"))
    st.dataframe(table, hide_index=True, column_order=[c for c in table.columns if c != "engine"], column_config={
        "model": st.column_config.TextColumn("model", pinned=True),
        "plain_ms": st.column_config.NumberColumn("plain ms", format="%.2f"),
        "profiled_ms": st.column_config.NumberColumn("profiled ms", format="%.2f"),
        "profiled_vs_plain": st.column_config.NumberColumn("profiled / plain", format="%.2f"),
        "per_event_us": st.column_config.NumberColumn("profiler µs / event", format="%.2f"),
        "events": st.column_config.NumberColumn("events / forward", format="%d"),
        "attributed_ms": st.column_config.NumberColumn("attributed ms", format="%.2f"),
        "attributed_vs_plain": st.column_config.NumberColumn("attributed / plain", format="%.2f"),
        "within_10pct": st.column_config.TextColumn(f"within {TOLERANCE:.0%}"),
        "load_1min": st.column_config.NumberColumn("load (1 min)", format="%.1f")}, key="bd_attribution")
    st.caption("Plain: the forward timed without the profiler; profiled: with it, in the same interleaved rounds "
               "(medians). The profiler's cost per recorded event is calibrated on this machine (tiny operators "
               "timed with and without it) and taken out of the operators' times; attributed / plain near 1 "
               "means the per-operator milliseconds add up to the real forward.")
    for b in missed:
        st.warning(attribution_warning(b))
    if missed:
        st.button("Profile again", on_click=_profile_again, key="bd_again")


if run:
    try:
        session_result("breakdown", time.time_ns(), run_profiles)
    except (KeyError, ValueError, WeightsNotFoundError, CheckpointError) as exc:
        st.error(str(exc.args[0] if exc.args else exc))
        st.stop()
stored = latest_result("breakdown")
if stored is None:
    st.info("Pick models and batch sizes and press **Profile**.")
    st.stop()
result = stored[1]
if st.session_state.get("bd_remeasure"):  # the button below, pressed: measure before anything is drawn
    with st.status(f"Measuring this machine's limits on {device} again ...", expanded=True) as measuring:
        result["roof"] = machine_roofline(device, precision, refresh=True, progress=progress_bar())
        measuring.update(label=f"Limits measured again: {result['roof'].cache_status()}", state="complete")
results, roof = result["results"], result["roof"]
if result["request"] != request:
    st.caption("Results of the last run; the settings above have changed since: press **Profile** to measure them.")

hardware = roof.hardware
for sentence in result.get("refused", []):
    st.warning(sentence)
engines_shown = ", ".join(dict.fromkeys(engine_named(b.engine).label for b in results))
st.caption(f"{results[0].device} ({hardware}, {roof.threads} threads), {results[0].precision}, "
           f"engines: {engines_shown}; weights: {RANDOM}; input: random images. Shares are of the time the profiler "
           "attributes to operators; Python between operators counts as *other*.")
_attribution_check(results)
st.plotly_chart(share_figure(results), key="bd_classes")
st.plotly_chart(share_figure(results, by="component"), key="bd_components")

st.subheader("Per model")
summary = summary_table(results, roof)
first = ["model", "batch", "memory_bound_share", "below_bandwidth_roof", "profiler_overhead", "attributed_vs_plain"]
st.dataframe(summary, hide_index=True, column_order=[c for c in first if c in summary] + [
    c for c in summary.columns if c not in first], column_config={
    "model": st.column_config.TextColumn("model", pinned=True),
    "memory_bound_share": st.column_config.NumberColumn("memory-bound share", format="%.2f"),
    "below_bandwidth_roof": st.column_config.NumberColumn("time below bandwidth roof", format="%.2f"),
    "profiler_overhead": st.column_config.NumberColumn("profiled / plain", format="%.2f"),
    "attributed_vs_plain": st.column_config.NumberColumn("attributed / plain", format="%.2f")})
st.caption("Memory-bound share: time in data movement, element-wise, normalisation, softmax and bookkeeping "
           "operators. Below the bandwidth roof: time in operator groups whose FLOPs per byte are under this "
           "machine's ridge point. Profiled / plain: the profiler's own cost on the forward.")

st.subheader("Components")
components = component_table(results)
st.dataframe(components, hide_index=True, column_config={
    "share": st.column_config.NumberColumn(format="%.2f"),
    "memory_bound": st.column_config.NumberColumn("memory-bound part", format="%.2f")})

with_blocks = [b for b in results if any(r.block for r in b.ops)]
if with_blocks:
    names = [f"{b.model} b{b.batch}" for b in with_blocks]
    shown_block = kept(st.selectbox, "Attention vs FFN per block of", key="bd_block_model", options=names)
    st.plotly_chart(block_figure(with_blocks[names.index(shown_block)]), key="bd_blocks")
    st.caption("Memory-bound: data movement, element-wise, normalisation, softmax and bookkeeping operators. "
               "Blocks are named by module path; ToMe's attention runs outside timm's module and has no block.")

if len({b.engine for b in results}) > 1:
    st.subheader("Engines side by side: how much memory-bound time each removes")
    st.plotly_chart(engine_figure(results), key="bd_engines_chart")
    engines_table = engine_comparison(results)
    st.dataframe(engines_table, hide_index=True, column_config={
        "memory_bound_share": st.column_config.NumberColumn("memory-bound share", format="%.2f"),
        "speedup_over_eager": st.column_config.NumberColumn("speed-up over eager", format="%.2fx"),
        "memory_bound_removed_share": st.column_config.NumberColumn("memory-bound time removed", format="%.2f")})
    st.caption(ENGINE_NOTE + " Under torch.compile, fused kernels are classed by the operators their names list "
               "and every component is the whole forward.")
    download_df(pd.DataFrame(engines_table), "breakdown_engines.csv", label="Engines table (CSV)")

by_key = {(b.model, b.batch, b.engine): b for b in results}
savings = [s for b in results if (base := baseline_of(b.model)) and (base, b.batch, b.engine) in by_key
           for s in reduction_savings(b, by_key[(base, b.batch, b.engine)])]
if savings:
    st.subheader("Token reduction: saved and spent")
    st.plotly_chart(savings_figure(savings), key="bd_savings")
    st.caption("Positive: time the variant saves in that component; negative: time it spends more, such as its "
               "own machinery (predictors, matching, gathers). Compare batch 1 with the throughput batch.")

st.subheader("Roofline")
st.plotly_chart(roofline_figure(results, roof), key="bd_roofline")
st.markdown("**This machine's limits** (best of spaced samples of dense square matmuls and of a copy far larger "
            "than the last-level cache; the dashed roof is the hardware's own peak):\n"
            + "\n".join(f"- {line}" for line in roof.summary_lines()))
if roof.under_load:
    st.warning(f"These limits were measured under load ({roof.under_load}): the roofline, and with it the time "
               "below the bandwidth roof, may sit below what this machine reaches when quiet. Measure again when "
               "it is quiet.")
st.button("Measure this machine's limits again", key="bd_remeasure",
          help="Measures now (10-20 s) instead of reading the cache; cached only when the machine is quiet.")
st.caption("Bytes are the operators' tensors read and written (views move nothing); element-wise, norm and "
           "softmax count one or five operations per output element. Data movement does no FLOPs and is not drawn.")

st.subheader("Downloads")
d1, d2, d3 = st.columns(3)
with d1:
    download_df(lambda: ops_table(results), "breakdown_ops.csv", label="Per-operator table (CSV)")
with d2:
    download_json(to_json(results, roof), "breakdown.json", label="Per-operator table (JSON)")
with d3:
    traced = [b for b in results if b.trace]
    if traced:
        names = [f"{engine_named(b.engine).tag(b.model)} b{b.batch}" for b in traced]
        pick = kept(st.selectbox, "Trace of", key="bd_trace_pick", options=names)
        chosen = traced[names.index(pick)]
        st.download_button("Raw trace (Chrome JSON, opens in Perfetto)", chosen.trace.encode(),
                           file_name=f"trace_{pick.replace(' ', '_').replace('@', '_')}.json",
                           mime="application/json", key="bd_trace", on_click="ignore")
