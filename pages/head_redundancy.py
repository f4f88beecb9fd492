"""Head redundancy: how alike the attention heads of a block are, in MHSA ViTs and in EfficientViT's cascaded group attention."""
from __future__ import annotations

import hashlib

import streamlit as st

from analysis.head_redundancy import (
    ATTENTION,
    FEATURE,
    analyze_models,
    attention_overlays,
    head_embedding_figure,
    montage,
    redundancy_vs_depth,
    similarity_dataframe,
    similarity_heatmaps,
    to_dataframe,
)
from models.registry import CGA, MHSA, REGISTRY
from pages._results import dataset_run_section
from pages._ui import (
    cached_model,
    current_device,
    download_df,
    download_png,
    image_picker,
    random_weights_toggle,
    show_weights_banner,
)

MAX_IMAGES = 16
QUERY_GRID = 14  # the query patch is picked on the 14 x 14 grid of 16-px patches of a 224-px input
RESULTS_KEY = "hr_results"
METRICS = {"attention maps (cosine)": ATTENTION, "head outputs (linear CKA)": FEATURE}


def _model_names() -> list[str]:
    return [n for n, s in REGISTRY.items() if s.family in (MHSA, CGA)]


def _fingerprint(names, random_weights, images, device) -> str:
    digest = hashlib.sha1(repr((names, random_weights, device)).encode())
    for im in images:
        digest.update(im.name.encode())
        digest.update(im.image.tobytes())
    return digest.hexdigest()


st.title("Head redundancy: multi-head vs cascaded group attention")
st.markdown(
    "For each head, **redundancy** is the largest cosine similarity between its attention map and another "
    "head's in the same block, averaged over the images (EfficientViT, CVPR 2023). MHSA models such as DeiT "
    "grow more redundant in later blocks; EfficientViT's cascaded group attention feeds each head a different "
    "channel split plus the previous head's output to make heads differ. The same is measured on the heads' "
    "outputs with linear CKA."
)

dataset_run_section(["head-similarity"], key="hr_run")

names = _model_names()
left, right = st.columns(2)
with left:
    chosen = st.multiselect("Models", names, default=[n for n in ("deit_tiny_patch16_224", "efficientvit_m0")
                                                      if n in names], key="hr_models")
    random_weights = random_weights_toggle("hr_random")
    max_images = st.number_input("Images used (at most)", 1, MAX_IMAGES, 8, key="hr_max_images")
with right:
    images = image_picker("hr_images", multiple=True)[: int(max_images)]

if not chosen:
    st.info("Pick at least one model.")
    st.stop()

loaded = [m for m in (cached_model(n, random_weights) for n in chosen) if m is not None]
if len(loaded) < len(chosen):
    st.info("Models without weights are left out; tick *Use random weights* to run them untrained.")
if not loaded:
    st.stop()
for model in loaded:
    show_weights_banner(model)

key = _fingerprint(tuple(m.name for m in loaded), random_weights, images, current_device())
store = st.session_state.setdefault(RESULTS_KEY, {})
if key not in store:
    with st.status(f"Recording attention of {len(loaded)} models on {len(images)} images ...") as status:
        bar = st.progress(0.0)
        results = analyze_models(loaded, [im.image for im in images],
                                 progress=lambda fraction, message: bar.progress(min(1.0, fraction), text=message))
        status.update(label="Attention recorded.", state="complete")
    store.clear()  # keep one analysis per session
    store[key] = results
results = store[key]
by_name = {r.model: r for r in results}

metric = METRICS[st.radio("Similarity of", list(METRICS), horizontal=True, key="hr_metric")]

st.header("Redundancy vs depth")
st.plotly_chart(redundancy_vs_depth(results, metric), key="hr_depth")

st.header("Head-to-head similarity per block")
shown = st.selectbox("Model", list(by_name), key="hr_heatmap_model")
st.plotly_chart(similarity_heatmaps(by_name[shown], metric), key="hr_heatmaps")
st.plotly_chart(head_embedding_figure(by_name[shown]), key="hr_embedding")

st.header("Downloads")
per_head, pairs = st.columns(2)
with per_head:
    download_df(to_dataframe(results), "head_redundancy.csv", "Download redundancy per head (CSV)")
with pairs:
    download_df(similarity_dataframe(results), "head_similarity.csv", "Download head-to-head similarities (CSV)")

st.header("Attention maps on an image")
loaded_by_name = {m.name: m for m in loaded}
c1, c2, c3 = st.columns(3)
with c1:
    overlay_model = st.selectbox("Model", list(loaded_by_name), key="hr_overlay_model")
    picked = loaded_by_name[overlay_model]
    result = by_name[overlay_model]
    block = st.slider("Block", 0, len(result.blocks) - 1, len(result.blocks) - 1, key="hr_block")
with c2:
    image_name = st.selectbox("Image", [im.name for im in images], key="hr_image")
    cls_label = "CLS token" if result.kind == "mhsa" else "mean attention received (no CLS token)"
    use_query = st.radio("Query", [cls_label, "a patch"], key="hr_query_mode") == "a patch"
with c3:
    row = st.number_input("Patch row", 0, QUERY_GRID - 1, QUERY_GRID // 2, key="hr_row", disabled=not use_query)
    col = st.number_input("Patch column", 0, QUERY_GRID - 1, QUERY_GRID // 2, key="hr_col", disabled=not use_query)

image = next(im for im in images if im.name == image_name)
query_yx = ((row + 0.5) / QUERY_GRID, (col + 0.5) / QUERY_GRID) if use_query else None
overlays = attention_overlays(picked.model, picked.transform(image.image), block, picked.data_config["mean"],
                              picked.data_config["std"], query_yx)
labels = [f"head {h}" for h in range(len(overlays))]
sheet = montage(overlays, labels, columns=min(4, len(overlays)))
redundancy = result.blocks[block].redundancy(metric)
st.image(sheet, caption=f"{result.label}, block {block}: per-head attention of "
                        f"{'patch (%d, %d)' % (row, col) if use_query else cls_label} "
                        f"(each map scaled to its own maximum); redundancy per head: "
                        + ", ".join(f"{r:.2f}" for r in redundancy))
download_png(sheet, f"attention_{overlay_model}_block{block}.png", "Download attention maps (PNG)")
