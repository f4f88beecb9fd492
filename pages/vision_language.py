"""Vision-language: PuMer on ViLT. Ask a question about an image; see what the text prunes and what merges."""
from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from analysis.vision_language import (PuMerSettings, answer_question, answers_frame, counts_frame, merge_overlay,
                            pruned_overlay, records_to_json, steps_frame, text_groups_html, token_counts_figure,
                            tokens)
from analysis.provenance import label_rows, title_line, with_title
from models.checkpoints import WeightsNotFoundError
from models.registry import get_spec
from models.vilt_pumer import load_vilt, tiny_vilt
from models.weights import WEIGHTS_DIR_ENV, status
from pages._ui import (current_device, download_df, download_json, download_png, image_picker, image_set_key,
                       run_through_app, session_result, weights_folder)

VILT_MODEL = "vilt_b32_vqa"
VILT_SPEC = get_spec(VILT_MODEL)
LAYER_PRESETS = {"VQA / NLVR2: layers 2, 5, 8": (2, 5, 8), "Visual entailment: layers 2, 4, 6, 8": (2, 4, 6, 8)}


@st.cache_resource(show_spinner="Looking for ViLT ...", max_entries=4)
def _cached_vilt(random_weights: bool, folder: str, device: str):
    """(model, processor, None), or (None, None, what was tried) when the weights are missing.

    A failed resolution is cached like a model (once per process, for every session): the hub is not asked
    again on every visit or rerun; the Retry button clears it."""
    try:
        model, processor = tiny_vilt() if random_weights else load_vilt(weights_dir=folder or None)
    except WeightsNotFoundError as exc:
        tried = f"Tried: {'; '.join(exc.tried)}. " if exc.tried else ""
        return None, None, tried + str(exc)
    return model.to(device), processor, None


def _vilt_target(folder: str) -> Path:
    base = folder or os.environ.get(WEIGHTS_DIR_ENV, "")
    name = VILT_SPEC.weight_file_stem
    return Path(base).expanduser() / name if base else Path(f"${WEIGHTS_DIR_ENV}") / name


run_through_app()
st.title("Vision-language: PuMer on ViLT")
st.markdown(
    "PuMer (ACL 2023) speeds up ViLT inside a few layers: it **prunes** the image patches the question "
    "attends to least, then **merges** similar image tokens and similar text tokens (ToMe matching), never "
    "mixing the two modalities. Ratios apply to the tokens entering each reduce layer, so they compound. "
    "Both CLS tokens are protected. The paper reports 1.7-2x throughput with < 1 % accuracy drop after "
    "fine-tuning with PuMer; here it runs off the shelf on the fine-tuned ViLT."
)

random_weights = st.checkbox("Use a small random ViLT (no pretrained weights)", key="vl_random",
                             help="A 10-layer, 64-wide ViLT with random weights: it shows the mechanics only.")
model, processor, missing = _cached_vilt(random_weights, weights_folder(), current_device())
if missing:
    target = _vilt_target(weights_folder())
    st.error(f"The ViLT-VQA weights ({VILT_SPEC.hf_repo}) are not on this machine"
             f"{' and the hub is off (HF_HUB_OFFLINE)' if os.environ.get('HF_HUB_OFFLINE') else ''}. "
             f"Create the folder {target} (on a machine with internet: `hf download {VILT_SPEC.hf_repo} "
             f"--local-dir {target}`), or tick **Use a small random ViLT** above.")
    with st.expander("What was tried"):
        st.write(missing)
    if st.button("Retry", key="vl_retry", help="Look for the weights again (after adding the folder)."):
        _cached_vilt.clear()
        st.rerun()
    st.stop()
if random_weights:
    st.warning("**Random weights**: this small ViLT is untrained, so its answers, attention scores and merges "
               "below are meaningless; they only show the mechanics. Timings of a model this small say nothing "
               "about ViLT-B/32.")
    weights = "random (small 10-layer ViLT)"
    model_name = "vilt_tiny_random"
else:
    source = status(VILT_SPEC, Path(weights_folder()).expanduser() if weights_folder() else None)
    weights = f"{source.kind.value} {source.location}"
    model_name = VILT_MODEL
    st.caption(f"ViLT-B/32 fine-tuned on VQAv2 ({VILT_SPEC.hf_repo}): {weights}, on {current_device()}.")

left, right = st.columns([1, 1])
with left:
    picked = image_picker("vl_image", multiple=False, label="Upload an image")[0]
    st.image(picked.image, caption=picked.name, width=360)
