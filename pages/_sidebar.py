"""The sidebar app.py draws on every page: device, weights folder, and the checkpoint upload with its
inspection (which models the file fits).
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import streamlit as st

from models.checkpoints import CheckpointError, read_state_dict
from models.device import available_devices
from models.loading import checkpoint_mismatch, matching_models
from models.registry import REGISTRY, get_spec
from models.weights import WEIGHTS_DIR_ENV
from pages._state import DEVICE_KEY, FOLDER_KEY, TYPED_MODELS_KEY, kept, set_kept, user_weight_files, weights_folder


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
