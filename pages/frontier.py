"""Accuracy-throughput frontier: every chosen backbone and token-reduction setting, on your images and hardware."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from analysis.data.folders import DatasetError, folder_batches, image_batches
from analysis.runs.frontier import (
    FrontierSetting,
    evaluate,
    frontier_figure,
    join_points,
    json_records,
    measure_throughput,
    paper_points,
    setting_points,
    settings_methods,
)
from analysis.provenance import images_label, label_rows
from analysis.timing.harness import BenchSettings
from models.methods import METHODS
from models.registry import IMAGE_CLASSIFICATION, list_models
from pages._results import result_folder_input
from pages._state import current_device, image_set_key, kept, latest_result, run_through_app, session_result
from pages._widgets import (cached_model, download_df, download_json, image_picker, progress_bar, random_models_picker,
                            timm_model_names)

RESULT_SLOT = "frontier"
BATCH = 8


def _backbones() -> list[str]:
    """Image classifiers only (the registry's task): top-1 and agreement mean nothing for a VQA model."""
    return list_models(task=IMAGE_CLASSIFICATION)


run_through_app()
st.title("Accuracy vs throughput: what each setting buys here")
st.markdown(
    "Papers each draw their own accuracy-vs-speed chart on their own GPU. Here every backbone and token-reduction "
    "setting you pick runs on **your images** and is timed on **this machine**, interleaved. Each backbone streams "
    "the images once; every setting is evaluated on each batch. With a labelled folder (class sub-folders named by "
    "ImageNet index, WordNet id or class name) the y-axis is top-1 accuracy; otherwise it is top-1 **agreement** "
    "with the backbone's unreduced model, which is not accuracy. Bars are Wilson 95 % intervals: with a few hundred "
    "images, a one-point difference is noise."
)

left, right = st.columns(2)
with left:
    models = kept(st.multiselect, "Backbones", key="fr_models", options=_backbones(), default=["deit_tiny_patch16_224"])
    models += [n for n in timm_model_names("fr_timm") if n not in models]
    random_ok = random_models_picker(models, key="fr_random")
    chosen: dict[str, list] = {}
    schedules: list[str] = []
    methods = {m.key: m for name in models for m in settings_methods(name)}
    for key, method in methods.items():
        setting = method.main_setting
        offered = list(setting.choices)
        chosen[key] = kept(st.multiselect, f"{method.label}: {setting.label}", key=f"fr_values_{key}",
                           options=offered, default=[v for v in setting.picks or offered[:3] if v in offered],
                           help=setting.help or None)
        for form in setting.schedules[1:]:
            if kept(st.checkbox, f"Also {method.label}'s {form} schedule at the same {setting.symbol}",
                    key=f"fr_{key}_{form}", default=False):
                schedules.append(form)
with right:
    source = kept(st.radio, "Images", key="fr_source", options=["Sample photos / upload", "Folder on this machine"],
                  horizontal=True)
    if source == "Folder on this machine":
        folder = kept(st.text_input, "Folder path", key="fr_folder", default="",
                      help="Streamed recursively. Class sub-folders (ImageNet index, WordNet id or name) "
                           "give labels; otherwise agreement with the unreduced model is shown.")
        labelled = kept(st.checkbox, "The sub-folders are ImageNet classes (top-1 accuracy)", key="fr_labelled",
                        default=True)
        limit = kept(st.number_input, "Images at most", 1, 100_000, key="fr_limit", default=200)
        uploads = None
    else:
        uploads = image_picker("fr_images", multiple=True)
        folder, labelled, limit = "", False, None
    bench_batch = kept(st.number_input, "Throughput batch size", 1, 512, key="fr_batch", default=8)
    rounds = kept(st.number_input, "Interleaved timing rounds", 1, 20, key="fr_rounds", default=3)



def _bench_settings() -> BenchSettings:
    return BenchSettings(batch=int(bench_batch), iters=2, rounds=int(rounds), warmup=1, device=current_device())


def _load(name: str):
    return cached_model(name, random_weights=name in random_ok)


with st.expander("Dataset-scale results from the command line (`python -m analysis.run frontier`)"):
    run = result_folder_input("frontier", key="fr_run")
    if run is None:
        st.caption("Run `python -m analysis.run frontier --model NAME --data FOLDER --labels folder --out DIR` (once "
                   "per backbone, or under `torchrun`), then give DIR here and time its settings on this machine.")
    elif st.button("Time these settings on this machine", key="fr_run_time"):
        name = str(run.record["model"].iloc[0])
        loaded = _load(name)
        if loaded is not None:
            settings = [FrontierSetting.parse(t) for t in run.record["setting_key"]]
            speed = measure_throughput(loaded, settings, _bench_settings(), progress_bar("Timing ..."))
            session_result(RESULT_SLOT, ("run", str(run.folder), time.monotonic()),
                           lambda: {"points": join_points(run.record, speed), "skipped": [],
                                    "device": current_device(), "batch": int(bench_batch)})


def _images_now() -> str:
    """What the chosen images are, as a frontier result records them: the folder, or the images' digest."""
    return folder if uploads is None else image_set_key(uploads)


def _settings_for(name: str) -> list[FrontierSetting]:
    return setting_points(name, chosen, schedules)


def _batches(loaded):
    """(images, labels) batches with the model's own preprocessing, and how many there are."""
    if source == "Folder on this machine":
        return folder_batches(folder, loaded.transform, BATCH, int(limit), "folder" if labelled else "self")
    return image_batches(uploads, loaded.transform, BATCH)


failure = None  # why the last press of Compute gave no points: said as an error, the previous frontier stays
if st.button("Compute the frontier", type="primary", disabled=not models):
    if source == "Folder on this machine" and not folder.strip():
        st.error("Enter a folder path, or switch to the sample photos.")
        st.stop()
    accuracy_parts, speed_parts, skipped, failed = [], [], [], {}
    bench = _bench_settings()
    with st.status("Computing ...", expanded=True) as status:
        report = progress_bar()
        for m_index, name in enumerate(models):
            loaded = _load(name)
            if loaded is None:
                skipped.append(name)
                continue
            settings = _settings_for(name)
            status.update(label=f"{name}: evaluating {len(settings)} settings on the images")
            share, base = 1.0 / len(models), m_index / len(models)
            try:
                batches, total = _batches(loaded)
                record = evaluate(loaded, batches, settings, lambda f, msg: report(base + share * 0.5 * f, msg), total)
            except (DatasetError, ValueError) as exc:
                failed[name] = str(exc)
                continue
            accuracy_parts.append(record.to_frame())
            status.update(label=f"{name}: timing {len(settings)} settings, interleaved")
            speed_parts.append(measure_throughput(
                loaded, settings, bench, lambda f, msg: report(base + share * (0.5 + 0.5 * f), msg)))
        left_out = skipped + list(failed)
        if accuracy_parts:
            status.update(label=f"Done: {sum(len(p) for p in accuracy_parts)} points from {len(accuracy_parts)} "
                                f"backbone(s)" + (f"; left out: {', '.join(left_out)}" if left_out else ""),
                          state="complete", expanded=False)
        else:
            status.update(label="No points: no backbone could run", state="error", expanded=True)
    for name, message in failed.items():
        st.error(f"{name}: {message}")
    if not accuracy_parts:
        failure = ("No points were computed: " + ", ".join(left_out) + " could not run"
                   + (" (missing weights: provide the file, or tick it under *Run these with random weights*)."
                      if skipped else "."))
        st.error(failure)
    else:
        points = join_points(pd.concat(accuracy_parts, ignore_index=True), pd.concat(speed_parts, ignore_index=True))
        images_used = _images_now()
        image_names = folder if uploads is None else images_label([u.name for u in uploads])
        points = label_rows(points, None, points["weights"].tolist(), image_names)
        # A press of Compute always stores anew (timings differ run to run): the clock makes the key unique.
        session_result(RESULT_SLOT, ("live", tuple(models), images_used, time.monotonic()),
                       lambda: {"points": points, "skipped": skipped, "device": current_device(),
                                "batch": int(bench_batch), "images": images_used, "image_names": image_names})

# The last computed frontier stays until the next Compute, whatever else reruns the page.
latest = latest_result(RESULT_SLOT)
result = latest[1] if latest else None
if not result:
    if failure is None:
        st.info("Pick backbones and settings, then press **Compute the frontier**. Each backbone shows its progress.")
    st.stop()
if failure is not None:
    st.warning("Shown below: the previous frontier (" + ", ".join(sorted(result["points"]["model"].unique()))
               + f"; images: {result.get('image_names', result.get('images', ''))}), not a result of this press.")

points: pd.DataFrame = result["points"]
if "images" in result and result["images"] != _images_now():
    st.warning(f"This frontier was computed on other images ({result.get('image_names', '?')}), not on the ones chosen "
               "now: press **Compute the frontier** to compute it on these.")
if result["skipped"]:
    st.warning("Left out for missing weights: " + ", ".join(result["skipped"])
               + ". Tick them under *Run these with random weights* to include them untrained.")
random_models = sorted(points.loc[points["weights"].str.contains("RANDOM", na=False), "model"].unique())
if random_models:
    st.warning("RANDOM weights (untrained) for: " + ", ".join(random_models) + ". Their points show cost, not accuracy.")
untrained = sorted({METHODS[m].label for m in points.loc[points["setting"].str.contains("untrained predictors"),
                                                             "method"]})
if untrained:
    st.caption(f"{', '.join(untrained)} on a plain backbone uses untrained score predictors: its keep decisions are "
               "not learned, so its accuracy is a lower bound of what the trained model gets.")
paper = paper_points()
st.plotly_chart(frontier_figure(points, paper, f"On {result['device']}, batch {result['batch']}"), key="fr_chart")
st.caption("Left: measured here, on your images. Dotted: the measured Pareto frontier. Right, hollow grey markers: "
           "the papers' own ImageNet top-1 against V100 img/s, for orientation only (another metric, on other "
           "hardware: not this machine, not your images).")
shown = points[["model", "weights", "setting", "metric", "score", "ci_low", "ci_high", "images", "img_per_s",
                "ms_per_batch", "gflops"]]
st.dataframe(shown, hide_index=True,
             column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("score", "ci_low", "ci_high")})
d1, d2 = st.columns(2)
with d1:
    download_df(points, "frontier.csv", "Download points (CSV)")
with d2:
    download_json({"device": result["device"], "batch": result["batch"], "images": result.get("image_names", ""),
                   "images_digest": result.get("images", ""),
                   "points": json_records(points),
                   "methods": {k: METHODS[k].reference for k in METHODS}}, "frontier.json", "Download points (JSON)")
