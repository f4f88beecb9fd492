"""Channel importance: first-order Taylor scores per Q/K/V head, projection, FFN hidden and embedding channel."""
from __future__ import annotations

import streamlit as st

from analysis.data.images import imagenet_label, to_batch
from analysis.channel_importance import (
    NORMALIZATIONS,
    activation_importance,
    budget_keep_fraction,
    combined_table,
    component_importance_figure,
    fraction_kept_figure,
    head_importance_figure,
    inputs_digest,
    labelled_folder,
    no_ranking_reason,
    QK_SAME_NOTE,
    p_value_text,
    qk_scores_identical,
    rank_agreement,
    split_batches,
    taylor_importance,
    taylor_vs_activation_figure,
)
from analysis.provenance import images_label, label_rows
from models.registry import CGA, MHSA, MethodNotApplicable, models_with_attention
from pages._results import dataset_run_section
from pages._state import current_device, kept, run_through_app, session_result
from pages._widgets import (cached_model, download_df, image_picker, progress_bar, random_weights_toggle,
                            show_weights_banner, timm_model_names, weights_text)

BATCH_SIZE = 8
SELF, CLASS, FOLDER = "Model's own top-1 (pseudo-label)", "One ImageNet class for all images", "Folder labels"
NORMALIZATION_HELP = {
    "block": "divide by the mean of all prunable channels in the same block (default)",
    "layer": "divide by the mean of the (block, component) group: Molchanov's per-layer normalisation",
    "l2": "divide by the L2 norm of the (block, component) group (Molchanov et al. 2017)",
    "none": "raw |sum w * dL/dw|",
}

run_through_app()
st.title("Channel importance (first-order Taylor)")
st.markdown(
    "EfficientViT sized its widths with **Taylor importance** |Σ w·∂L/∂w| per channel (Molchanov et al. 2019) and "
    "found that **V and the embedding deserve width while Q/K and the FFN hidden ratio can shrink**. Here every "
    "prunable channel is scored on your images: Q, K, V per head, the attention projection, the FFN hidden layer, "
    "the embedding (and EfficientViT's depthwise convolutions). A global budget then keeps the most important "
    "channels across the whole network, and the chart shows which components keep their width."
)

dataset_run_section(["taylor"], key="ci_run")

left, right = st.columns(2)
with left:
    name = kept(st.selectbox, "Model", key="ci_model", options=models_with_attention(MHSA, CGA))
    name = next(iter(timm_model_names("ci_timm", attention=(MHSA, CGA), multiple=False)), name)
    random_weights = random_weights_toggle("ci_random")
    source = kept(st.radio, "Images", key="ci_source", options=["Sample photos / upload",
                                                                "Folder with class sub-folders"], horizontal=True)
with right:
    folder_labels = source == "Folder with class sub-folders"
    if folder_labels:
        folder = kept(st.text_input, "Folder path", key="ci_folder", default="",
                      help="<folder>/<class>/<image>; a class sub-folder is named by ImageNet index "
                           "(207), WordNet id (n02099601) or class name (golden retriever).")
        limit = kept(st.slider, "Images to use at most", 1, 256, key="ci_limit", default=32)
        label_modes = [FOLDER, SELF]
    else:
        images = image_picker("ci_images", multiple=True)
        label_modes = [SELF, CLASS]
    # One widget per input source, so that a folder starts with its own labels selected.
    label_mode = kept(st.radio, "Loss target (cross-entropy against)", options=label_modes,
                      key="ci_labels_folder" if folder_labels else "ci_labels_images")
    picked_class = None
    if label_mode == CLASS:
        picked_class = kept(st.selectbox, "ImageNet class", key="ci_class", options=range(1000), default=207,
                            format_func=lambda i: f"{i}: {imagenet_label(i)}")

loaded = cached_model(name, random_weights)
if loaded is None:
    st.stop()
show_weights_banner(loaded)
note = "(RANDOM weights)" if loaded.weights.is_random else ""
if loaded.weights.is_random and loaded.spec.attention == CGA:
    st.caption("timm initialises the last BatchNorm of every EfficientViT residual branch to zero, so with random "
               "weights no gradient reaches inside the blocks and their Taylor scores are exactly zero.")

labels = None
if folder_labels:
    if not folder:
        st.info("Enter a folder path whose sub-folders are ImageNet classes.")
        st.stop()
    try:
        images, folder_label_list, messages = labelled_folder(folder, limit)
    except ValueError as exc:
        st.error(str(exc))
        st.stop()
    for message in messages[:10]:
        st.caption(message)
    if not images:
        st.error(f"No readable images inside class sub-folders of {folder}.")
        st.stop()
    if label_mode == FOLDER:
        labels = folder_label_list
elif picked_class is not None:
    labels = [picked_class] * len(images)