with right:
    question = st.text_input("Question", value="What animal is in the picture?", key="vl_question")
    preset = st.radio("Reduce layers", list(LAYER_PRESETS), key="vl_layers")
    prune = st.slider("Image prune ratio", 0.0, 0.5, 0.1, 0.05, key="vl_prune")
    image_merge = st.slider("Image merge ratio", 0.0, 0.5, 0.3, 0.05, key="vl_image_merge")
    text_merge = st.slider("Text merge ratio", 0.0, 0.5, 0.2, 0.05, key="vl_text_merge")
    proportional = st.checkbox("Proportional attention (add log token size; PuMer's code does not)",
                               key="vl_proportional")

if not question.strip():
    st.info("Type a question about the image.")
    st.stop()

settings = PuMerSettings(reduce_layers=LAYER_PRESETS[preset], prune_ratio=prune, image_merge_ratio=image_merge,
                         text_merge_ratio=text_merge, proportional_attention=proportional)
run_key = (image_set_key([picked]), question, settings, random_weights, weights_folder(), current_device())


def _answer():
    with st.status("Answering with ViLT and ViLT+PuMer, then timing both (interleaved) ...", expanded=False) as status:
        answered = answer_question(model, processor, picked.image, question, settings)
        status.update(label="Answered and timed.", state="complete")
    return answered


result = session_result("vl_answer", run_key, _answer)
speed = result.speed
provenance = {"model": model_name, "weights": weights, "image": picked.name}


def _labelled(frame):
    return label_rows(frame, model_name, weights, picked.name)


def _titled(picture, what: str):
    return with_title(picture, f"{what} | " + title_line(model_name, weights, picked.name))

st.subheader("Answers")
st.dataframe(answers_frame(result), hide_index=True)
cols = st.columns(4)
cols[0].metric("Speed-up (this question, batch 1)", f"{speed['speedup']:.2f}x")
cols[1].metric("ms per batch, ViLT / ViLT+PuMer", f"{speed['full_ms']:.0f} / {speed['pumer_ms']:.0f}")
cols[2].metric("GFLOPs ViLT / PuMer", "n/a" if speed["full_gflops"] is None else
               f"{speed['full_gflops']:.2f} / {speed['pumer_gflops']:.2f}")
cols[3].metric("Peak memory saving", "n/a" if speed["memory_saving"] is None else f"{100 * speed['memory_saving']:.1f} %")
st.caption(f"Median of {speed['rounds']} interleaved rounds of {speed['iters']} forwards on {speed['device']}; "
           f"memory: {speed['memory_note']}.")

st.subheader("Tokens per layer")
st.plotly_chart(token_counts_figure(result.trace, title_line(model_name, weights, picked.name)), key="vl_counts")

st.subheader("What each reduce layer did")
st.caption("Left: patches pruned at this layer in red (low text-to-image attention), gone earlier faded. "
           "Middle: image tokens after the layer, patches sharing one token share a colour. "
           "Below: question tokens, merged tokens share a colour; the number is the token they became.")
tabs = st.tabs([f"Layer {step.layer}" for step in result.trace.steps])
for index, (tab, step) in enumerate(zip(tabs, result.trace.steps)):
    with tab:
        pruned_image, merged_image = pruned_overlay(result, index), merge_overlay(result, index)
        a, b = st.columns(2)
        a.image(pruned_image, caption=f"pruned: {tokens(int(step.image_pruned[0]), 'image token')}", width=360)
        b.image(merged_image, caption=f"merged away: {tokens(int(step.image_merged[0]), 'image token')}", width=360)
        st.html(text_groups_html(result, index))
        st.caption(f"merged away: {tokens(int(step.text_merged[0]), 'text token')}")
        d1, d2 = st.columns(2)
        with d1:
            download_png(_titled(pruned_image, f"PuMer layer {step.layer}: pruned"),
                         f"pumer_layer{step.layer}_pruned.png", "Download pruned map (PNG)")
        with d2:
            download_png(_titled(merged_image, f"PuMer layer {step.layer}: merged"),
                         f"pumer_layer{step.layer}_merged.png", "Download merge map (PNG)")

st.subheader("Records")
st.dataframe(steps_frame(result.trace), hide_index=True)
d1, d2, d3 = st.columns(3)
with d1:
    download_json({**provenance, **records_to_json(result)}, "pumer_records.json", "Download all records (JSON)")
with d2:
    download_df(_labelled(steps_frame(result.trace)), "pumer_reduce_steps.csv", "Download reduce steps (CSV)")
with d3:
    download_df(_labelled(counts_frame(result.trace)), "pumer_tokens_per_layer.csv", "Download tokens per layer (CSV)")
