"""Token reduction: where each method of the method table prunes, merges or fuses tokens, side by side on the same
images. The page names no method: its widgets come from each method's settings, its panels from its figures."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.data.images import model_view, to_batch
from analysis.provenance import images_label, label_rows
from analysis.token_reduction import (
    NO_REDUCTION,
    Chart,
    Note,
    Picture,
    Table,
    View,
    absent_methods_note,
    agreement_frame,
    choice_text,
    combine_runs,
    export_frame,
    figures_for,
    method_run,
    model_choices,
    plot_agreement,
    predictions_frame,
    reference_run,
    setting_sweep,
    sweep_values,
    tokens_per_block,
    tokens_per_block_figure,
)
from models.methods import METHODS
from models.registry import get_spec
from pages._results import dataset_run_section
from pages._state import current_device, image_set_key, kept, run_through_app, session_result, set_kept
from pages._widgets import (RANDOM_WEIGHTS_LABEL, cached_model, download_df, download_json, download_png, image_picker,
                            progress_bar, random_weights_toggle, setting_widgets, show_weights_banner, timm_model_names,
                            weights_text)

MAX_IMAGES = 8
SETTINGS_KEPT = 8  # results per setting kept in the session, so moving a slider back is instant


@st.cache_resource(show_spinner="Attaching untrained predictors ...", max_entries=4)
def _with_untrained_parts(name: str, weights: str, device: str, method_key: str, _backbone):
    # A separate cached copy: the shared backbone itself is never modified.
    return METHODS[method_key].with_untrained_parts(_backbone)


run_through_app()
st.title("Token reduction: pruning, merging and fusing tokens")
st.markdown("On the same images, every method of the method table that runs on the chosen model: where it drops, "
            "merges or fuses tokens, and how far its predictions move from the same model without reduction. "
            + " ".join(f"**{m.label}** ({m.reference})." for m in dict((m.label, m) for m in METHODS.values()
                                                                      if not m.plain_for).values()))

dataset_run_section(["keep-frequency", "tome-merge"], key="tr_run")

left, right = st.columns(2)
with left:
    typed = timm_model_names("tr_timm")  # image classifiers: a headless model gets one sentence
    choices = model_choices(typed)
    offered = [c for c, choice in choices.items() if choice.name in typed]
    if [n for n in typed if n not in {choices[c].name for c in offered}]:
        st.error("No method of the table runs on " + ", ".join(n for n in typed if n not in
                                                                 {choices[c].name for c in offered}) + ".")
    if offered and st.session_state.get("tr_typed") != offered:  # a newly typed model is the one shown
        st.session_state["tr_typed"] = offered
        set_kept("tr_model", offered[0])
    label = kept(st.selectbox, "Model", key="tr_model", options=choices,
                 format_func=lambda c: choice_text(c, choices[c]),
                 help="Each model lists the methods that run on it. Official token-pruning releases need their "
                      "weights (or random weights); a '+ UNTRAINED ... predictors' option attaches freshly "
                      "initialised score predictors to the backbone (its pruning is not learned).")
    random_weights = random_weights_toggle("tr_random")
with right:
    images = image_picker("tr_images", multiple=True)

choice = choices[label]
name, methods = choice.name, choice.methods()
spec = get_spec(name)
loaded = cached_model(name, random_weights, RANDOM_WEIGHTS_LABEL)
if loaded is None:
    st.stop()
show_weights_banner(loaded)
model = loaded.model
if choice.attached is not None:
    model = _with_untrained_parts(name, loaded.weights.description, current_device(), choice.attached.key,
                                  loaded.model)
    backbone = ("the same RANDOM backbone" if loaded.weights.is_random
                else f"the same trained backbone ({loaded.weights.description})")
    st.warning(f"The {choice.attached.label} score predictors are **untrained** (random): its maps below show the "
               f"mechanics, not what a trained {choice.attached.label} keeps. The other methods and the unreduced "
               f"model use {backbone}.")
backbone_weights = weights_text(loaded)
weights_tag = " (RANDOM weights)" if loaded.weights.is_random else ""

if len(images) > MAX_IMAGES:
    st.info(f"Using the first {MAX_IMAGES} of {len(images)} images.")
    images = images[:MAX_IMAGES]
names = [image.name for image in images]

# Each method's widgets, from its settings. A main setting starts at the value the release was trained for, and
# again whenever another model is picked.
settings: dict[str, dict] = {}
for column, method in zip(st.columns(len(methods)), methods):
    trained = None if method is choice.attached else method.trained_value(spec)
    main_key = f"tr_{method.main_setting.symbol}"
    if st.session_state.get(f"{main_key}_model") != label:
        st.session_state[f"{main_key}_model"] = label
        set_kept(main_key, trained or method.main_setting.default)
    with column:
        settings[method.key] = setting_widgets(method, "tr", main_default=trained)
        value = settings[method.key][method.main_setting.key]
        if trained is not None and abs(value - trained) > 1e-6:
            st.info(f"{name} was trained for {method.main_setting.symbol} = {trained:g}; at {value:.2f} its "
                    "predictors run at a setting they were not trained for (expect lower accuracy than the paper's).")
absent = absent_methods_note(spec, methods)
if absent:
    st.caption(absent)

# Each run is stored under the settings it depends on: a slider recomputes only its own method.
inputs = (label, loaded.weights.description, current_device(), image_set_key(images))
batch = session_result("tr_batch", inputs, lambda: to_batch(images, loaded.transform))
reference = session_result("tr_reference", inputs, lambda: reference_run(model, batch, methods), keep=2)
runs = []
for method in methods:
    try:
        result = session_result(f"tr_{method.key}", inputs + tuple(settings[method.key].values()),
                                lambda m=method: method_run(model, batch, m, settings[m.key]), keep=SETTINGS_KEPT)
    except ValueError as exc:  # a setting the model's schedule cannot run, or a model the method cannot walk
        st.error(f"{method.name}: {exc}")
        continue
    runs.append((method, settings[method.key], result))
comparison = combine_runs(names, reference, runs, choice.attached)
structured = comparison.structured
all_images = images_label(names)


def _run_weights(run) -> str:
    return weights_text(loaded, run.untrained_predictors)


def _labelled(frame: pd.DataFrame, image=None, frame_weights: str = backbone_weights) -> pd.DataFrame:
    """Model, weights, images and every method's settings on each row."""
    return export_frame(frame, comparison, name, frame_weights, image)


