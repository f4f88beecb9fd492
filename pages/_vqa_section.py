"""The vision-language page's section "Accuracy on your questions": VQA accuracy (or agreement) against throughput of
every variant of the method table for the chosen model, on a questions file and images the user gives."""
from __future__ import annotations

import hashlib
import time

import pandas as pd
import streamlit as st

from analysis.data.folders import DatasetError
from analysis.data.questions import QuestionImages, parse_questions
from analysis.runs.vqa_frontier import evaluate, measure_speed, question_inputs
from analysis.runs.vqa_points import (AGREEMENT, INTERVAL, default_variants, to_json, variant_of, variant_text,
                                      vqa_frontier_figure)
from analysis.runs.vqa_sizes import Loader, ModelsAtSizes
from analysis.timing.harness import BenchSettings
from models.checkpoints import CheckpointError
from pages._results import result_folder_input
from pages._state import UPLOADS_KEY, image_set_key, kept, latest_result, session_result
from pages._widgets import download_df, download_json, image_picker, progress_bar

SLOT = "vl_vqa_frontier"
UPLOAD, FOLDER = "Upload a questions file and images", "Files on this machine"
QUESTIONS_KEY = "vl_vqa_questions"
EXAMPLE = ('{"image": "china.jpg", "question": "Is there a building?", "answers": ["yes", "yes", "yes", "yes", '
           '"yes", "yes", "yes", "yes", "yes", "yes"]}\n'
           '{"image": "flower.jpg", "question": "What color is the flower?", "answers": ["pink", "pink", "red", '
           '"pink", "Pink.", "purple", "pink", "red", "pink", "pink"]}\n')
SHOWN = ["setting", "variant", "metric", "questions", "score", "ci_low", "ci_high", "drop", "drop_ci_low",
         "drop_ci_high", "agreement", "img_per_s", "speedup", "ms_per_batch", "gflops", "peak_mem_mib",
         "memory_saving"]


def _forget_if_emptied() -> None:
    if not st.session_state.get(QUESTIONS_KEY):
        st.session_state.get(UPLOADS_KEY, {}).pop(QUESTIONS_KEY, None)


def _uploaded_questions() -> tuple[str, str] | None:
    """(file name, text) of the uploaded questions file, kept across page visits until the user removes it."""
    stored = st.session_state.setdefault(UPLOADS_KEY, {})
    upload = st.file_uploader("Questions file (JSON Lines: image, question, answers)", type=["jsonl", "json", "txt"],
                              key=QUESTIONS_KEY, on_change=_forget_if_emptied,
                              help="One JSON object a line: image (a file name among the images), question, answers "
                                   "(the annotators' answers, VQAv2's layout; optional).")
    if upload is not None:
        stored[QUESTIONS_KEY] = [(upload.name, upload.getvalue())]
    elif stored.get(QUESTIONS_KEY):
        st.caption(f"Using your uploaded questions file {stored[QUESTIONS_KEY][0][0]}.")
    if not stored.get(QUESTIONS_KEY):
        return None
    name, data = stored[QUESTIONS_KEY][0]
    return name, data.decode("utf-8", errors="replace")


def _dataset(processor, source: str, limit: int):
    """(dataset, what the questions are in words) or None after saying what is missing; DatasetError if bad."""
    if source == FOLDER:
        questions_path = kept(st.text_input, "Questions file path", key="vl_vqa_questions_path", default="")
        folder = kept(st.text_input, "Images folder path", key="vl_vqa_images_path", default="")
        if not questions_path.strip() or not folder.strip():
            st.info("Give the questions file and the folder its image names are in.")
            return None
        return QuestionImages.from_files(folder.strip(), questions_path.strip(), processor, limit), questions_path
    uploaded = _uploaded_questions()
    if uploaded is None:  # the images' uploader comes with the questions (it would offer the sample photos alone)
        st.info("Upload a questions file, then the images it names. Its format, for the bundled sample photos "
                "(china.jpg, flower.jpg), which are used when no image is uploaded:")
        st.code(EXAMPLE, language="json")
        return None
    images = image_picker("vl_vqa_images", multiple=True, label="Images the questions name")
    name, text = uploaded
    questions = parse_questions(text, name, limit)
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return QuestionImages(questions, processor, images={im.name: im.image for im in images}), \
        f"{name} ({digest}), images {image_set_key(images)[:8]}"


def _variants(model_name: str) -> list:
    offered = {variant_text(v): v for v in default_variants(model_name)}
    picked = kept(st.multiselect, "Variants (the unreduced model is always scored)",
                  key=f"vl_vqa_variants_{model_name}",
                  options=list(offered), default=list(offered), format_func=lambda t: f"{offered[t].label}  [{t}]",
                  help="From the method table: each method for this model at its paper setting and picks, and the "
                       "paper's ablations. Variant text: the settings after a variant name's @.")
    typed = kept(st.text_input, "Other variants (space separated, e.g. pumer,prune=0.5,reduce=1-4-7)",
                 key=f"vl_vqa_other_{model_name}", default="")
    variants = [offered[t] for t in picked]
    for text in typed.split():
        try:
            variants.append(variant_of(model_name, text))
        except ValueError as exc:
            st.error(str(exc))
    return variants


def _compute(models: ModelsAtSizes, registry_name: str, dataset, variants, weights: str, note: str,
             bench: BenchSettings) -> dict:
    with st.status(f"Answering {len(dataset)} questions with {len(variants) + 1} variants ...",
                   expanded=True) as status:
        report = progress_bar()
        record = evaluate(models, registry_name, dataset, variants, bench.batch, note, weights,
                          lambda f, msg: report(0.6 * f, msg))
        status.update(label=f"Timing {len(record.variants)} variants, interleaved, batch {bench.batch} ...")
        record.speed = measure_speed(models, registry_name, record.variants,
                                     question_inputs(models.questions(dataset), bench.device), bench,
                                     lambda f, msg: report(0.6 + 0.4 * f, msg))
        status.update(label=f"Done: {len(record.variants)} variants on {int(record.seen.sum())} questions.",
                      state="complete", expanded=False)
    return {"points": record.to_frame(), "answers": record.answers(), "weights": weights}


