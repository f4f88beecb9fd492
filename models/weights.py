"""The one weights resolver (DESIGN principle 5).

Order: a file (or folder) the user gave -> the weights folder ($VITLAB_WEIGHTS_DIR) -> the Hugging Face cache
-> the hub -> the official release URL -> a clear error. Random weights only when asked for, and then the
source says so. ``resolve`` decides without loading; ``models.loading`` loads what it decided.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlparse

from .checkpoints import WeightsNotFoundError
from .registry import FOLDER, ModelSpec

WEIGHTS_DIR_ENV = "VITLAB_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_HOST = "huggingface.co"
HUB_CONNECT_TIMEOUT_S = 1.5


class WeightsKind(str, Enum):
    LOCAL = "local file"
    HF_CACHE = "hf-cache"
    HUB = "hub"
    URL = "url"
    RANDOM = "random"
    MISSING = "missing"

    def __str__(self) -> str:
        return self.value


LOCAL, HF_CACHE, HUB, URL, RANDOM, MISSING = WeightsKind


@dataclass(frozen=True)
class WeightsSource:
    kind: WeightsKind
    location: str = ""  # a path, a hub id or a URL; for MISSING, what to put where

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
            MISSING: f"missing: {self.location}",
        }[self.kind]


def weights_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def local_weight_file(spec: ModelSpec, folder: Path | None = None) -> Path | None:
    """In the weights folder: ``<name>.safetensors`` (or .pth/.pt/.bin; also under the timm pretrained name), or
    for a folder layout the folder ``<repo name>/``."""
    folder = folder if folder is not None else weights_dir()
    if folder is None or not folder.is_dir():
        return None
    if spec.weights_layout == FOLDER:
        candidate = folder / spec.weight_file_stem
        return candidate if candidate.is_dir() else None
    stems = [spec.weight_file_stem] + [s for s in (spec.pretrained_name, spec.timm_id) if s]
    for stem in stems:
        for suffix in WEIGHT_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def hf_hub_id(spec: ModelSpec) -> str | None:
    if spec.hf_repo:
        return spec.hf_repo
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

    names = ("config.json",) if spec.weights_layout == FOLDER else ("model.safetensors", "pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def hub_offline() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline."""
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=4)
def host_reachable(host: str = HUB_HOST, timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """One quick TCP connect, remembered for the process, so an offline machine gets its message at once
    instead of every load waiting for the hub clients' retries. ``host_reachable.cache_clear()`` asks again."""
    if host == HUB_HOST and hub_offline():
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _where(folder: Path | None) -> str:
    return f"the folder {folder}" if folder else f"a folder named by the environment variable {WEIGHTS_DIR_ENV}"


def fix_instruction(spec: ModelSpec, folder: Path | None = None) -> str:
    """The one thing that makes the weights of ``spec`` available here, in one sentence."""
    folder = folder or weights_dir()
    if spec.weights_layout == FOLDER:
        target = (folder or Path(f"${WEIGHTS_DIR_ENV}")) / spec.weight_file_stem
        return (f"On a machine with internet run `hf download {spec.hf_repo} --local-dir {target}` and copy that "
                f"folder to {target} here (with {WEIGHTS_DIR_ENV} set to its parent).")
    released = Path(urlparse(spec.url).path).suffix if spec.url else ""
    name = (f"{spec.weight_file_stem}{released}" if released in WEIGHT_SUFFIXES
            else f"{spec.weight_file_stem}.safetensors (or .pth)")
    if not spec.companion_folders:
        return f"Put {name} in {_where(folder)}, or upload it in the sidebar's 'Upload a checkpoint'."
    base = folder or Path(f"${WEIGHTS_DIR_ENV}")
    companions = " and ".join(
        f"the folder {folder_name}/ with {', '.join(files)} of {repo} (`hf download {repo} {' '.join(files)} "
        f"--local-dir {base / folder_name}`)" for folder_name, repo, files in spec.companion_folders)
    return (f"Put {name} in {_where(folder)} (or upload it in the sidebar's 'Upload a checkpoint'), and {companions} "
            "beside it.")


def missing_weights_message(spec: ModelSpec, reason: str = "", folder: Path | None = None) -> str:
    """Two sentences (what is missing, what fixes it), then where the released weights live."""
    parts = [f"No pretrained weights found for {spec.name}" + (f" ({reason.rstrip('.')})." if reason else ".")]
    parts.append(fix_instruction(spec, folder))
    if spec.pretrained_name:
        parts.append(f"The released weights are timm's '{spec.pretrained_name}' on the Hugging Face hub.")
    if spec.url:
        parts.append(f"Official release: {spec.url}")
    return " ".join(parts)


def _hub_note(allow_network: bool) -> str:
    if hub_offline():
        return "the model hub is not asked: offline mode"
    return "the model hub cannot be reached from this machine" if allow_network else "network not allowed"


def _not_found(spec: ModelSpec, reasons: list[str], tried: list[str], folder: Path | None) -> WeightsNotFoundError:
    error = WeightsNotFoundError(missing_weights_message(spec, "; ".join(dict.fromkeys(reasons)), folder))
    error.tried = tried
    return error


def resolve(spec: ModelSpec, user_file: str | Path | None = None, random_weights: bool = False,
            allow_network: bool = True, folder: Path | None = None) -> WeightsSource:
    """Decide where the weights of ``spec`` come from, without loading them. Raises WeightsNotFoundError
    whose ``.tried`` has one line per place looked at."""
    if random_weights:
        return WeightsSource(RANDOM)
    folder = folder if folder is not None else weights_dir()
    if user_file:
        path = Path(user_file).expanduser()
        if path.exists():
            return WeightsSource(LOCAL, str(path))
        # A path the user named and mistyped must not silently fall back to another file.
        raise _not_found(spec, [f"the path you gave, {path}, does not exist", _hub_note(allow_network)],
                         [f"the path you gave ({path}): not present"], folder)
    tried: list[str] = []
    local = local_weight_file(spec, folder)
    if local is not None:
        return WeightsSource(LOCAL, str(local))
    tried.append(f"weights folder: {folder / spec.weight_file_stem}: not present" if folder
                 else f"weights folder: {WEIGHTS_DIR_ENV} not set")
    if in_hf_cache(spec):
        return WeightsSource(HF_CACHE, hf_hub_id(spec) if spec.weights_layout == FOLDER else spec.pretrained_name)
    tried.append("Hugging Face cache: not there")
    reachable = allow_network and host_reachable()
    if reachable and (spec.pretrained_name or spec.hf_repo):
        return WeightsSource(HUB, spec.pretrained_name or spec.hf_repo)
    if spec.url and allow_network and host_reachable(urlparse(spec.url).hostname or ""):
        return WeightsSource(URL, spec.url)
    reasons = []
    if spec.url:
        reasons.append("the official release cannot be reached" if allow_network else "network not allowed")
        tried.append(f"official release {spec.url}: {reasons[-1]}")
    if spec.pretrained_name or spec.hf_repo:
        reasons.append(_hub_note(allow_network))
        tried.append(f"Hugging Face hub: {reasons[-1]}")
    raise _not_found(spec, reasons, tried, folder)


def status(spec: ModelSpec, folder: Path | None = None, user_file: str | Path | None = None) -> WeightsSource:
    """Where the weights of ``spec`` would come from (never downloads): ``resolve``'s answer, or MISSING with
    the fix."""
    try:
        return resolve(spec, user_file=user_file, folder=folder)
    except WeightsNotFoundError:
        return WeightsSource(MISSING, fix_instruction(spec, folder))