def _tags(run) -> str:
    return weights_tag + (" (untrained predictors)" if run.untrained_predictors else "")


def _show(items, run, key: str) -> None:
    """A method's pictures, charts, notes and tables, as its figures give them."""
    for item in items:
        if isinstance(item, Picture):
            st.image(item.image, caption=item.caption, width="stretch")
            download_png(item.image, item.file, item.label)
        elif isinstance(item, Chart):
            st.plotly_chart(item.figure, key=f"{key}_{item.key}")
        elif isinstance(item, Note):
            st.caption(item.text)
        elif isinstance(item, Table):
            download_df(_labelled(item.frame, frame_weights=_run_weights(run)), item.file, item.label)


@st.fragment
def detail_view() -> None:
    """The chosen image's panels: picking another image or other blocks reruns only this part."""
    image_name = kept(st.selectbox, "Image for the detailed view", key="tr_image", options=names)
    chosen = names.index(image_name)
    canvas = model_view(images[chosen].image, loaded.data_config)

    st.header("Side by side" + weights_tag)
    predictions = predictions_frame(comparison, chosen)
    per_image = agreement_frame(comparison, chosen).set_index("method")
    if structured:
        unreduced = f"all {comparison.unreduced_tokens[-1]} positions of the last map take the full path"
    else:
        unreduced = f"{comparison.num_tokens} tokens in every block"
    panels = {NO_REDUCTION: (canvas, unreduced)}
    for run in comparison.runs.values():
        view = View(canvas, chosen, image_name, name, _run_weights(run))
        panels[run.name] = figures_for(run.trace).summary(run, view)
    for column, (method, (picture, caption)) in zip(st.columns(len(panels)), panels.items()):
        with column:
            st.subheader(method)
            st.image(picture, caption=caption, width="stretch")
            # A static table wraps a long class name; the data grid clipped it mid-word in these narrow columns.
            top5 = predictions[predictions.method == method].drop(columns=["image", "method", "class index"])
            st.table(top5.style.format({"probability": "{:.3f}"}).hide(axis="index"))
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

    for key, run in comparison.runs.items():
        figures = figures_for(run.trace)
        st.header(figures.heading(run) + _tags(run))
        picked = {c.name: kept(st.multiselect, c.label, key=f"tr_{key}_{c.name}", options=c.options, default=c.default)
                  for c in figures.choices(run, comparison.depth)}
        view = View(canvas, chosen, image_name, name, _run_weights(run), _tags(run), picked)
        _show(figures.detail(run, view), run, f"tr_{key}")


