"""ONNX Runtime as an engine (``analysis.timing.engines``): export a model or variant at one batch, check it, time
and profile it.

``onnx_runner`` (the ``onnxruntime`` record's wrap) exports the forward (``torch.onnx.export``; the file is cached
per model, variant, batch and weights), refuses to time it unless ONNX Runtime's output equals eager PyTorch's
within ``ATOL`` on the same input, and returns a copy of the eager ``analysis.timing.harness.Runner`` that the
throughput harness interleaves with the eager runs.
``analysis.breakdown.profile_onnx`` attributes ONNX Runtime's own per-node profile to its operator classes and
components.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from analysis.timing.engines import ONNX_RUNTIME, EngineMismatch, EngineRefused

ATOL = ONNX_RUNTIME.tolerance
CACHE_DIR_ENV = "VITLAB_ONNX_CACHE"


class OnnxEngineError(EngineRefused):
    """A model that cannot run in ONNX Runtime here, in one sentence."""


class OnnxMismatchError(OnnxEngineError, EngineMismatch):
    """ONNX Runtime's output differs from eager PyTorch's: the export is not timed."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "vitlab" / "onnx"))


class _Forward(nn.Module):
    """A variant's forward (a function of the images) as a module torch.onnx.export can trace."""

    def __init__(self, model: nn.Module, forward: Callable) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_fn(x)
        return out[0] if isinstance(out, tuple) else out


def _model_of(forward: Callable) -> nn.Module:
    """The module a runner's forward runs: the model itself, or the first argument bound to a method's forward."""
    if isinstance(forward, nn.Module):
        return forward
    model = getattr(forward, "args", (None,))[0]
    if not isinstance(model, nn.Module):
        raise OnnxEngineError("this forward has no model to export.")
    return model


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        flat = tensor.detach().reshape(-1)
        digest.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def onnx_path(label: str, model: nn.Module, batch: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return cache_dir() / f"{safe}_b{batch}_{_weights_digest(model)}.onnx"


def export(forward: Callable, model: nn.Module, example: torch.Tensor, path: Path, label: str) -> Path:
    """Export once (TorchScript exporter, then the dynamo one); a forward that cannot export says why."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _Forward(model, forward).eval()
    errors = []
    for dynamo in (False, True):
        tmp = path.with_suffix(f".tmp{os.getpid()}.onnx")
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                kwargs = dict(input_names=["images"], output_names=["logits"], dynamo=dynamo)
                if not dynamo:
                    kwargs["opset_version"] = 17
                torch.onnx.export(module, (example,), str(tmp), **kwargs)
            _save_self_contained(tmp, path)
            return path
        except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one sentence
            for extra in path.parent.glob(tmp.name + "*"):
                extra.unlink(missing_ok=True)
            errors.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    raise OnnxEngineError(f"{label} cannot be exported to ONNX ({errors[-1][:200]}); token-reduction forwards "
                          "pick tokens by data-dependent top-k and gathers, which the exporters do not trace.")


def _save_self_contained(tmp: Path, path: Path) -> None:
    """``tmp`` as one file at ``path``: the dynamo exporter may write the weights beside the graph as external data
    named after ``tmp`` (``tmp.onnx.data``), which a renamed graph would no longer find; loading it with its data
    and saving it whole keeps the weights in the file (the models here are far below protobuf's 2 GB)."""
    import onnx

    model = onnx.load(str(tmp), load_external_data=True)
    staged = path.with_suffix(f".staged{os.getpid()}.onnx")
    onnx.save_model(model, str(staged))
    os.replace(staged, path)
    for extra in path.parent.glob(tmp.name + "*"):
        extra.unlink(missing_ok=True)


def session(path: Path, device: str = "cpu", profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "vitlab_ort")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def check_equal(sess, forward: Callable, inputs: torch.Tensor, label: str, atol: float = ATOL) -> float:
    """Max |ONNX Runtime - eager| on the same input; raises ``OnnxMismatchError`` above ``atol``."""
    with torch.inference_mode():
        expected = forward(inputs)
    expected = (expected[0] if isinstance(expected, tuple) else expected).float().cpu().numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: inputs.cpu().numpy()})[0]
    if got.shape != expected.shape:
        raise OnnxMismatchError(f"{label}: ONNX Runtime returns shape {got.shape}, eager PyTorch {expected.shape}; "
                                "not timed.")
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:
        raise OnnxMismatchError(f"{label}: ONNX Runtime's output differs from eager PyTorch by up to {diff:.2g} "
                                f"(more than {atol:g}); not timed.")
    return diff


def onnx_runner(eager, batch: int, device: str = "cpu"):
    """The eager ``analysis.timing.harness.Runner`` run in ONNX Runtime at ``batch`` only (the same model, variant,
    weights, options and name), checked against the eager forward first; its FLOPs are the eager runner's."""
    images = eager.make_inputs(batch)
    if not isinstance(images, torch.Tensor):
        raise OnnxEngineError(f"{eager.name}: only image models run in ONNX Runtime here.")
    model = _model_of(eager.forward)
    path = export(eager.forward, model, images, onnx_path(eager.name, model, batch), eager.name)
    sess = session(path, device)
    diff = check_equal(sess, eager.forward, images, eager.name)
    input_name = sess.get_inputs()[0].name

    def make_inputs(n: int) -> np.ndarray:
        if n != batch:
            raise OnnxEngineError(f"{eager.name}: exported for batch {batch}, asked for {n}.")
        return images.cpu().numpy()

    runner = dataclasses.replace(eager, make_inputs=make_inputs, forward=lambda x: sess.run(None, {input_name: x}))
    runner.max_abs_diff = diff
    runner.onnx_file = str(path)
    return runner


