"""What a session keeps: computed results, kept widget values, the device, the weights folder and the
uploaded checkpoints, and the check that a page runs inside app.py.

Only session state lives here; every computation is in analysis/ or models/.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Hashable, Sequence

import streamlit as st

from analysis.data.images import NamedImage
from models.device import available_devices
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
