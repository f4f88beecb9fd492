"""Head redundancy: how alike the attention heads of a block are, in MHSA ViTs and in EfficientViT's cascaded group attention."""
from __future__ import annotations

import streamlit as st

from analysis.head_redundancy import (
    ATTENTION,
    FEATURE,
    analyze_models,
    attention_overlays,
    embedding_noise_axes,
    head_embedding_figure,
    montage,
    redundancy_vs_depth,
    similarity_dataframe,
    similarity_heatmaps,
    to_dataframe,
    untrained_notes,
    whole_image_query_label,
)
from analysis.provenance import file_name, images_label, label_rows, title_line, with_title
from models.attention_recording import UnsupportedModelError
from models.registry import CGA, MHSA, models_with_attention
from pages._results import dataset_run_section
from pages._state import current_device, image_set_key, kept, run_through_app, session_result
from pages._widgets import (RANDOM_MODELS_LABEL, cached_model, download_df, download_png, image_picker, progress_bar,
                            random_models_picker, show_weights_banner, timm_model_names, weights_text)

MAX_IMAGES = 16
QUERY_GRID = 14  # the query patch is picked on the 14 x 14 grid of 16-px patches of a 224-px input
METRICS = {"attention maps (cosine)": ATTENTION, "head outputs (linear CKA)": FEATURE}


def _labelled(frame, weights_of: dict[str, str], images: str):
    """Every row with its model's weights source and the images it summarises."""
    return label_rows(frame, None, frame["model"].map(weights_of).tolist(), images)


run_through_app()
st.title("Head redundancy: multi-head vs cascaded group attention")
st.markdown(
    "For each head, **redundancy** is the largest cosine similarity between its attention map and another "
    "head's in the same block, averaged over the images (EfficientViT, CVPR 2023). MHSA models such as DeiT "
    "grow more redundant in later blocks; EfficientViT's cascaded group attention feeds each head a different "
    "channel split plus the previous head's output to make heads differ. The same is measured on the heads' "
    "outputs with linear CKA."
)

dataset_run_section(["head-similarity"], key="hr_run")

names = models_with_attention(MHSA, CGA)
left, right = st.columns(2)
with left:
    chosen = kept(st.multiselect, "Models", key="hr_models", options=names,
                  default=[n for n in ("deit_tiny_patch16_224", "efficientvit_m0") if n in names])
    chosen += [n for n in timm_model_names("hr_timm", attention=(MHSA, CGA), task=None) if n not in chosen]
    random_models = random_models_picker(chosen, "hr_random_models")
    max_images = kept(st.number_input, "Images used (at most)", 1, MAX_IMAGES, key="hr_max_images", default=8)
with right:
    images = image_picker("hr_images", multiple=True)[: int(max_images)]

if not chosen:
    st.info("Pick at least one model.")
    st.stop()

# A model without weights gets an info with the fix and the random-weights choice; the others are shown.
loaded = [m for m in (cached_model(n, n in random_models, RANDOM_MODELS_LABEL) for n in chosen) if m is not None]
if not loaded:
    st.stop()
for model in loaded:
    show_weights_banner(model)
weights_of = {m.name: weights_text(m) for m in loaded}
image_names = [im.name for im in images]
all_images = images_label(image_names)

key = (tuple((m.name, m.weights.description) for m in loaded), image_set_key(images), current_device())


def _analyze():
    with st.status(f"Recording attention of {len(loaded)} model{'s' if len(loaded) != 1 else ''} on "
                   f"{len(images)} image{'s' if len(images) != 1 else ''} ...") as status:
        try:
            results = analyze_models(loaded, [im.image for im in images], progress=progress_bar())
        except UnsupportedModelError as exc:
            status.update(label="Attention could not be recorded.", state="error")
            st.error(str(exc))
            st.stop()
        status.update(label="Attention recorded.", state="complete")
    return results


results = session_result("hr_analysis", key, _analyze)
by_name = {r.model: r for r in results}
for result in results:
    for note in untrained_notes(result):
        st.info(note)

metric = METRICS[kept(st.radio, "Similarity of", key="hr_metric", options=METRICS, horizontal=True)]

st.header("Redundancy vs depth")
st.plotly_chart(redundancy_vs_depth(results, metric), key="hr_depth")
st.caption("Weights: " + "; ".join(f"**{n}**: {w}" for n, w in weights_of.items()))


@st.fragment
def block_similarity_view() -> None:
    st.header("Head-to-head similarity per block")
    shown = kept(st.selectbox, "Model", key="hr_heatmap_model", options=by_name)
    st.caption(f"{shown}: weights {weights_of[shown]}")
    st.plotly_chart(similarity_heatmaps(by_name[shown], metric), key="hr_heatmaps")
    if all(embedding_noise_axes(by_name[shown])):
        st.caption("No MDS layout: the heads' attention-offset profiles are identical up to rounding.")
    else:
        st.plotly_chart(head_embedding_figure(by_name[shown], weights_of[shown]), key="hr_embedding")


block_similarity_view()

st.header("Downloads")
per_head, pairs = st.columns(2)
with per_head:
    download_df(_labelled(to_dataframe(results), weights_of, all_images), "head_redundancy.csv",
                "Download redundancy per head (CSV)")
with pairs:
    download_df(_labelled(similarity_dataframe(results), weights_of, all_images), "head_similarity.csv",
                "Download head-to-head similarities (CSV)")


@st.fragment
def overlay_view() -> None:
    """Per-head attention on one image: its widgets rerun only this panel."""
    st.header("Attention maps on an image")
    loaded_by_name = {m.name: m for m in loaded}
    c1, c2, c3 = st.columns(3)
    with c1:
        overlay_model = kept(st.selectbox, "Model", key="hr_overlay_model", options=loaded_by_name)
        picked = loaded_by_name[overlay_model]
        result = by_name[overlay_model]
        block = kept(st.slider, "Block", 0, len(result.blocks) - 1, key="hr_block", default=len(result.blocks) - 1)
    with c2:
        image_name = kept(st.selectbox, "Image", key="hr_image", options=image_names)
        cls_label = whole_image_query_label(picked.model)
        use_query = kept(st.radio, "Query", key="hr_query_mode", options=[cls_label, "a patch"]) == "a patch"
    with c3:
        row = kept(st.number_input, "Patch row", 0, QUERY_GRID - 1, key="hr_row", default=QUERY_GRID // 2,
                   disabled=not use_query)
        col = kept(st.number_input, "Patch column", 0, QUERY_GRID - 1, key="hr_col", default=QUERY_GRID // 2,
                   disabled=not use_query)

    image = images[image_names.index(image_name)]
    query_yx = ((row + 0.5) / QUERY_GRID, (col + 0.5) / QUERY_GRID) if use_query else None
    overlays = attention_overlays(picked.model, picked.transform(image.image), block, picked.data_config["mean"],
                                  picked.data_config["std"], query_yx)
    labels = [f"head {h}" for h in range(len(overlays))]
    query = "patch (%d, %d)" % (row, col) if use_query else cls_label
    sheet = with_title(montage(overlays, labels, columns=min(4, len(overlays))),
                       f"block {block}, query {query} | " + title_line(overlay_model, weights_of[overlay_model],
                                                                       image_name))
    redundancy = result.blocks[block].redundancy(metric)
    st.image(sheet, caption=f"{result.label}, block {block}: per-head attention of {query} "
                            f"(each map scaled to its own maximum); redundancy per head: "
                            + ", ".join(f"{r:.2f}" for r in redundancy))
    download_png(sheet, file_name("attention", overlay_model, f"block{block}", image_name),
                 "Download attention maps (PNG)")


overlay_view()
