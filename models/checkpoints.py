"""Reading checkpoint files safely and loading them strictly, with messages a person can act on."""
from __future__ import annotations

import argparse
import json
import re
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


# The only non-tensor types a checkpoint may carry besides plain containers and numbers: training scripts store
# their command line (DynamicViT's and DeiT's ``main.py`` save ``args``, an ``argparse.Namespace``). Everything
# else that is not a tensor, a number, a string or a container is refused by ``weights_only=True``.
SAFE_CHECKPOINT_TYPES = (argparse.Namespace,)

# Official releases wrap the state dict under one of these keys ({'model': ...} for DeiT and DynamicViT).
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, or a torch checkpoint with ``weights_only=True`` (never a bare pickle), allowing
    exactly ``SAFE_CHECKPOINT_TYPES`` so that full training checkpoints (model, optimizer, scheduler, scaler,
    epoch, ``args``; Lightning's state_dict, optimizer_states, hyper_parameters, ...) load."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty: it is not a checkpoint.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_TYPES)):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoder error becomes one clear message
        short = _safetensors_shortfall(path) if path.suffix == ".safetensors" else None
        if short:
            need, exact = short
            raise CheckpointError(f"{path.name} is truncated: its header says the file holds {need:,} bytes"
                                  f"{'' if exact else ' or more'}, but it has {path.stat().st_size:,} (a download or "
                                  f"copy cut short?); fetch or copy it again.") from exc
        raise CheckpointError(_unreadable(path.name, exc)) from exc
    return unwrap_state_dict(obj, source=path.name)


def _safetensors_shortfall(path: Path) -> tuple[int, bool] | None:
    """The size a .safetensors file's own header declares when the file is shorter, and whether that size is exact
    (the header whole) or a lower bound (the file ends inside the header); None when it is not that kind of file.

    The format: an 8-byte little-endian header length, the JSON header, then the tensors' bytes at the header's
    ``data_offsets`` (counted from the header's end)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > 100_000_000:  # safetensors' own limit: no real header is larger
            return None
        if 8 + length > size:
            return 8 + length, False
        try:
            header = json.loads(f.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
    return (8 + length + end, True) if isinstance(end, int) and 8 + length + end > size else None


def _unreadable(name: str, exc: Exception) -> str:
    """One sentence on why a file could not be read. Never torch's own text: it advises ``weights_only=False``,
    which runs whatever code a pickle holds."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if refused:
        return (f"{name} holds a Python object ({refused.group(1)}) besides tensors; only tensors are read from a "
                "checkpoint (weights_only=True), so it is refused.")
    return f"{name} is not a PyTorch or safetensors checkpoint."


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


def state_dict_and_source(path_or_state_dict: str | Path | Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint given as a file, a wrapped or a plain state dict: (its state dict, what to call it in messages)."""
    if isinstance(path_or_state_dict, (str, Path)):
        return read_state_dict(path_or_state_dict), Path(path_or_state_dict).name
    return unwrap_state_dict(path_or_state_dict, source="state dict"), "state dict"


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