def _show(result: dict, file_stem: str) -> None:
    points: pd.DataFrame = result["points"]
    if "RANDOM" in result["weights"].upper():
        st.warning("RANDOM weights (a small untrained model): its answers and accuracy mean nothing; the points "
                   "show the machinery and the cost.")
    if points["metric"].iloc[0] == AGREEMENT:
        st.info("The questions have no answers: the y-axis is agreement of each variant's top answer with the "
                "unreduced model's, not accuracy.")
    st.plotly_chart(vqa_frontier_figure(points), key="vl_vqa_chart")
    first = points.iloc[0]
    st.caption(f"Intervals: {INTERVAL}. Throughput: median of {first.get('timing_rounds')} interleaved rounds of "
               f"{first.get('timing_iters')} forwards at batch {first.get('batch')} on {first.get('device')}, "
               f"measured {first.get('measured_at')} (1-minute load {first.get('load_1min_before')} before, "
               f"{first.get('load_1min_after')} after; {first.get('env_intra_op_threads')} threads). Peak memory: "
               "one forward per variant after the timed rounds, net of the weights and inputs (CPU: the allocator's "
               "live bytes through torch.profiler; CUDA: max_memory_allocated); saving against the unreduced model.")
    shown = points[[c for c in SHOWN if c in points]]
    st.dataframe(shown, hide_index=True, column_config={
        c: st.column_config.NumberColumn(format="%.3f") for c in ("score", "ci_low", "ci_high", "drop",
                                                                  "drop_ci_low", "drop_ci_high", "agreement")})
    d1, d2, d3 = st.columns(3)
    with d1:
        download_df(points, f"vqa_frontier_{file_stem}.csv", "Download points (CSV)")
    with d2:
        download_json(to_json(points, {"model": file_stem, "weights": result["weights"]}),
                      f"vqa_frontier_{file_stem}.json", "Download points (JSON)")
    with d3:
        download_df(result["answers"], f"vqa_answers_{file_stem}.csv", "Download answers per question (CSV)")


def vqa_frontier_section(registry_name: str, processor, load: Loader, model_name: str, weights: str, device: str,
                         random_weights: bool, default_size: int | None = None) -> None:
    """The section, for the page's chosen model: ``processor`` (the page's) opens the questions; ``load(size)`` gives
    the model and its processor at each input size the variants ask for (None: the default, ``default_size`` px
    where known: the reference); ``model_name``: the reference's provenance name, ``weights``: in words."""
    st.subheader("Accuracy on your questions: every variant against throughput")
    st.markdown(
        "Scores each variant of the method table for this model (the unreduced model, PuMer at the paper's setting "
        "and other ratios, its ablations, ToMe, EViT and the model at smaller input sizes, each size on its own "
        "model and images processed at that size) on **your questions**, with "
        "VQAv2's accuracy (the official answer normalisation, min(#annotators / 3, 1) averaged over the "
        "leave-one-out subsets), then times them on this machine, interleaved.")
    left, right = st.columns(2)
    with left:
        source = kept(st.radio, "Questions and images", key="vl_vqa_source", options=[UPLOAD, FOLDER],
                      horizontal=True)
        limit = int(kept(st.number_input, "Questions at most", 1, 1_000_000, key="vl_vqa_limit", default=200))
        try:
            opened = _dataset(processor, source, limit)
        except DatasetError as exc:
            st.error(str(exc))
            opened = None
    with right:
        variants = _variants(registry_name)
        batch = int(kept(st.number_input, "Batch (answering and timing)", 1, 256, key="vl_vqa_batch", default=8))
        rounds = int(kept(st.number_input, "Interleaved timing rounds", 1, 20, key="vl_vqa_rounds", default=3))
    key = (model_name, weights, device, opened[1] if opened else None)
    if st.button("Compute the VQA frontier", key="vl_vqa_compute", type="primary", disabled=opened is None):
        bench = BenchSettings(batch=batch, iters=2, rounds=rounds, warmup=1, device=device)
        note = "random weights" if random_weights else ""
        try:
            with st.spinner("Loading the model at each input size the variants ask for ..."):
                models = ModelsAtSizes.load(variants, load, device, default_size)
        except CheckpointError as exc:
            st.error(f"The model could not be loaded at every size the variants ask for: {exc}")
            return
        session_result(SLOT, (*key, time.monotonic()),
                       lambda: _compute(models, registry_name, opened[0], variants, f"{model_name}: {weights}", note,
                                        bench))
    with st.expander("A run from the command line (`python -m analysis.run vqa-frontier`)"):
        run = result_folder_input("vqa-frontier", key="vl_vqa_run")
        if run is None:
            st.caption("Run `python -m analysis.run vqa-frontier --model NAME --images FOLDER --questions FILE.jsonl "
                       "--out DIR` (or under torchrun) over a whole questions file, then give DIR here.")
        else:
            st.plotly_chart(vqa_frontier_figure(run.record), key="vl_vqa_run_chart")
    latest = latest_result(SLOT)
    if latest is None:
        return
    if latest[0][:4] != key:
        st.warning(f"Shown: the last frontier computed ({latest[0][0]}, {latest[0][3]}), not on the model or "
                   "questions chosen now; press **Compute the VQA frontier** for these.")
    _show(latest[1], latest[0][0].replace(" ", "_"))