detail_view()

for key, run in comparison.runs.items():
    _show(figures_for(run.trace).over_images(run, names, _tags(run)), run, f"tr_{key}")

counts = tokens_per_block(comparison)
chart_title = ("Positions taking each block's full path" if structured else "Tokens entering each block") + weights_tag
st.plotly_chart(tokens_per_block_figure(counts, chart_title, structured), key="tr_tokens")
download_df(_labelled(pd.DataFrame({"block": range(comparison.depth), **counts}), all_images),
            "tokens_per_block.csv", "Download tokens per block (CSV)")


@st.fragment
def sweep_view(run) -> None:
    """One method's sweep of its main setting reruns alone; its result stays until the images, model or settings
    change."""
    method, setting = run.method, run.method.main_setting
    schedule = setting.schedule_of(run.settings[setting.key])  # the sweep runs the form chosen above
    in_schedule = f", {schedule} schedule" if schedule else ""
    st.header(f"{method.label}: agreement with the unreduced model as {setting.symbol} changes"
              + (f" ({schedule} schedule)" if schedule else "") + _tags(run))
    largest = None
    if all(isinstance(c, int) for c in setting.choices):
        largest = kept(st.slider, f"Largest {setting.symbol} in the sweep", 2, max(setting.span[1], 2),
                       key=f"tr_{setting.symbol}max", default=16)
    others = {k: v for k, v in run.settings.items() if k != setting.key}
    values = sweep_values(setting, largest)
    sweep_key = inputs + tuple(others.values()) + (tuple(values), schedule)
    if st.button(f"Run the {setting.symbol} sweep on these images", key=f"tr_sweep_{setting.symbol}"):
        slot = st.empty()  # the progress bar goes when the sweep is done
        with slot:
            show = progress_bar(f"Sweeping {setting.symbol} ...")
        session_result(f"tr_sweep_{method.key}", sweep_key,
                       lambda: setting_sweep(model, batch, method, others, values,
                                             comparison.unreduced_tokens, progress=show, schedule=schedule))
        slot.empty()
    frame = session_result(f"tr_sweep_{method.key}", sweep_key)
    if frame is None:
        st.caption(f"Runs {method.name} once per {setting.symbol} ({', '.join(map(str, values))}{in_schedule}) and "
                   "compares with the unreduced model; GFLOPs per image are counted with torch's FlopCounterMode.")
        return
    title = f"{method.name} agreement{in_schedule}: {name}, {_run_weights(run)}, {all_images}"
    st.plotly_chart(plot_agreement(frame, title, x="value", x_title=setting.label, tokens="tokens_last_block",
                                   tokens_name="tokens entering the last block"), key=f"tr_sweep_chart_{method.key}")
    others_text = {s.column: others[s.key] for s in method.settings if s.key in others}
    labelled = label_rows(frame.rename(columns={"value": setting.column}), name, _run_weights(run), all_images,
                          others_text)
    file_stem = f"{method.key}_{setting.symbol}_sweep"
    csv, json_file = st.columns(2)
    with csv:
        download_df(labelled, f"{file_stem}.csv", f"Download the {setting.symbol} sweep (CSV)")
    with json_file:
        download_json(labelled.to_dict(orient="records"), f"{file_stem}.json",
                      f"Download the {setting.symbol} sweep (JSON)")


for run in comparison.runs.values():
    sweep_view(run)
