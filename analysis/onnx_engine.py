"""ONNX Runtime as a second engine: export a model or variant at one batch, check it, time and profile it.

``onnx_runner`` exports the forward (``torch.onnx.export``; the file is cached per model, variant, batch and
weights), refuses to time it unless ONNX Runtime's output equals eager PyTorch's within ``ATOL`` on the same
input, and returns a ``analysis.throughput.Runner`` that the throughput harness interleaves with the eager runs.
``profile_onnx`` attributes ONNX Runtime's own per-node profile to the operator classes and components of
``analysis.breakdown``.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ATOL = 1e-4
ENGINES = ("eager", "onnxruntime")
ENGINE_SUFFIX = " [onnxruntime]"
CACHE_DIR_ENV = "VITLAB_ONNX_CACHE"


class OnnxEngineError(ValueError):
    """A model that cannot run in ONNX Runtime here, in one sentence."""


class OnnxMismatchError(OnnxEngineError):
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
            os.replace(tmp, path)
            for extra in path.parent.glob(tmp.name + "*"):
                extra.unlink(missing_ok=True)
            return path
        except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one sentence
            tmp.unlink(missing_ok=True)
            errors.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    raise OnnxEngineError(f"{label} cannot be exported to ONNX ({errors[-1][:200]}); token-reduction forwards "
                          "pick tokens by data-dependent top-k and gathers, which the exporters do not trace.")


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


def onnx_runner(text: str, loaded, batch: int, device: str = "cpu", eager=None):
    """A throughput Runner running ``text`` (``NAME[@settings]``) in ONNX Runtime at ``batch`` only, checked
    against the eager forward first. ``eager``: the eager Runner (its FLOPs are reused)."""
    from analysis.throughput import Runner, make_runner

    eager = eager or make_runner(text, device=device, loaded=loaded)
    images = eager.make_inputs(batch)
    if not isinstance(images, torch.Tensor):
        raise OnnxEngineError(f"{text}: only image models run in ONNX Runtime here.")
    model = _model_of(eager.forward)
    path = export(eager.forward, model, images, onnx_path(eager.name, model, batch), eager.name)
    sess = session(path, device)
    diff = check_equal(sess, eager.forward, images, eager.name)
    input_name = sess.get_inputs()[0].name

    def make_inputs(n: int) -> np.ndarray:
        if n != batch:
            raise OnnxEngineError(f"{eager.name}: exported for batch {batch}, asked for {n}.")
        return images.cpu().numpy()

    runner = Runner(name=eager.name + ENGINE_SUFFIX, forward=lambda x: sess.run(None, {input_name: x}),
                    make_inputs=make_inputs, params=eager.params, weights=eager.weights,
                    flops_per_image=eager.flops_per_image)
    runner.max_abs_diff = diff
    runner.onnx_file = str(path)
    return runner


def onnx_runners(eager_runners, batch: int, device: str = "cpu") -> list:
    """An ONNX Runtime runner for each eager runner (same model, variant, weights and options), to time
    interleaved with them."""
    return [onnx_runner(eager.name, None, batch, device, eager=eager) for eager in eager_runners]


# ------------------------------------------------------------------------------ profiling
_ORT_CLASSES = {
    "compute": {"MatMul", "Gemm", "Conv", "FusedConv", "FusedMatMul", "MatMulNBits", "QLinearConv", "ConvTranspose",
                "Attention", "MultiHeadAttention", "NhwcConv", "FusedGemm", "QuickGelu_FusedMatMul"},
    "data movement": {"Reshape", "Transpose", "Concat", "Gather", "GatherElements", "GatherND", "Slice", "Split",
                      "Squeeze", "Unsqueeze", "Expand", "Flatten", "Pad", "Tile", "ScatterND", "ScatterElements",
                      "Identity", "Cast", "Shape", "ConstantOfShape", "Range", "ReorderInput", "ReorderOutput",
                      "DepthToSpace", "SpaceToDepth", "Trilu"},
    "element-wise": {"Add", "Sub", "Mul", "Div", "Relu", "Gelu", "FastGelu", "BiasGelu", "HardSwish", "HardSigmoid",
                     "Sigmoid", "Erf", "Tanh", "Exp", "Sqrt", "Pow", "Clip", "Where", "Neg", "Equal", "Less",
                     "Greater", "Not", "And", "Max", "Min", "QuickGelu", "Silu", "Mish", "Abs", "Log", "Reciprocal"},
    "normalisation": {"LayerNormalization", "SkipLayerNormalization", "BatchNormalization", "SimplifiedLayerNormalization",
                      "GroupNorm", "InstanceNormalization", "SkipSimplifiedLayerNormalization"},
    "softmax": {"Softmax", "LogSoftmax"},
    "token-reduction bookkeeping": {"TopK", "ArgMax", "ArgMin", "CumSum", "NonZero"},
}


def ort_op_class(op_type: str) -> str:
    for kind, members in _ORT_CLASSES.items():
        if op_type in members:
            return kind
    return "other"


def ort_component(node_name: str) -> str:
    """The component of an exported node from the module path in its name (``/blocks.0/attn/qkv/MatMul``)."""
    from analysis.breakdown import REST
    from models.scopes import ATTENTION, EMBEDDING, FFN, HEAD

    parts = [p.split(".")[0] for p in node_name.replace("::", "/").split("/") if p]
    lowered = [p.lower() for p in parts]
    if any(p in ("patch_embed", "stem", "conv_stem") for p in lowered[:3]):
        return EMBEDDING
    if any(p in ("attn", "mixer", "attention", "transformer_attn") for p in lowered):
        return ATTENTION
    if any(p in ("mlp", "ffn", "ffn0", "ffn1") for p in lowered):
        return FFN
    if any(p in ("head", "fc_norm", "conv_head", "classifier", "final_conv") for p in lowered[:3]):
        return HEAD
    return REST


def profile_onnx(text: str, loaded, *, batch: int, device: str = "cpu", iters: int = 5, warmup: int = 2,
                 progress: Callable[[float, str], None] | None = None):
    """``analysis.breakdown.Breakdown`` of the exported graph in ONNX Runtime: its own per-node profile (kernel
    time per node) by operator class and component, interleaved with unprofiled runs of the same session."""
    from analysis.breakdown import Breakdown, OpRow

    runner = onnx_runner(text, loaded, batch, device)
    images = runner.make_inputs(batch)
    path = Path(runner.onnx_file)
    plain_sess = session(path, device)
    prof_sess = session(path, device, profile=True)
    feed_name = plain_sess.get_inputs()[0].name
    for _ in range(warmup):
        plain_sess.run(None, {feed_name: images})
        prof_sess.run(None, {feed_name: images})
    plain, profiled = [], []
    for i in range(iters):
        for sess, times in ((plain_sess, plain), (prof_sess, profiled)):
            start = time.perf_counter()
            sess.run(None, {feed_name: images})
            times.append(1000 * (time.perf_counter() - start))
        if progress:
            progress((i + 1) / iters, f"{runner.name}: run {i + 1}/{iters}")
    trace_file = prof_sess.end_profiling()
    events = json.loads(Path(trace_file).read_text())
    Path(trace_file).unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed_runs = runs[-iters:]
    start_us = timed_runs[0]["ts"] if timed_runs else 0
    groups: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start_us:
            continue
        op_type = e.get("args", {}).get("op_name", "")
        node = e["name"][: -len("_kernel_time")]
        g = groups[(op_type, ort_op_class(op_type), ort_component(node))]
        g[0] += e["dur"]
        g[1] += 1
    rows = [OpRow(model=runner.name, op=op, op_class=kind, component=component, ms=us / 1000 / iters,
                  calls=calls / iters) for (op, kind, component), (us, calls) in groups.items()]
    rows.sort(key=lambda r: -r.ms)
    attributed = sum(r.ms for r in rows)
    run_ms = statistics.mean(r["dur"] / 1000 for r in timed_runs) if timed_runs else attributed
    return Breakdown(model=runner.name, batch=batch, device=device, precision="fp32", engine="onnxruntime",
                     weights=runner.weights, ops=rows, profiled_ms=profiled, plain_ms=plain,
                     attributed_ms=attributed, forward_scope_ms=run_ms,
                     note=f"ONNX Runtime {_ort_version()}, max |ORT - eager| = {runner.max_abs_diff:.1e}; node "
                          "times exclude the session's own work between nodes",
                     trace=json.dumps(events))


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
