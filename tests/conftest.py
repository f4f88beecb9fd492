"""Shared fixtures: the real DeiT-Tiny weights and photographs from ../shared."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DEIT_TINY_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"
SHARED_IMAGES = sorted((SHARED / "images").glob("photo_*.jpg"))


def pytest_configure(config):
    config.addinivalue_line("markers", "shared: needs ../shared/weights or ../shared/images")
    config.addinivalue_line("markers", "browser: drives a real chromium")
    torch.set_num_threads(max(1, torch.get_num_threads()))


# CI sets this so that a missing ../shared or browser fails the run instead of skipping silently.
REQUIRE_ALL = os.environ.get("VITLAB_REQUIRE_ALL") == "1"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not DEIT_TINY_WEIGHTS.exists():
        message = "../shared/weights/deit_tiny_patch16_224.safetensors is not present"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session")
def deit_tiny_real(shared_dir):
    """timm DeiT-Tiny with the real ImageNet weights, in eval mode. Never mutate it in a test."""
    import timm

    model = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(DEIT_TINY_WEIGHTS)),
    )
    return model.eval()


@pytest.fixture(scope="session")
def shared_photos(shared_dir):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in SHARED_IMAGES]


@pytest.fixture(scope="session")
def deit_tiny_batch(deit_tiny_real, shared_photos) -> torch.Tensor:
    """The five shared photos preprocessed with DeiT-Tiny's own timm data config."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=deit_tiny_real)
    tf = timm.data.create_transform(**cfg)
    return torch.stack([tf(im) for im in shared_photos])


@pytest.fixture
def real_weights_folder(shared_dir, monkeypatch):
    """The app's environment with ../shared/weights as the weights folder and the hub switched off."""
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(shared_dir / "weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def downloads(monkeypatch):
    """Every file a page offers for download in an AppTest run, by file name: {name: bytes}."""
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id
    original_deferred = MediaFileManager.add_deferred

    def record(self, path_or_data, mimetype, kind, filename=None):
        if filename and isinstance(path_or_data, bytes):
            files[filename] = path_or_data
        return original(self, path_or_data, mimetype, kind, filename)

    def record_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        files[file_name] = data_callable()  # what a click would download
        return original_deferred(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    monkeypatch.setattr(MediaFileManager, "add_deferred", record_deferred)
    return files