batch = to_batch(images, loaded.transform)
loss_target = "self" if labels is None else "labels"
digest = inputs_digest(batch, labels)
key = (name, loaded.weights.description, current_device(), loss_target, digest)


def _score():
    batches = split_batches(batch, labels, BATCH_SIZE)
    with st.status(f"Scoring channels on {len(images)} image{'s' if len(images) != 1 else ''} ...",
                   expanded=False) as status:
        show = progress_bar("Taylor: gradients per batch")
        try:
            taylor = taylor_importance(loaded.model, batches, loss_target, model_name=name,
                                       progress=lambda done, total: show(done / (2 * total),
                                                                         "Taylor: gradients per batch"))
        except MethodNotApplicable as exc:  # a model typed by name that the scoring does not cover
            status.update(label="Channel importance does not apply to this model.", state="error")
            st.error(str(exc))
            st.stop()
        activation = activation_importance(
            loaded.model, batches, loss_target, model_name=name,
            progress=lambda done, total: show(0.5 + done / (2 * total), "captum: grad x activation per batch"))
        status.update(label=f"Scored {len(taylor)} channels on {len(images)} image"
                            f"{'s' if len(images) != 1 else ''}.", state="complete")
    return taylor, activation


# One result per session: score tables of big models are not small.
taylor, activation = session_result("ci_scores", key, _score)
weights = weights_text(loaded)
image_names = images_label([im.name for im in images])


def _labelled(frame, **settings):
    """Model, weights, images, the loss target and the given settings (normalisation, budget) on every row."""
    return label_rows(frame, name, weights, image_names, {"loss_target": loss_text, **settings})


c1, c2 = st.columns(2)
keep_fraction = kept(c1.slider, "Global budget: fraction of channels kept", 0.05, 0.95, key="ci_budget", default=0.5,
                     step=0.05)
normalize = kept(c2.selectbox, "Normalisation before the global ranking", key="ci_norm", options=NORMALIZATIONS,
                 format_func=lambda n: f"{n}: {NORMALIZATION_HELP[n]}")

target_text = {"self": "the model's own top-1", "labels": "the given labels"}[loss_target]
if picked_class is not None:
    target_text = f"the given labels (class {picked_class}, {imagenet_label(picked_class)}, for every image)"
loss_text = f"cross-entropy against {target_text}"
st.header(f"Which components keep their width {note}".strip())
st.caption(f"{len(taylor)} channels scored on {taylor.num_images} image{'s' if taylor.num_images != 1 else ''}, "
           f"loss: cross-entropy against {target_text}; weights: {weights}.")
summary = taylor.component_summary(keep_fraction, normalize)
reason = no_ranking_reason(taylor)
if reason:
    st.warning(reason)
    st.dataframe(summary[["component", "channels", "mean_score"]], hide_index=True)
    st.header("Downloads")
    download_df(_labelled(combined_table(taylor, activation, normalize), normalisation=normalize),
                f"channel_importance_{name}.csv",
                "Download every channel's scores (CSV)")
    st.stop()
st.dataframe(summary, hide_index=True)
kept = summary.set_index("component")["fraction_kept"]
st.markdown(f"With {keep_fraction:.0%} of all channels kept: "
            + ", ".join(f"**{c}** keeps {kept[c]:.0%}" for c in kept.index) + ".")
budget = budget_keep_fraction(taylor, keep_fraction, normalize)
st.plotly_chart(fraction_kept_figure(budget, keep_fraction, name, note), key="ci_fig_kept")
if qk_scores_identical(taylor):
    st.caption(QK_SAME_NOTE)
st.plotly_chart(component_importance_figure(taylor, normalize, note), key="ci_fig_components")

st.header(f"Per head {note}".strip())
st.plotly_chart(head_importance_figure(taylor, normalize, note), key="ci_fig_heads")

st.header(f"Taylor (weights) vs activation (captum) {note}".strip())
st.markdown("captum's `LayerGradientXActivation` on the same layers, summed over images and tokens per channel. "
            "For a Linear layer both scores are equal by construction; they differ for the embedding "
            "(cls/position parameters) and for conv + BatchNorm layers.")
st.plotly_chart(taylor_vs_activation_figure(taylor, activation, normalize, note), key="ci_fig_scatter")
st.dataframe(rank_agreement(taylor, activation).assign(p_value=lambda f: f["p_value"].map(p_value_text)),
             hide_index=True)

st.header("Downloads")
suffix = "_random" if loaded.weights.is_random else ""
download_df(_labelled(combined_table(taylor, activation, normalize), normalisation=normalize),
            f"channel_importance_{name}{suffix}.csv",
            "Download every channel's scores (CSV)")
download_df(_labelled(budget, normalisation=normalize, budget_fraction_kept=keep_fraction),
            f"fraction_kept_{name}{suffix}.csv", "Download fraction kept per block (CSV)")
