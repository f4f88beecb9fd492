"""Device choice, synchronisation and mixed precision (DESIGN principle 6)."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys

import torch


def available_devices() -> list[str]:
    """Devices this machine can run on, fastest first: CUDA, then Apple MPS, then CPU."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def default_device() -> str:
    return available_devices()[0]


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels so that a clock read after this call covers them."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def autocast(device: str | torch.device, enabled: bool = True, dtype: torch.dtype | None = None):
    """AMP on GPU (fp16 on CUDA unless bf16 is asked for); a no-op context on CPU."""
    kind = torch.device(device).type
    if not enabled or kind == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, dtype=dtype or torch.float16)


def device_hardware(device: str) -> str:
    """What a result says it ran on: the GPU's name on CUDA, else the device itself ('cpu', 'mps')."""
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else device


def cpu_threads() -> int:
    """Threads torch uses for intra-op parallelism in this process."""
    return torch.get_num_threads()


def set_cpu_threads(threads: int) -> int:
    """Set torch's intra-op threads (process-wide) and return the previous count, to set back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    return previous


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timm_version() -> str:
    """timm's version, without importing timm where nothing has yet: its import is about 2.5 s of a fresh process's
    start (through torchvision, torch._dynamo), which the environment CLI and the timing probes otherwise paid for
    one string."""
    module = sys.modules.get("timm")
    return module.__version__ if module is not None else importlib.metadata.version("timm")


def hardware_info() -> dict[str, str]:
    """What the home page and every exported benchmark record say about the machine."""
    info = {
        "cpu": cpu_name(),
        "cpu_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "timm": timm_version(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["cuda"] = str(torch.version.cuda)
    else:
        info["gpu"] = "none"
    return info


# Written out because torch has no switch for it: ``torch.device("meta")`` alone still runs every weight
# initialiser, and on meta tensors each in-place op goes through torch's Python reference implementations (about
# 0.2 s a model: 6-8 s for the registry's architectures, which the method checks and the checkpoint matching build
# in a fresh process). Only ops that change values and keep the shape are skipped; a meta tensor has no values.
_VALUE_ONLY_IN_PLACE = frozenset({
    "uniform_", "normal_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_", "clamp_min_", "clamp_max_", "fill_",
    "zero_", "copy_", "exp_", "log_", "sqrt_", "abs_", "neg_", "pow_", "reciprocal_", "bernoulli_", "exponential_",
    "log_normal_", "cauchy_", "geometric_", "random_", "fill_diagonal_", "addcmul_", "addcdiv_", "lerp_",
})


class _SkipMetaInitialisation(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in _VALUE_ONLY_IN_PLACE and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta():
    """Build modules on the meta device (shapes only, no memory) without running their weight initialisers.
    Thread-local, like ``torch.device``: a Streamlit session building a real model meanwhile is not affected."""
    with torch.device("meta"), _SkipMetaInitialisation():
        yield
