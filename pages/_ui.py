"""Streamlit glue shared by the pages: sidebar state, cached models, image inputs, downloads.

Only widgets and caching live here; every computation is in analysis/ or models/.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import streamlit as st

from analysis.data.images import (ACCEPTED_TYPES, UPLOAD_MAX_SIDE, ImageError, NamedImage, load_image,
                                  sample_images)
from analysis.timing.memory import release_freed_memory
from analysis.provenance import weights_label
from models.checkpoints import CheckpointError, WeightsNotFoundError, read_state_dict
from models.device import available_devices
from models.loading import LoadedModel, checkpoint_mismatch, load_model, matching_models
from models.registry import FAMILY_LABELS, IMAGE_CLASSIFICATION, REGISTRY, MethodNotApplicable, get_spec
from models.timm_specs import NAME_EXAMPLE
from models.weights import WEIGHTS_DIR_ENV

DEVICE_KEY = "vitlab_device"
FOLDER_KEY = "vitlab_weights_folder"
USER_WEIGHTS_KEY = "vitlab_user_weights"  # model name -> path of an uploaded checkpoint


RESULTS_KEY = "vitlab_results"  # slot -> {key: result}; the one place pages keep what they computed
_MISSING = object()


def session_result(slot: str, key: Hashable, compute: Callable[[], Any] | None = None, keep: int = 1) -> Any:
    """The result stored in ``slot`` for ``key``; if there is none, ``compute()`` it and store it.

    Results live in ``st.session_state``, so they survive every rerun (downloads, other widgets) until
    the inputs they depend on (``key``) change. A slot holds the ``keep`` most recent keys, so moving a
    slider back is instant. Without ``compute`` the stored result (or None) is returned.
    """
    store = st.session_state.setdefault(RESULTS_KEY, {}).setdefault(slot, {})
    value = store.get(key, _MISSING)
    if value is not _MISSING:
        store[key] = store.pop(key)  # most recently used last
        return value
    if compute is None:
        return None
    value = compute()
    store[key] = value
    while len(store) > keep:
        store.pop(next(iter(store)))
    return value


def latest_result(slot: str) -> tuple[Hashable, Any] | None:
    """The most recent (key, result) of ``slot``, whatever its key: what a button last computed."""
    store = st.session_state.get(RESULTS_KEY, {}).get(slot)
    if not store:
        return None
    key = next(reversed(store))
    return key, store[key]


def progress_bar(text: str = "") -> Callable[[float, str], None]:
    """A progress bar and its callback in the one signature every analysis uses: ``(fraction, message)``."""
    bar = st.progress(0.0, text=text)
    return lambda fraction, message="": bar.progress(min(max(float(fraction), 0.0), 1.0), text=message or text)


KEPT_KEY = "vitlab_kept"  # widget key -> the value it last had: what the user chose survives other pages
UPLOADS_KEY = "vitlab_uploads"  # image uploader key -> [(file name, bytes)] of the readable files last uploaded
_INDEXED = {"selectbox": "index", "radio": "index", "multiselect": "default"}


def kept(widget: Callable, label: str, *args, key: str, default: Any = None, options: Sequence | None = None,
         **kwargs) -> Any:
    """``widget(label, *args, key=key, ...)`` whose value survives navigation and is always what it shows.

    Streamlit forgets a widget's value when its page is not rendered. The value is kept here under ``key`` in
    this session's own dict and passed back as the widget's value (index, default), so a widget that the browser
    mounts again, after another page or at any time, is drawn at exactly the value the page computes with. A
    stored choice that is no longer among ``options`` (a new upload, another model) falls back to ``default``
    (else the first option), and the browser is told so. ``widget`` is any of ``st``'s (or a column's)
    slider, number_input, checkbox, toggle, text_input, selectbox, radio or multiselect.
    """
    store = st.session_state.setdefault(KEPT_KEY, {})
    value = st.session_state[key] if key in st.session_state else store.get(key, default)
    kind = getattr(widget, "__name__", "")
    if options is not None:
        options = list(options)
        if kind == "multiselect":
            fixed = [v for v in (value or []) if v in options]
        else:
            fixed = value if value in options else (default if default in options else (options[:1] or [None])[0])
        if fixed != value and key in st.session_state:
            st.session_state[key] = fixed  # tells the browser too: a deleted key would leave it showing the old one
        value = fixed
        if kind in _INDEXED:
            kwargs[_INDEXED[kind]] = value if kind == "multiselect" else (options.index(value) if options else None)
        result = widget(label, options, *args, key=key, **kwargs)
    else:
        low, high = (args + (None, None))[:2] if kind in ("slider", "number_input") else (None, None)
        if low is not None and high is not None and value is not None and not low <= value <= high:
            value = default
            if key in st.session_state:
                st.session_state[key] = value
        result = widget(label, *args, value=value, key=key, **kwargs)
    store[key] = result
    return result


def set_kept(key: str, value: Any) -> None:
    """Set a kept widget's value before it is drawn (e.g. a model's trained setting when the model changes)."""
    st.session_state.setdefault(KEPT_KEY, {})[key] = value
    st.session_state[key] = value


TYPED_MODELS_KEY = "vitlab_typed_models"  # timm names typed on any page: the checkpoint upload offers them too


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


def image_set_key(images: Sequence[NamedImage]) -> str:
    """A digest of the images' names and pixels: results computed on them are stored under it."""
    digest = hashlib.sha1()
    for image in images:
        digest.update(image.name.encode())
        digest.update(image.image.tobytes())
    return digest.hexdigest()


