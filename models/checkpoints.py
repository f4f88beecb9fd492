"""Reading checkpoint files safely and loading them strictly, with messages a person can act on."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


class WeightsNotFoundError(FileNotFoundError):
    """No weights could be found for a model; the message says where to put the file, ``tried`` lists each
    place looked at (for a details view)."""

    tried: list[str] = []


# Official releases wrap the state dict under one of these keys ({'model': ...} for DeiT and DynamicViT).
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, or a torch checkpoint with ``weights_only=True`` (never a bare pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoder error becomes one clear message
        raise CheckpointError(
            f"Could not read {path.name} as a safetensors or torch checkpoint "
            f"(only tensors are accepted, weights_only=True): {type(exc).__name__}: {exc}"
        ) from exc
    return unwrap_state_dict(obj, source=path.name)


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state dict (expected a mapping of parameter names to tensors).")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors.")
    # Checkpoints saved from DataParallel/DDP prefix every key with 'module.'.
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _first(names, n=5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` or raise CheckpointError listing missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshapen = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshapen:
        parts = [f"{source} does not fit {type(model).__name__}."]
        if misshapen:
            parts.append(f"Shape mismatch in {len(misshapen)} tensors, e.g. {_first(misshapen, 3)} "
                         "(weights of a different model size?).")
        if missing:
            parts.append(f"Missing {len(missing)} keys: {_first(missing)}.")
        if unexpected:
            parts.append(f"Unexpected {len(unexpected)} keys: {_first(unexpected)}.")
        raise CheckpointError(" ".join(parts))
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------
# Which registry model a checkpoint belongs to (the sidebar upload infers it from the shapes)
# --------------------------------------------------------------------------------------------
_META_MODELS: dict[str, nn.Module | None] = {}


def _meta_model(spec) -> nn.Module | None:
    """The spec's random-init architecture on the meta device (no memory, no init cost); cached per name."""
    if spec.name not in _META_MODELS:
        from .loading import build_random

        try:
            with torch.device("meta"):
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
    model = _meta_model(spec)
    if model is None:
        return f"{spec.name} cannot be built to compare shapes."
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    candidates = [state_dict]
    from .loading import _timm_filter

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
