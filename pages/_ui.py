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
from typing import Any

import streamlit as st

from analysis.images import ACCEPTED_TYPES, ImageError, NamedImage, load_image, sample_images
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.device import available_devices
from models.loading import LoadedModel, load_model
from models.weights import WEIGHTS_DIR_ENV

DEVICE_KEY = "vitlab_device"
FOLDER_KEY = "vitlab_weights_folder"
USER_WEIGHTS_KEY = "vitlab_user_weights"  # model name -> path of an uploaded checkpoint


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


def cached_model(name: str, random_weights: bool = False) -> LoadedModel | None:
    """The shared model, or None after showing why it could not be loaded (the page then stops)."""
    try:
        return _load_cached(name, current_device(), user_weight_files().get(name), random_weights,
                            weights_folder())
    except (WeightsNotFoundError, CheckpointError) as exc:
        st.error(str(exc.args[0] if exc.args else exc))
        return None


def random_weights_toggle(key: str, default: bool = False) -> bool:
    return st.checkbox("Use random weights (no pretrained file)", value=default, key=key,
                       help="Untrained weights show the mechanics and the speed, not what a trained model sees.")


def show_weights_banner(loaded: LoadedModel) -> None:
    if loaded.weights.is_random:
        st.warning(f"**{loaded.name} runs with RANDOM weights**: predictions, maps and scores below are those of "
                   "an untrained network. Provide the pretrained file (sidebar) for meaningful results.")
    else:
        st.caption(f"{loaded.name}: weights from {loaded.weights.description}, on {loaded.device}.")


def image_picker(key: str, multiple: bool = True, label: str = "Upload images") -> list[NamedImage]:
    """Uploaded images if any, else the bundled sample photos. Unreadable uploads are reported and skipped."""
    uploads = st.file_uploader(label, type=list(ACCEPTED_TYPES), accept_multiple_files=multiple, key=key,
                               help="JPEG, PNG, WebP, BMP, TIFF or GIF (first frame); up to about 90 megapixels.")
    files = uploads if isinstance(uploads, list) else ([uploads] if uploads else [])
    images: list[NamedImage] = []
    for f in files:
        try:
            images.append(load_image(f.getvalue(), name=f.name))
        except ImageError as exc:
            st.error(str(exc))
    if images:
        return images
    samples = sample_images()
    if files:
        st.info("No upload could be read; showing the bundled sample photos instead.")
    else:
        st.caption("No upload: using the bundled sample photos (scikit-learn's china.jpg and flower.jpg).")
    return samples if multiple else samples[:1]


def download_df(df, filename: str, label: str = "Download CSV", key: str | None = None) -> None:
    st.download_button(label, df.to_csv(index=False).encode(), file_name=filename, mime="text/csv",
                       key=key or f"dl-{filename}")


def download_json(obj: Any, filename: str, label: str = "Download JSON", key: str | None = None) -> None:
    st.download_button(label, json.dumps(obj, indent=2, default=str).encode(), file_name=filename,
                       mime="application/json", key=key or f"dl-{filename}")


def download_png(image_or_bytes, filename: str, label: str = "Download PNG", key: str | None = None) -> None:
    if isinstance(image_or_bytes, (bytes, bytearray)):
        data = bytes(image_or_bytes)
    else:
        buffer = io.BytesIO()
        image_or_bytes.save(buffer, format="PNG")
        data = buffer.getvalue()
    st.download_button(label, data, file_name=filename, mime="image/png", key=key or f"dl-{filename}")


def sidebar() -> None:
    """Device choice, weights folder and checkpoint upload; rendered by app.py on every page."""
    from models.registry import REGISTRY

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
            target = st.selectbox("For model", sorted(REGISTRY), key="vitlab_upload_model")
            upload = st.file_uploader("Checkpoint (.safetensors, .pth)", type=["safetensors", "pth", "pt", "bin"],
                                      key="vitlab_upload_ckpt")
            if upload is not None:
                data = upload.getvalue()
                digest = hashlib.sha256(data).hexdigest()[:16]
                suffix = Path(upload.name).suffix or ".pth"
                path = Path(tempfile.gettempdir()) / "vitlab_uploads" / f"{digest}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    path.write_bytes(data)
                user_weight_files()[target] = str(path)
                st.caption(f"{upload.name} will be used for {target}.")
