"""Vision-language: PuMer on ViLT and METER. Ask a question about an image; see what the text prunes and what merges."""
from __future__ import annotations

import streamlit as st

from analysis.provenance import label_rows, title_line, with_title
from analysis.timing.env import environment_line
from analysis.vision_language import (CORRECTION_ARGUMENTS, PuMerSettings, answer_question, answers_frame,
                                      corrections_frame, counts_frame, for_display, merge_overlay, numbered_answers,
                                      pruned_overlay, pumer_models, records_to_json, steps_frame, text_groups_html,
                                      token_counts_figure, tokens)
from analysis.vision_language import paper_protocol, protocol_figure, protocol_frame, protocol_to_json
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.registry import batch_growth
from pages._state import (current_device, image_set_key, kept, run_through_app, session_result, user_weight_files,
                          weights_folder)
from pages._vqa_section import vqa_frontier_section
from pages._widgets import download_df, download_json, download_png, image_picker, progress_bar

MODELS = {entry.name: entry for entry in pumer_models()}


@st.cache_resource(show_spinner="Looking for the model ...", max_entries=4)
def _cached_model(name: str, random_weights: bool, folder: str, user_file: str | None, device: str,
                  image_size: int | None = None):
    """(model, processor, provenance name, weights label, None), or (None, ..., (what was tried, unreadable))
    when the weights are missing or cannot be read.

    A failed resolution is cached like a model (once per process, for every session): the hub is not asked
    again on every visit or rerun; the Retry button clears it."""
    try:
        model, processor, model_name, weights = MODELS[name].load(random_weights, folder or None, user_file,
                                                                  image_size)
    except WeightsNotFoundError as exc:
        tried = f"Tried: {'; '.join(exc.tried)}. " if exc.tried else ""
        return None, None, None, None, (tried + str(exc), False)
    except CheckpointError as exc:
        return None, None, None, None, (str(exc), True)
    return model.to(device), processor, model_name, weights, None


run_through_app()
st.title("Vision-language: PuMer on ViLT and METER")
st.markdown(
    "PuMer (ACL 2023) speeds up a vision-language model inside a few layers: it **prunes** the image patches the "
    "question attends to least, then **merges** similar image tokens and similar text tokens (ToMe matching), "
    "never mixing the two modalities. Ratios apply to the tokens entering each reduce layer, so they compound. "
    "Every decision is the one PuMer's code makes (csarron/PuMer); where that code looks wrong, a correction "
    "below switches it off and the page shows what it changes. The paper reports 1.7-2x throughput with < 1 % "
    "accuracy drop after fine-tuning with PuMer; here it runs off the shelf on the released fine-tuned models."
)

name = kept(st.radio, "Model", key="vl_model", options=MODELS, horizontal=True,
           format_func=lambda n: f"{MODELS[n].label} ({n})")
entry = MODELS[name]
st.markdown(entry.view.summary)
random_key = f"vl_random_{name}"
random_weights = kept(st.checkbox, f"Use a small random {entry.label} (no pretrained weights)", key=random_key,
                      default=False, help=f"A {entry.view.tiny_description} with random weights: it shows the mechanics only.")
image_size = None
if entry.image_sizes and not random_weights:
    image_size = kept(st.selectbox, "Image size", key=f"vl_size_{name}", options=entry.image_sizes,
                      default=entry.image_sizes[0], format_func=entry.size_label,
                      help="The image side the model sees (METER: a square crop; ViLT: the shorter side). The "
                           "released checkpoints were fine-tuned at the first size; smaller is faster and less "
                           "faithful (PuMer's smaller-resolution baseline; as a variant: NAME@size=320).")
model, processor, model_name, weights, missing = _cached_model(
    name, random_weights, weights_folder(), user_weight_files().get(name), current_device(), image_size)
if missing:
    details, unreadable = missing
    first = details.splitlines()[0]
    short = first if len(first) <= 240 else first[:240] + " ... (see below)"
    if unreadable:
        st.error(short)
    else:  # a first visit without the weights: the fix and the random model, not a fault
        st.info(entry.missing_message(weights_folder()))
    with st.expander("What was tried"):
        st.write(details)
    if st.button("Retry", key="vl_retry", help="Look for the weights again (after adding the files)."):
        _cached_model.clear()
        st.rerun()
    st.stop()
if random_weights:
    st.warning(f"**Random weights**: this {entry.view.tiny_description} is untrained, so its answers, attention "
               "scores and merges below are meaningless; they only show the mechanics. Timings of a model this "
               f"small say nothing about {entry.view.description}.")
