"""Build a registry model and put the resolved weights into it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from . import weights as W
from .checkpoints import CheckpointError, WeightsNotFoundError, _first, load_strict, read_state_dict
from .device import on_meta
from .registry import ModelSpec, get_spec, import_target, sized

CACHE_DIR = Path.home() / ".cache" / "vitlab"


@dataclass(frozen=True)
class LoadedModel:
    name: str
    spec: ModelSpec
    model: nn.Module
    weights: W.WeightsSource
    device: str
    data_config: dict
    transform: Callable

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_random(spec: ModelSpec) -> nn.Module:
    if spec.factory:
        return import_target(spec.factory)(**spec.factory_kwargs)
    import timm

    # The tag's config where there is one: it may change the head (in21k: 21843 classes; DINOv2: none).
    return timm.create_model(spec.pretrained_name or spec.timm_id, pretrained=False)


def _timm_filter(model: nn.Module, state_dict: dict) -> dict:
    """Apply the model module's own timm checkpoint converter (handles the official, non-timm key layouts)."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        return filter_fn(state_dict, model)
    except Exception:  # noqa: BLE001 - a checkpoint the converter cannot read is judged by load_strict below
        return state_dict


def load_file_into(model: nn.Module, path: str | Path, spec: ModelSpec | None = None) -> None:
    if spec is not None and spec.load_fn:
        import_target(spec.load_fn)(model, path)
        return
    state_dict = read_state_dict(path)
    load_strict(model, _timm_filter(model, state_dict), source=Path(path).name)


def _download_release(spec: ModelSpec) -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / f"{spec.weight_file_stem}.pth"
    if not target.is_file():
        try:
            torch.hub.download_url_to_file(spec.url, str(target), progress=True)
        except Exception as exc:  # noqa: BLE001 - network errors of any kind become one message
            target.unlink(missing_ok=True)
            raise WeightsNotFoundError(W.missing_weights_message(
                spec, f"Downloading {spec.url} failed: {type(exc).__name__}: {exc}.")) from exc
    return target


def checkpoint_path(spec: ModelSpec, source: W.WeightsSource) -> Path:
    """The local file holding the weights ``source`` names: the file itself, or the official release downloaded
    once into the cache."""
    if source.kind == W.LOCAL:
        return Path(source.location)
    if source.kind == W.URL:
        return _download_release(spec)
    raise ValueError(f"{source.description} is not a checkpoint file.")


def build_with_weights(spec: ModelSpec, source: W.WeightsSource) -> nn.Module:
    """A timm (or factory-built) model holding the weights ``source`` names."""
    if source.kind == W.RANDOM:
        return build_random(spec)
    if source.kind in (W.LOCAL, W.URL):
        model = build_random(spec)
        load_file_into(model, checkpoint_path(spec, source), spec)
        return model
    import timm

    try:
        return timm.create_model(spec.pretrained_name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - hub/cache failures of any kind become one message
        raise WeightsNotFoundError(W.missing_weights_message(
            spec, f"loading '{spec.pretrained_name}' from the Hugging Face hub failed: {type(exc).__name__}: {exc}")
        ) from exc


def data_config_for(model: nn.Module) -> dict:
    import timm.data

    given = {}
    if not getattr(model, "pretrained_cfg", None):  # built without timm's config: the patch grid fixes the size
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size:
            given["input_size"] = (3, *size)
    return timm.data.resolve_data_config(given, model=model)


def _timm_model_and_transform(spec: ModelSpec, source: W.WeightsSource) -> tuple[nn.Module, Callable, dict]:
    import timm.data

    model = build_with_weights(spec, source)
    cfg = data_config_for(model)
    return model, timm.data.create_transform(**cfg), cfg


def load_model(name: str, device: str = "cpu", user_file: str | Path | None = None,
               random_weights: bool = False, allow_network: bool = True,
               weights_folder: str | Path | None = None, input_size: int | None = None) -> LoadedModel:
    """Resolve, build, load and move a registry model; eval mode. Raises WeightsNotFoundError/CheckpointError.
    ``input_size``: one of the entry's ``input_sizes`` (METER: 576, 384, 288 px); None: its default."""
    spec = sized(get_spec(name), input_size)
    folder = Path(weights_folder).expanduser() if weights_folder else None
    source = W.resolve(spec, user_file=user_file, random_weights=random_weights, allow_network=allow_network,
                       folder=folder)
    if spec.loader:
        # Not one timm module and one file (ViLT: a transformers folder and its processor, the "transform").
        model, transform = import_target(spec.loader)(spec, source, folder)
        cfg = {"input_size": (3, spec.input_size, spec.input_size)}
    else:
        model, transform, cfg = _timm_model_and_transform(spec, source)
    return LoadedModel(name=name, spec=spec, model=model.eval().to(device), weights=source, device=str(device),
                       data_config=cfg, transform=transform)


# --------------------------------------------------------------------------------------------
# Which registry model a checkpoint belongs to (the sidebar upload infers it from the shapes)
# --------------------------------------------------------------------------------------------
_META_MODELS: dict[str, nn.Module | None] = {}


def meta_model(spec) -> nn.Module | None:
    """The spec's random-init architecture on the meta device (no memory, no init cost); cached per name."""
    if spec.name not in _META_MODELS:
        try:
            with on_meta():
                _META_MODELS[spec.name] = build_random(spec)
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta just never matches
            _META_MODELS[spec.name] = None
    return _META_MODELS[spec.name]


def _shape_diff(own: Mapping[str, tuple], state_dict: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshapen = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {own[k]}"
                 for k in own if k in state_dict and tuple(state_dict[k].shape) != own[k]]
    return missing, unexpected, misshapen


def checkpoint_mismatch(state_dict: Mapping[str, torch.Tensor], spec) -> str | None:
    """None when ``state_dict`` (as saved, or after timm's converter for the official layout) fits ``spec``'s
    architecture key for key and shape for shape; otherwise what differs, in one line."""
    model = meta_model(spec)
    if model is None:
        return f"{spec.name} cannot be built to compare shapes."
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    candidates = [state_dict]
    try:
        converted = _timm_filter(model, dict(state_dict))
        if converted is not state_dict:
            candidates.append(converted)
    except Exception:  # noqa: BLE001 - no converter for this layout: the raw keys are all there is
        pass
    best = None
    for candidate in candidates:
        missing, unexpected, misshapen = _shape_diff(own, candidate)
        if not (missing or unexpected or misshapen):
            return None
        if best is None or len(missing) + len(unexpected) + len(misshapen) < sum(map(len, best)):
            best = (missing, unexpected, misshapen)
    missing, unexpected, misshapen = best
    parts = []
    if misshapen:
        parts.append(f"{len(misshapen)} tensors differ in shape, e.g. {_first(misshapen, 2)}")
    if missing:
        parts.append(f"{len(missing)} keys missing, e.g. {_first(missing, 3)}")
    if unexpected:
        parts.append(f"{len(unexpected)} keys unexpected, e.g. {_first(unexpected, 3)}")
    return "; ".join(parts) + "."


def matching_models(state_dict: Mapping[str, torch.Tensor], specs) -> list[str]:
    """Names of the ``specs`` whose random-init state dict has exactly the keys and shapes of ``state_dict``."""
    return [spec.name for spec in specs if checkpoint_mismatch(state_dict, spec) is None]


__all__ = ["LoadedModel", "load_model", "build_random", "build_with_weights", "load_file_into", "checkpoint_mismatch",
           "matching_models",
           "CheckpointError", "WeightsNotFoundError"]