def current_device() -> str:
    return st.session_state.get(DEVICE_KEY) or available_devices()[0]


def weights_folder() -> str:
    return st.session_state.get(FOLDER_KEY, os.environ.get(WEIGHTS_DIR_ENV, ""))


def user_weight_files() -> dict[str, str]:
    return st.session_state.setdefault(USER_WEIGHTS_KEY, {})


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


def sidebar() -> None:
    """Device choice, weights folder and checkpoint upload; rendered by app.py on every page."""
    with st.sidebar:
        devices = available_devices()
        st.selectbox("Device", devices, key=DEVICE_KEY,
                     help="Fastest present first: CUDA, Apple MPS, CPU. AMP is used on GPU when timing.")
        st.text_input("Weights folder", value=weights_folder(), key=FOLDER_KEY,
                      help=f"Holds <model name>.safetensors or .pth; default from ${WEIGHTS_DIR_ENV}.")
        folder = weights_folder()
        if folder and not Path(folder).expanduser().is_dir():
            st.warning(f"{folder} is not a folder.")
        with st.expander("Upload a checkpoint"):
            upload_checkpoint()


UPLOAD_MODEL_KEY, UPLOAD_FILE_KEY, UPLOAD_SEEN_KEY = "vitlab_upload_model", "vitlab_upload_ckpt", "vitlab_upload_seen"


@st.cache_data(show_spinner="Reading the checkpoint ...", max_entries=4)
def _inspect_checkpoint(path: str, typed: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str], str | None]:
    """(matching models, mismatch per other model, read error) for a saved upload: the registry's models and the
    timm names typed on the pages."""
    try:
        state_dict = read_state_dict(path)
    except CheckpointError as exc:
        return [], {}, str(exc)
    specs = list(REGISTRY.values()) + [get_spec(n) for n in typed if n not in REGISTRY]
    matches = matching_models(state_dict, specs)
    mismatches = {s.name: checkpoint_mismatch(state_dict, s) or "" for s in specs if s.name not in matches}
    return matches, mismatches, None


def _save_upload(upload) -> Path:
    """The upload on disk under its own file name (in a folder named by its content digest)."""
    data = upload.getvalue()
    folder = Path(tempfile.gettempdir()) / "vitlab_uploads" / hashlib.sha256(data).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / Path(upload.name).name
    if not path.exists():
        path.write_bytes(data)
    return path


def upload_checkpoint() -> None:
    """Upload a checkpoint; the architecture is inferred from its shapes and a file that does not fit is refused."""
    upload = st.file_uploader("Checkpoint (.safetensors, .pth)", type=["safetensors", "pth", "pt", "bin"],
                              key=UPLOAD_FILE_KEY)
    # What the pages load for each model is exactly what this widget holds now: removing or replacing the file
    # drops the old mapping (the cached model is keyed by the file, so a stale path would keep the old weights).
    used = user_weight_files()
    if upload is None:
        used.clear()
        st.session_state.pop(UPLOAD_SEEN_KEY, None)
        st.caption("The model it belongs to is recognised from the shapes of its tensors.")
        return
    path = _save_upload(upload)
    typed = tuple(st.session_state.get(TYPED_MODELS_KEY, {}))
    matches, mismatches, error = _inspect_checkpoint(str(path), typed)
    if error:
        used.clear()
        st.error(error)
        return
    options = matches + sorted(n for n in (*REGISTRY, *typed) if n not in matches)
    if st.session_state.get(UPLOAD_SEEN_KEY) != str(path):  # a new file: preselect what it fits
        st.session_state[UPLOAD_SEEN_KEY] = str(path)
        set_kept(UPLOAD_MODEL_KEY, options[0])
    target = kept(st.selectbox, "For model", key=UPLOAD_MODEL_KEY, options=options,
                  format_func=lambda n: f"{n} (fits)" if n in matches else n)
    used.clear()
    if target in matches:
        used[target] = str(path)
        st.success(f"{upload.name} is used for {target}.")
        return
    fits = (f" It fits {', '.join(matches)}." if matches else
            " It fits no model of the registry (type its timm name on a page, e.g. under 'Other timm models').")
    st.error(f"{upload.name} does not fit {target}: {mismatches.get(target, '')}{fits}")


def run_through_app() -> None:
    """Make sure a page runs inside app.py's navigation (sidebar, page titles), also on a fresh server.

    Streamlit starts in its legacy multipage mode when a ``pages/`` folder sits next to the main script,
    and stays there until ``st.navigation`` has run once; a first visit straight to a page URL would then
    run that page alone, without the sidebar. Leaving the legacy mode and rerunning lets app.py take over.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory and not st.session_state.get(APP_RUN_KEY):
        PagesManager.uses_pages_directory = False
        st.rerun()


APP_RUN_KEY = "vitlab_app_ran"


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
