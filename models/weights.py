"""The one weights resolver (DESIGN principle 5).

Order: a file the user gave (upload or path) -> the weights folder ($VITLAB_WEIGHTS_DIR) ->
the Hugging Face cache -> the hub through timm -> the official release URL -> a clear error.
Random weights only when asked for, and then the source says so.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import WeightsNotFoundError
from .registry import ModelSpec

WEIGHTS_DIR_ENV = "VITLAB_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_HOST = "huggingface.co"

LOCAL, HF_CACHE, HUB, URL, RANDOM, MISSING = "local file", "hf-cache", "hub", "url", "random", "missing"


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # one of LOCAL, HF_CACHE, HUB, URL, RANDOM
    location: str = ""  # a path, a hub id or a URL

    @property
    def is_random(self) -> bool:
        return self.kind == RANDOM

    @property
    def description(self) -> str:
        return {
            LOCAL: f"local file {self.location}",
            HF_CACHE: f"Hugging Face cache ({self.location})",
            HUB: f"Hugging Face hub ({self.location})",
            URL: f"official release {self.location}",
            RANDOM: "RANDOM weights (untrained: predictions are meaningless)",
        }[self.kind]


def weights_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def local_weight_file(spec: ModelSpec, folder: Path | None = None) -> Path | None:
    """``<name>.safetensors`` (or .pth/.pt/.bin) in the weights folder, also under the timm pretrained name."""
    folder = folder if folder is not None else weights_dir()
    if folder is None or not folder.is_dir():
        return None
    stems = [spec.weight_file_stem] + [s for s in (spec.pretrained_name, spec.timm_id) if s]
    for stem in stems:
        for suffix in WEIGHT_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def hf_hub_id(spec: ModelSpec) -> str | None:
    if not spec.pretrained_name:
        return None
    import timm.models

    cfg = timm.models.get_pretrained_cfg(spec.pretrained_name)
    return getattr(cfg, "hf_hub_id", None) if cfg else None


def in_hf_cache(spec: ModelSpec) -> bool:
    repo = hf_hub_id(spec)
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return True
    return False


@functools.lru_cache(maxsize=4)
def host_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine gets a clear message at once instead of long retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def missing_weights_message(spec: ModelSpec, reason: str = "", folder: Path | None = None) -> str:
    folder = folder or weights_dir()
    where = f"the folder {folder}" if folder else f"a folder named by the environment variable {WEIGHTS_DIR_ENV}"
    parts = [f"No pretrained weights found for {spec.name}."]
    if reason:
        parts.append(reason)
    parts.append(
        f"Put {spec.weight_file_stem}.safetensors (or .pth) in {where} or upload it in the app's sidebar; "
        "to explore the mechanics without it, use random weights (the pages' checkbox, the CLIs' --random-weights)."
    )
    if spec.pretrained_name:
        parts.append(f"The released weights are timm's '{spec.pretrained_name}' on the Hugging Face hub.")
    if spec.url:
        parts.append(f"Official release: {spec.url}")
    return " ".join(parts)


def resolve(spec: ModelSpec, user_file: str | Path | None = None, random_weights: bool = False,
            allow_network: bool = True, folder: Path | None = None) -> WeightsSource:
    """Decide where the weights of ``spec`` come from, without loading them."""
    if random_weights:
        return WeightsSource(RANDOM)
    if user_file:
        path = Path(user_file).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"The weights file {path} does not exist.")
        return WeightsSource(LOCAL, str(path))
    local = local_weight_file(spec, folder)
    if local is not None:
        return WeightsSource(LOCAL, str(local))
    if in_hf_cache(spec):
        return WeightsSource(HF_CACHE, spec.pretrained_name or "")
    if allow_network and host_reachable():
        if spec.pretrained_name:
            return WeightsSource(HUB, spec.pretrained_name)
        if spec.url:
            return WeightsSource(URL, spec.url)
    reason = "The model hub cannot be reached from this machine." if allow_network else ""
    raise WeightsNotFoundError(missing_weights_message(spec, reason, folder))


def _vilt_status(folder: Path | None) -> tuple[str, str]:
    from huggingface_hub import try_to_load_from_cache

    from .vilt_pumer import VILT_FOLDER_NAME, VILT_VQA_REPO

    folder = folder if folder is not None else weights_dir()
    if folder is not None and (folder / VILT_FOLDER_NAME).is_dir():
        return LOCAL, str(folder / VILT_FOLDER_NAME)
    if isinstance(try_to_load_from_cache(VILT_VQA_REPO, "config.json"), str):
        return HF_CACHE, VILT_VQA_REPO
    if host_reachable():
        return "downloadable", VILT_VQA_REPO
    return MISSING, f"put the folder {VILT_FOLDER_NAME}/ (save_pretrained of {VILT_VQA_REPO}) in ${WEIGHTS_DIR_ENV}"


def status(spec: ModelSpec, folder: Path | None = None) -> tuple[str, str]:
    """(kind, detail) for the home page: local file / hf-cache / downloadable / missing. Never downloads."""
    from .registry import VILT

    if spec.family == VILT:
        return _vilt_status(folder)
    local = local_weight_file(spec, folder)
    if local is not None:
        return LOCAL, str(local)
    if in_hf_cache(spec):
        return HF_CACHE, spec.pretrained_name or ""
    if (spec.pretrained_name or spec.url) and host_reachable():
        return "downloadable", spec.pretrained_name or spec.url or ""
    return MISSING, f"put {spec.weight_file_stem}.safetensors in ${WEIGHTS_DIR_ENV}"
