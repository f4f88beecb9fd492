"""Token reduction: where the DynamicViT family prunes and where ToMe merges, side by side on the same images."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.data.images import model_view, to_batch
from analysis.provenance import file_name, images_label, label_rows, title_line
from analysis.token_reduction import (
    NO_REDUCTION,
    TOME,
    agreement_frame,
    choice_text,
    combine_runs,
    dynamicvit_run,
    dynamicvit_stage_panels,
    dynamicvit_with_untrained_predictors,
    export_frame,
    image_strip,
    is_structured,
    keep_frequency_by_stage_figure,
    keep_score_figure,
    keep_score_note,
    kept_indices_frame,
    model_choices,
    predictions_frame,
    reference_run,
    stage_maps_caption,
    tokens_per_block,
    tokens_per_block_figure,
    tome_absent_reason,
    tome_applies,
    tome_merge_panels,
    tome_run,
    tome_setting_text,
)
from analysis.tome_agreement import agreement_sweep, plot_agreement, rows_to_frame
from models.registry import get_spec
from pages._results import dataset_run_section
from pages._ui import (
    cached_model,
    current_device,
    download_df,
    download_png,
    image_picker,
    image_set_key,
    kept,
    progress_bar,
    random_weights_toggle,
    run_through_app,
    session_result,
    set_kept,
    show_weights_banner,
    weights_text,
)

MAX_IMAGES = 8
SETTINGS_KEPT = 8  # results per setting kept in the session, so moving a slider back is instant
DEFAULT_RHO = 0.7  # DynamicViT's setting, for predictors not trained at any


@st.cache_resource(show_spinner="Attaching untrained DynamicViT predictors ...", max_entries=4)
def _untrained_dynamicvit(name: str, weights: str, device: str, _backbone):
    # A separate cached copy: the shared backbone itself is never modified.
    return dynamicvit_with_untrained_predictors(_backbone)


run_through_app()
st.title("Token reduction: DynamicViT pruning and ToMe merging")
st.markdown(
    "**DynamicViT** learns to *drop* patch tokens at three stages (keep ratio rho, rho^2, rho^3 for DeiT and "
    "LV-ViT). Its ConvNeXt and Swin versions keep the feature map whole and send only the positions they keep "
    "through the expensive MLP (rho, rho - 0.2, rho - 0.4 in their third stage). **ToMe** *merges* the r most "
    "similar token pairs in every block of a plain ViT, without training. Agreement is measured against the "
    "same model without reduction."
)

dataset_run_section(["keep-frequency", "tome-merge"], key="tr_run")

choices = model_choices()
left, right = st.columns(2)
with left:
    label = kept(st.selectbox, "Model", key="tr_model", options=choices,
                 format_func=lambda c: choice_text(c, choices[c]),
                 help="Official DynamicViT-family releases need their weights (or random weights); the "
                      "DeiT-Tiny option attaches untrained score predictors to real DeiT-Tiny weights "
                      "(its pruning is not learned).")
    random_weights = random_weights_toggle("tr_random")
with right:
    images = image_picker("tr_images", multiple=True)

choice = choices[label]
name, pruning = choice.name, choice.pruning
spec = get_spec(name)
loaded = cached_model(name, random_weights)
if loaded is None:
    st.stop()
show_weights_banner(loaded)
model = loaded.model
if choice.untrained_predictors:
    model = _untrained_dynamicvit(name, loaded.weights.description, current_device(), loaded.model)
    backbone = ("the same RANDOM backbone" if loaded.weights.is_random
                else f"the same trained backbone ({loaded.weights.description})")
    st.warning("The DynamicViT score predictors are **untrained** (random): the pruning maps below show the "
               f"mechanics, not what a trained DynamicViT keeps. ToMe and the unreduced model use {backbone}.")
has_tome = tome_applies(spec)
weights = weights_text(loaded, choice.untrained_predictors)  # DynamicViT's: names untrained predictors
backbone_weights = weights_text(loaded)  # ToMe's and the unreduced model's
weights_tag = " (RANDOM weights)" if loaded.weights.is_random else ""
predictor_tag = " (untrained predictors)" if choice.untrained_predictors else ""

if len(images) > MAX_IMAGES:
    st.info(f"Using the first {MAX_IMAGES} of {len(images)} images.")
    images = images[:MAX_IMAGES]
names = [image.name for image in images]

# The keep ratio starts at the one the release was trained for, and again whenever another model is picked.
trained_rho = spec.trained_keep_ratio if not choice.untrained_predictors else None
if st.session_state.get("tr_rho_model") != label:
    st.session_state["tr_rho_model"] = label
    set_kept("tr_rho", trained_rho or DEFAULT_RHO)
c1, c2, c3 = st.columns(3)
keep_ratio = kept(c1.slider, "Keep ratio rho", 0.3, 1.0, key="tr_rho", default=trained_rho or DEFAULT_RHO,
                  step=0.05, disabled=pruning is None,
                  help="The share of positions the first predictor keeps; later stages follow the family's "
                       "schedule.")
if pruning is not None and trained_rho is not None and abs(keep_ratio - trained_rho) > 1e-6:
    c1.info(f"{name} was trained for rho = {trained_rho:g}; at rho = {keep_ratio:.2f} its predictors run at a "
            "keep ratio they were not trained for (expect lower accuracy than the paper's).")
r_spec, proportional = None, True
if has_tome:
    r = kept(c2.slider, "ToMe r (tokens merged per block)", 0, 32, key="tr_r", default=13)
    schedule = kept(c3.radio, "ToMe schedule", key="tr_schedule", options=["constant", "decreasing"],
                    horizontal=True,
                    help="Decreasing: linear from 1.5 r at the first block to 0.5 r at the last (ToMe's schedule).")
    proportional = kept(c3.checkbox, "Proportional attention (log size bias)", key="tr_prop", default=True)
    r_spec = f"decreasing:{r}" if schedule == "decreasing" else r
else:
    c2.caption(tome_absent_reason(spec))

# Each run is stored under the settings it depends on: a slider recomputes only its own method.
inputs = (label, loaded.weights.description, current_device(), image_set_key(images))
batch = session_result("tr_batch", inputs, lambda: to_batch(images, loaded.transform))
reference = session_result("tr_reference", inputs, lambda: reference_run(model, batch, pruning), keep=2)
tome = None
if has_tome:
    tome = session_result("tr_tome", inputs + (r_spec, proportional),
                          lambda: tome_run(model, batch, r_spec, proportional), keep=SETTINGS_KEPT)
dynamicvit = None
if pruning is not None:
    try:
        dynamicvit = session_result("tr_dynamicvit", inputs + (keep_ratio,),
                                    lambda: dynamicvit_run(model, batch, keep_ratio, pruning), keep=SETTINGS_KEPT)
    except ValueError as exc:  # a keep ratio the family's schedule cannot run
        st.error(str(exc))
        st.stop()
comparison = combine_runs(names, reference, tome, r_spec, dynamicvit, keep_ratio, pruning, proportional,
                          choice.untrained_predictors)
method_label = comparison.pruning_label
method_name = pruning.label if pruning else "DynamicViT"
structured = is_structured(comparison)
all_images = images_label(names)


def _labelled(frame: pd.DataFrame, image=None, frame_weights: str = backbone_weights) -> pd.DataFrame:
    """Model, weights, images and every setting (rho, predictors, ToMe r, proportional attention) on each row."""
    return export_frame(frame, comparison, name, frame_weights, image)


@st.fragment
def detail_view() -> None:
    """The chosen image's panels: picking another image or other blocks reruns only this part."""
    image_name = kept(st.selectbox, "Image for the detailed view", key="tr_image", options=names)
    chosen = names.index(image_name)
    canvas = model_view(images[chosen].image, loaded.data_config)
    trace = comparison.dynamicvit_trace

    st.header("Side by side" + weights_tag)
    predictions = predictions_frame(comparison, chosen)
    per_image = agreement_frame(comparison, chosen).set_index("method")
    if structured:
        rows, cols = trace.stage_grids[-1]
        unreduced = f"all {rows * cols} positions of the {rows}x{cols} map take the full path"
    else:
        unreduced = f"{comparison.num_tokens} tokens in every block"
    panels = {NO_REDUCTION: (canvas, unreduced)}
    if trace is not None:
        last = trace.kept_counts[-1]
        what = (f"{last} positions on the full MLP path after the last predictor" if structured
                else f"{last} patches kept after the last stage")
        panels[method_label] = (dynamicvit_stage_panels(canvas, trace, chosen)[-1][1],
                                f"{what} (rho = {keep_ratio:.2f}){predictor_tag}")
    if comparison.tome_trace is not None:
        panels[TOME] = (tome_merge_panels(canvas, comparison.tome_trace, [comparison.depth - 1], chosen)[-1][1],
                        f"merge groups after the last block ({comparison.tome_trace.tokens_per_layer[-1]} tokens)")
    for column, (method, (picture, caption)) in zip(st.columns(len(panels)), panels.items()):
        with column:
            st.subheader(method)
            st.image(picture, caption=caption, width="stretch")
            st.dataframe(predictions[predictions.method == method].drop(columns=["image", "method", "class index"]),
                         hide_index=True,
                         column_config={"probability": st.column_config.NumberColumn(format="%.3f")})
            if method != NO_REDUCTION:
                st.metric("Top-5 overlap with unreduced", f"{per_image.loc[method, 'top-5 overlap']:.0%}")
                same_top1 = per_image.loc[method, "top-1 agreement"] == 1.0
                st.caption("Top-1 **agrees** with the unreduced model." if same_top1
                           else "Top-1 **differs** from the unreduced model.")
    st.markdown(f"**Agreement with the unreduced model over all {len(names)} "
                f"image{'s' if len(names) != 1 else ''}**{weights_tag}")
    overall = agreement_frame(comparison)
    st.dataframe(overall, hide_index=True)
    d1, d2 = st.columns(2)
    with d1:
        download_df(lambda: _labelled(predictions_frame(comparison)), "top5_predictions.csv",
                    "Download top-5 predictions, every image (CSV)")
    with d2:
        download_df(_labelled(overall, all_images), "agreement.csv", "Download agreement (CSV)")

    heading = "positions on the full path per stage" if structured else "pruned patches per stage"
    st.header(f"{method_name}: {heading}{weights_tag}{predictor_tag}")
    if trace is None:
        st.info("This model has no DynamicViT score predictors; choose a DynamicViT-family model or the "
                "DeiT-Tiny option.")
    else:
        stage_strip = image_strip(dynamicvit_stage_panels(canvas, trace, chosen),
                                  title=f"{method_label} | " + title_line(name, weights, image_name,
                                                                          {"rho": keep_ratio}))
        st.image(stage_strip, caption=stage_maps_caption(trace), width="stretch")
        scores = session_result("tr_keep_scores", inputs + (keep_ratio, chosen), lambda: keep_score_figure(
            trace, chosen, title=f"{method_name} keep scores per stage, rho {keep_ratio:.2f}: {image_name}"
                                 + weights_tag + predictor_tag), keep=SETTINGS_KEPT)
        st.plotly_chart(scores, key="tr_keep_scores")
        narrow = keep_score_note(trace, chosen)
        if narrow:
            st.caption(narrow)
        download_png(stage_strip, file_name("dynamicvit_stages", name, f"rho{keep_ratio:g}", image_name),
                     "Download stage maps (PNG)")

    if comparison.tome_trace is None:
        return
    st.header("ToMe: merged tokens per block" + weights_tag)
    depth = comparison.depth
    default_layers = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})
    layers = kept(st.multiselect, "Show merge maps after blocks", key="tr_layers", options=range(depth),
                  default=default_layers)
    merge_strip = image_strip(tome_merge_panels(canvas, comparison.tome_trace, sorted(layers), chosen),
                              title="ToMe " + tome_setting_text(r_spec, proportional) + " | "
                                    + title_line(name, backbone_weights, image_name))
    st.image(merge_strip, caption="Each group of merged patches in its mean colour", width="stretch")
    download_png(merge_strip, file_name("tome_merge_maps", name, f"r{r_spec}", image_name),
                 "Download merge maps (PNG)")