else:
    size = f" at {entry.size_label(image_size)}" if image_size else ""
    st.caption(f"{entry.view.description}{size}: {weights}, on {current_device()}.")
    if numbered_answers(model):
        st.info("No answer list was found, so answers are shown by index ('answer #i'); the weights folder's "
                "ViLT-VQA config or a meter_vqa_labels.json gives them names.")

word, paper = entry.view.layer_word, entry.paper_settings()
presets = entry.layer_presets()
left, right = st.columns([1, 1])
with left:
    picked = image_picker("vl_image", multiple=False, label="Upload an image")[0]
    st.image(picked.image, caption=picked.name, width=360)
with right:
    question = kept(st.text_input, "Question", key="vl_question", default="What animal is in the picture?")
    # Each setting's widget is keyed vl_<its key in the method table>_<model>, by the forward argument it sets.
    keys = {"layers": f"vl_layers_{name}", "proportional": f"vl_proportional_{name}",
            **{s.argument: f"vl_{s.key}_{name}" for s in entry.method.settings}}
    preset = kept(st.radio, f"Reduce {word}s", key=keys["layers"], options=presets)
    prune = kept(st.slider, "Image prune ratio", 0.0, 0.5, key=keys["prune_ratio"], default=paper.prune_ratio, step=0.05)
    image_merge = kept(st.slider, "Image merge ratio", 0.0, 0.5, key=keys["image_merge_ratio"],
                       default=paper.image_merge_ratio, step=0.05)
    text_merge = kept(st.slider, "Text merge ratio", 0.0, 0.5, key=keys["text_merge_ratio"],
                      default=paper.text_merge_ratio, step=0.05)
    proportional = kept(st.checkbox, "Proportional attention (add log token size; PuMer's code does not)",
                        key=keys["proportional"], default=False)
    corrections = {}
    with st.expander("Corrections of PuMer's code (off: the paper's code)"):
        for setting in (s for s in entry.method.settings if s.argument in CORRECTION_ARGUMENTS):
            key = keys[setting.argument]
            if isinstance(setting.default, bool):
                corrections[setting.argument] = kept(st.checkbox, setting.label, key=key, default=setting.default,
                                                     help=setting.help)
            else:
                corrections[setting.argument] = kept(st.radio, setting.label, key=key, options=setting.choices,
                                                     default=setting.default, help=setting.help, horizontal=True)
            st.caption(setting.help)
    st.caption(f"Paper setting for {entry.label} (PuMer, ACL 2023): {word}s "
               f"{', '.join(map(str, paper.reduce_layers))}; prune {paper.prune_ratio:g}, image merge "
               f"{paper.image_merge_ratio:g}, text merge {paper.text_merge_ratio:g}.")

depth = entry.depth(model)
absent = [layer for layer in presets[preset] if layer >= depth]
if absent:
    st.caption(f"This model has {depth} {word}s (0-{depth - 1}): {word} {', '.join(map(str, absent))} of the "
               "preset does not exist here and reduces nothing.")
if not question.strip():
    st.info("Type a question about the image.")
    st.stop()

settings = PuMerSettings(reduce_layers=presets[preset], prune_ratio=prune, image_merge_ratio=image_merge,
                         text_merge_ratio=text_merge, proportional_attention=proportional, **corrections)
run_key = (name, image_set_key([picked]), question, settings, random_weights, weights, current_device(), model_name)
file_stem = model_name.replace(" ", "_")  # names the downloads; METER's includes its input size


def _answer():
    with st.status(f"Answering with {entry.label} and {entry.label}+PuMer, then timing both (interleaved) ...",
                   expanded=False) as status:
        answered = answer_question(model, processor, picked.image, question, settings, method=entry.method)
        status.update(label="Answered and timed.", state="complete")
    return answered


result = session_result("vl_answer", run_key, _answer)
speed, title = result.speed, title_line(model_name, weights, picked.name)
provenance = {"model": model_name, "weights": weights, "image": picked.name}


def _labelled(frame):
    return label_rows(frame, model_name, weights, picked.name)


def _titled(picture, what: str):
    return with_title(for_display(picture, 720), f"{what} | {title}")


