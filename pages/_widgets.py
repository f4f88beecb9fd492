"""Widgets shared by the pages: progress bar, image picker, timm model names, random-weights choices,
a method's setting widgets, downloads, the weights banner and the cached model.

Only widgets and caching live here; every computation is in analysis/ or models/.
"""
from __future__ import annotations

import io
import json
from typing import Any, Callable, Sequence

import streamlit as st

from analysis.data.images import (ACCEPTED_TYPES, UPLOAD_MAX_SIDE, ImageError, NamedImage, load_image,
                                  sample_images)
from analysis.timing.memory import release_freed_memory
from analysis.provenance import weights_label
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.loading import LoadedModel, load_model
from models.registry import FAMILY_LABELS, IMAGE_CLASSIFICATION, MethodNotApplicable, get_spec
from models.timm_specs import NAME_EXAMPLE
from pages._state import TYPED_MODELS_KEY, UPLOADS_KEY, current_device, kept, user_weight_files, weights_folder


def progress_bar(text: str = "") -> Callable[[float, str], None]:
    """A progress bar and its callback in the one signature every analysis uses: ``(fraction, message)``."""
    bar = st.progress(0.0, text=text)
    return lambda fraction, message="": bar.progress(min(max(float(fraction), 0.0), 1.0), text=message or text)


def timm_model_names(key: str, *, attention: Sequence[str] = (), task: str | None = IMAGE_CLASSIFICATION,
                     multiple: bool = True) -> list[str]:
    """An "Other timm models" text input (kept across pages) and the names typed there that fit the page.

    Any timm name works (``vit_base_patch16_224.augreg_in21k_ft_in1k``, ``deit3_small_patch16_224``, a
    fine-tuned checkpoint of one through the sidebar's upload); its family and weights are inferred by
    ``models.registry.get_spec``. A name that is not a timm model, or does not fit the page (``attention``: the
    attention kinds it records; ``task``: what the page ranks), gets one sentence and is left out.
    """
    label = ("Other timm models (space separated; they run with those picked)" if multiple
             else "Other timm model (used instead of the one picked)")
    text = kept(st.text_input, label, key=key, default="", placeholder=NAME_EXAMPLE,
                help="Any timm model name, with or without its pretrained tag; its weights come from the weights "
                     "folder (a file named after the model), the Hugging Face hub, or the sidebar's upload.")
    names: list[str] = []
    for name in dict.fromkeys(text.split()[: None if multiple else 1]):
        try:
            spec = get_spec(name)
        except KeyError as exc:
            st.error(getattr(exc, "reason", "") or str(exc))
            continue
        except MethodNotApplicable as exc:
            st.error(str(exc))
            continue
        if attention and spec.attention not in attention:
            kinds = " or ".join(FAMILY_LABELS[k] for k in attention)
            st.error(f"{name} is a {spec.family_label} model, and this page records the attention of {kinds} models.")
        elif task and spec.task != task:
            st.error(f"{name} gives {spec.task} (timm num_classes=0: no classification head), and this page needs "
                     f"{task}.")
        else:
            names.append(name)
    st.session_state.setdefault(TYPED_MODELS_KEY, {}).update(dict.fromkeys(names))
    return names


@st.cache_resource(show_spinner="Loading model ...", max_entries=12)
def _load_cached(name: str, device: str, user_file: str | None, random_weights: bool, folder: str) -> LoadedModel:
    # One object per (model, weights, device) shared by every session: callers never mutate it.
    return load_model(name, device=device, user_file=user_file, random_weights=random_weights,
                      weights_folder=folder or None)


RANDOM_WEIGHTS_LABEL = "Use random weights (no pretrained file)"
RANDOM_MODELS_LABEL = "Run these with random weights (untrained)"


def cached_model(name: str, random_weights: bool = False, random_choice: str | None = None) -> LoadedModel | None:
    """The shared model, or None after showing why it could not be loaded (the page then stops or leaves it out).

    Missing weights are a normal first visit, not a fault: an info box says where to put the file and points to
    the random-weights choice (``random_choice``: the label of the page's widget). A checkpoint that is there but
    cannot be read or does not fit is an error."""
    try:
        return _load_cached(name, current_device(), user_weight_files().get(name), random_weights,
                            weights_folder())
    except WeightsNotFoundError as exc:
        choice = f"tick **{random_choice}**" if random_choice else "choose random weights on this page"
        st.info(f"{exc.args[0] if exc.args else exc} Or {choice} to run it untrained (every figure then says so).")
        return None
    except CheckpointError as exc:
        st.error(str(exc.args[0] if exc.args else exc))
        return None


def random_weights_toggle(key: str, default: bool = False) -> bool:
    return kept(st.checkbox, RANDOM_WEIGHTS_LABEL, key=key, default=default,
                help="Untrained weights show the mechanics and the speed, not what a trained model sees.")


def random_models_picker(models: Sequence[str], key: str) -> set[str]:
    """Per-model choice of random weights: only the ticked models run untrained, the others need their file."""
    picked = kept(st.multiselect, RANDOM_MODELS_LABEL, key=key, default=[], options=models,
                  help="Each model not ticked loads its pretrained weights, so a real model and an "
                       "untrained one can be compared side by side; every chart names its weights.")
    return set(picked)


def weights_text(loaded: LoadedModel, untrained_predictors: bool = False) -> str:
    """The weights source of one loaded model, as every export and figure title names it."""
    return weights_label(loaded.weights, untrained_predictors)