detail_view()

if comparison.dynamicvit_trace is not None:
    trace = comparison.dynamicvit_trace
    if len(names) > 1:
        kept_what = "takes the full path" if structured else "is kept"
        frequency = session_result("tr_keep_frequency", inputs + (keep_ratio,), lambda: keep_frequency_by_stage_figure(
            trace, f"How often each position {kept_what} at each stage, rho {keep_ratio:.2f}, over {len(names)} "
                   "images" + weights_tag + predictor_tag), keep=SETTINGS_KEPT)
        st.plotly_chart(frequency, key="tr_keep_frequency")
    download_df(_labelled(kept_indices_frame(trace, names), frame_weights=weights), "dynamicvit_kept_indices.csv",
                "Download kept indices per image and stage (CSV)")

counts = tokens_per_block(comparison)
chart_title = ("Positions taking each block's full path" if structured else "Tokens entering each block") + weights_tag
st.plotly_chart(tokens_per_block_figure(counts, chart_title, structured), key="tr_tokens")
download_df(_labelled(pd.DataFrame({"block": range(comparison.depth), **counts}), all_images),
            "tokens_per_block.csv", "Download tokens per block (CSV)")


@st.fragment
def sweep_view() -> None:
    """The r sweep reruns alone; its result stays until the images, model or settings change."""
    st.header("ToMe: agreement with the unreduced model as r grows" + weights_tag)
    r_max = kept(st.slider, "Largest r in the sweep", 2, 32, key="tr_rmax", default=16)
    sweep_key = inputs + (proportional, r_max)
    if st.button("Run the r sweep on these images", key="tr_sweep"):
        slot = st.empty()  # the progress bar goes when the sweep is done
        with slot:
            show = progress_bar("Sweeping r ...")
        session_result("tr_sweep", sweep_key, lambda: agreement_sweep(
            model, batch.to(next(model.parameters()).device), range(0, r_max + 1),
            proportional_attention=proportional, progress=show))
        slot.empty()
    rows = session_result("tr_sweep", sweep_key)
    if rows is None:
        st.caption("Runs ToMe once per r (constant schedule) and compares with the unreduced model; "
                   "GFLOPs per image are counted with torch's FlopCounterMode.")
        return
    st.plotly_chart(plot_agreement(rows, f"ToMe agreement: {name}, {backbone_weights}, {all_images}"),
                    key="tr_sweep_chart")
    download_df(label_rows(rows_to_frame(rows), name, backbone_weights, all_images,
                           {"tome_schedule": "constant", "tome_proportional_attention": proportional}),
                "tome_r_sweep.csv", "Download the r sweep (CSV)")


if has_tome:
    sweep_view()