def _gflops(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _paper_protocol_section() -> None:
    """PuMer's throughput protocol on request: the batch grown from the family's start, the best batch reported."""
    start, step = batch_growth(entry.spec.family)
    with st.expander(f"The paper's throughput protocol (batch from {start} in steps of {step})"):
        st.caption(f"As PuMer's paper measures throughput: the batch grows from {start} in steps of {step} until out "
                   "of memory or the time limit; both models are reported at the batch where the model without "
                   "PuMer is fastest, with each one's peak memory there. This question's first sample fills the "
                   "batch; the rounds are the ones set above.")
        limit = kept(st.number_input, "Time limit (s)", 10, 3600, key=f"vl_protocol_limit_{name}", default=120,
                     step=10, help="No larger batch starts after this long.")
        protocol_key = (run_key, limit)
        if st.button("Run the protocol", key="vl_protocol_run"):
            report = progress_bar("Growing the batch ...")
            session_result("vl_protocol", protocol_key, lambda: paper_protocol(
                model, processor, picked.image, question, settings, method=entry.method, family=entry.spec.family,
                time_limit=limit, progress=report))
        protocol = session_result("vl_protocol", protocol_key)
        if protocol is not None:
            _show_protocol(protocol)


def _show_protocol(protocol) -> None:
    best = protocol.speed
    for note in protocol.notes:
        st.caption(note)
    if best is None:
        st.warning("Not even the smallest batch could run: nothing to report.")
        return
    cols = st.columns(3)
    cols[0].metric(f"Best batch ({result.full_name} fastest)", str(protocol.best_batch))
    cols[1].metric(f"Samples/s, {result.full_name} / {result.pumer_name}",
                   f"{best.full_per_s:.1f} / {best.pumer_per_s:.1f}", f"{best.speedup:.2f}x")
    cols[2].metric("Peak memory saving at that batch",
                   "n/a" if best.memory_saving is None else f"{100 * best.memory_saving:.1f} %",
                   help=None if best.full_peak_mib is None else
                   f"{best.full_peak_mib:.1f} MiB without PuMer, {best.pumer_peak_mib:.1f} MiB with it.")
    st.plotly_chart(protocol_figure(protocol, title, result.full_name, result.pumer_name), key="vl_protocol_chart")
    frame = protocol_frame(protocol, result.full_name, result.pumer_name)
    st.dataframe(frame, hide_index=True)
    load = "" if protocol.load_average is None else f", 1-minute load average {protocol.load_average:.2f}"
    st.caption(f"Measured from {protocol.measured_at}{load} on {best.device}, {best.rounds} interleaved rounds of "
               f"{best.iters} forwards per batch: {environment_line(protocol.rows[0].environment)}; "
               f"memory: {best.memory_note}.")
    p1, p2 = st.columns(2)
    with p1:
        download_df(_labelled(frame), f"pumer_{file_stem}_paper_protocol.csv", "Download protocol rows (CSV)")
    with p2:
        download_json({**provenance, **protocol_to_json(protocol)}, f"pumer_{file_stem}_paper_protocol.json",
                      "Download protocol (JSON)")


st.subheader("Answers")
st.dataframe(answers_frame(result), hide_index=True)
cols = st.columns(4)
low, high = speed.spread
cols[0].metric("Speed-up (this question, batch 1)", f"{speed.speedup:.2f}x",
               help=f"Median of {speed.rounds} interleaved rounds; rounds ranged {low:.2f}x to {high:.2f}x.")
cols[1].metric(f"ms per batch, {result.full_name} / {result.pumer_name}", f"{speed.full_ms:.0f} / {speed.pumer_ms:.0f}")
if speed.full_gflops and speed.pumer_gflops is not None:
    change = 100 * (speed.pumer_gflops / speed.full_gflops - 1)
    cols[2].metric("GFLOPs with PuMer", _gflops(speed.pumer_gflops), f"{change:+.0f} %", delta_color="inverse",
                   help=f"Without PuMer: {_gflops(speed.full_gflops)} GFLOPs per batch.")
else:
    cols[2].metric("GFLOPs with PuMer", "n/a")
cols[3].metric("Peak memory saving", "n/a" if speed.memory_saving is None else f"{100 * speed.memory_saving:.1f} %",
               help=None if speed.full_peak_mib is None else
               f"Peak of one forward at batch {speed.batch}: {speed.full_peak_mib:.1f} MiB without PuMer, "
               f"{speed.pumer_peak_mib:.1f} MiB with it.")
st.caption(f"Speed-up: median of {speed.rounds} interleaved rounds of {speed.iters} forwards each on "
           f"{speed.device} after {speed.warmup} warm-up forwards per side; the rounds ranged {low:.2f}x to "
           f"{high:.2f}x (a wide range: a busy machine, time it again). Input {result.input_shape[0]}x"
           f"{result.input_shape[1]} px; memory: {speed.memory_note}.")
if speed.full_peak_mib is not None:
    st.caption(f"Peak memory of one forward at batch {speed.batch}, net of the weights and inputs: "
               f"{speed.full_peak_mib:.1f} MiB ({result.full_name}) and {speed.pumer_peak_mib:.1f} MiB "
               f"({result.pumer_name}); the paper reports 35-51 % less. Only one layer's activations are alive at "
               f"a time, so a peak reached before the first reduce {word} is one PuMer cannot lower."
               + ("" if speed.kept_saving is None else
                  f" With autograd on (every layer's activations kept, as in training): {speed.full_kept_mib:.1f} "
                  f"and {speed.pumer_kept_mib:.1f} MiB, {100 * speed.kept_saving:.1f} % less."))
_paper_protocol_section()


st.subheader(f"Tokens per {word}")
st.plotly_chart(token_counts_figure(result.trace, title, layer_word=word), key="vl_counts")

st.subheader(f"What each reduce {word} did")
st.caption("Left: patches pruned here in red (low text-to-image attention), gone earlier faded. "
           "Right: image tokens after this step, patches sharing one token share a colour. "
           "Below: question tokens, merged tokens share a colour; the number is the token they became.")
if not result.trace.steps:
    st.info(f"Nothing was reduced: no {word} of the preset exists in this model, or every ratio is 0.")
tabs = st.tabs([f"{word.capitalize()} {step.layer}" for step in result.trace.steps]) if result.trace.steps else []
for index, (tab, step) in enumerate(zip(tabs, result.trace.steps)):
    with tab:
        pruned_image, merged_image = pruned_overlay(result, index), merge_overlay(result, index)
        a, b = st.columns(2)
        a.image(for_display(pruned_image), caption=f"pruned: {tokens(int(step.image_pruned[0]), 'image token')}",
                width=360)
        b.image(for_display(merged_image),
                caption=f"merged away: {tokens(int(step.image_merged[0]), 'image token')}", width=360)
        st.html(text_groups_html(result, index))
        st.caption(f"merged away: {tokens(int(step.text_merged[0]), 'text token')}")
        d1, d2 = st.columns(2)
        with d1:
            download_png(_titled(pruned_image, f"PuMer {word} {step.layer}: pruned"),
                         f"pumer_{file_stem}_{word.replace(' ', '_')}{step.layer}_pruned.png",
                         "Download pruned map (PNG)")
        with d2:
            download_png(_titled(merged_image, f"PuMer {word} {step.layer}: merged"),
                         f"pumer_{file_stem}_{word.replace(' ', '_')}{step.layer}_merged.png",
                         "Download merge map (PNG)")

st.subheader("Records")
st.dataframe(steps_frame(result.trace, layer_word=word), hide_index=True)
d1, d2, d3 = st.columns(3)
with d1:
    download_json({**provenance, **records_to_json(result)}, f"pumer_{file_stem}_records.json",
                  "Download all records (JSON)")
with d2:
    download_df(_labelled(steps_frame(result.trace, layer_word=word)), f"pumer_{file_stem}_reduce_steps.csv",
                "Download reduce steps (CSV)")
with d3:
    download_df(_labelled(counts_frame(result.trace, layer_word=word)),
                f"pumer_{file_stem}_tokens_per_{word.replace(' ', '_')}.csv", f"Download tokens per {word} (CSV)")

st.subheader("What the corrections change")
st.caption("Your settings as PuMer's code runs them, then each correction flipped on its own, same image and "
           "question: the answer, how far the logits move, where the image CLS is after each reduce "
           f"{word}, and how many grid cells end up kept in one run and pruned in the other.")
st.dataframe(corrections_frame(result), hide_index=True)
download_df(_labelled(corrections_frame(result)), f"pumer_{file_stem}_corrections.csv",
            "Download correction effects (CSV)")



def _at_size(size: int | None):
    """The frontier's model and processor at an input size (None: the entry's default), through the page's cache."""
    loaded = _cached_model(name, random_weights, weights_folder(), user_weight_files().get(name), current_device(),
                           size)
    if loaded[4]:
        raise CheckpointError(loaded[4][0].splitlines()[0])
    return loaded[0], loaded[1]


vqa_frontier_section(name, processor, _at_size, entry.tiny_name if random_weights else entry.sized_name(None),
                     weights, current_device(), random_weights, None if random_weights else entry.spec.input_size)