def show_weights_banner(loaded: LoadedModel) -> None:
    if loaded.weights.is_random:
        st.warning(f"**{loaded.name} runs with RANDOM weights**: predictions, maps and scores below are those of "
                   "an untrained network. Provide the pretrained file (sidebar) for meaningful results.")
    else:
        st.caption(f"{loaded.name}: weights from {loaded.weights.description}, on {loaded.device}.")


def _forget_uploads_if_emptied(key: str) -> None:
    # A change callback runs only when the user changed the uploader, never when it is drawn again empty.
    if not st.session_state.get(key):
        st.session_state.get(UPLOADS_KEY, {}).pop(key, None)


def image_picker(key: str, multiple: bool = True, label: str = "Upload images") -> list[NamedImage]:
    """Uploaded images if any, else the bundled sample photos. Unreadable uploads are reported and skipped.

    The readable uploads are kept in the session: a file uploader cannot be filled again after the user was on
    another page, so there it says which uploads are still used and offers a button to clear them. They go only
    when the user empties the uploader or clears them: an uploader drawn again empty is no removal.
    """
    stored = st.session_state.setdefault(UPLOADS_KEY, {})
    uploads = st.file_uploader(label, type=list(ACCEPTED_TYPES), accept_multiple_files=multiple, key=key,
                               on_change=_forget_uploads_if_emptied, args=(key,),
                               help="JPEG, PNG, WebP, BMP, TIFF or GIF (first frame); up to about 90 megapixels.")
    files = uploads if isinstance(uploads, list) else ([uploads] if uploads else [])
    images: list[NamedImage] = []
    readable: list[tuple[str, bytes]] = []
    for f in files:
        try:
            images.append(load_image(f.getvalue(), name=f.name, max_side=UPLOAD_MAX_SIDE))
            readable.append((f.name, f.getvalue()))
        except ImageError as exc:
            st.error(str(exc))
    if files:
        stored[key] = readable
    elif stored.get(key):
        images = [load_image(data, name=name, max_side=UPLOAD_MAX_SIDE) for name, data in stored[key]]
        noun = "image" if len(images) == 1 else "images"
        st.caption(f"Using your {len(images)} uploaded {noun}: " + ", ".join(im.name for im in images))
        if st.button("Clear the uploads", key=f"{key}_clear", help="Go back to the bundled sample photos."):
            stored.pop(key)
            st.rerun()
    release_freed_memory()  # the full-size decode is gone: hand its memory back
    if images:
        return images
    samples = sample_images()
    if files:
        st.info("No upload could be read; showing the bundled sample photos instead.")
    else:
        st.caption("No upload: using the bundled sample photos (scikit-learn's china.jpg and flower.jpg).")
    return samples if multiple else samples[:1]


def download_df(df, filename: str, label: str = "Download CSV", key: str | None = None) -> None:
    """A CSV download; ``df`` may be a function returning the frame, then it is only built when clicked."""
    data = (lambda: df().to_csv(index=False).encode()) if callable(df) else df.to_csv(index=False).encode()
    st.download_button(label, data, file_name=filename, mime="text/csv", key=key or f"dl-{filename}",
                       on_click="ignore")


def download_json(obj: Any, filename: str, label: str = "Download JSON", key: str | None = None) -> None:
    st.download_button(label, json.dumps(obj, indent=2, default=str).encode(), file_name=filename,
                       mime="application/json", key=key or f"dl-{filename}", on_click="ignore")


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def download_png(image_or_bytes, filename: str, label: str = "Download PNG", key: str | None = None) -> None:
    """A PNG download; a PIL image is only encoded when the button is clicked (encoding costs a rerun time)."""
    if isinstance(image_or_bytes, (bytes, bytearray)):
        data = bytes(image_or_bytes)
    else:
        data = lambda image=image_or_bytes: _png_bytes(image)  # noqa: E731
    st.download_button(label, data, file_name=filename, mime="image/png", key=key or f"dl-{filename}",
                       on_click="ignore")


def setting_widgets(method, key: str, container=st, main_default: Any = None, disabled: bool = False) -> dict:
    """One widget per setting of a method (``models.methods.Setting``), built from the setting alone: a checkbox
    for a switch, a slider over its span, a radio over its schedules, a select box over its choices. Keys are
    ``{key}_{symbol}``; returns the settings by key, as the method's forward takes them (``Method.arguments``)."""
    values = {}
    for index, setting in enumerate(method.settings):
        widget_key = f"{key}_{setting.symbol}"
        default = main_default if index == 0 and main_default is not None else setting.default
        label = f"{method.label}: {setting.label}"
        if setting.is_switch:
            value = kept(container.checkbox, label, key=widget_key, default=bool(default), help=setting.help or None,
                         disabled=disabled)
        elif setting.span:
            low, high, step = setting.span
            value = kept(container.slider, label, low, high, key=widget_key, default=default, step=step,
                         help=setting.help or None, disabled=disabled)
        else:
            value = kept(container.selectbox, label, key=widget_key, options=setting.choices, default=default,
                         help=setting.help or None, disabled=disabled)
        if setting.schedules:
            form = kept(container.radio, f"{method.label} schedule", key=f"{widget_key}_schedule",
                        options=setting.schedules, horizontal=True, help=setting.help or None, disabled=disabled)
            value = setting.scheduled(value, form)
        values[setting.key] = value
    return values
