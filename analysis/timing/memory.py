"""How much memory a batch needs and how much this process can still get: to refuse, before a CPU run or sweep
starts, a batch that cannot fit, in one sentence with the estimate (instead of waiting for the allocator to fail).

The estimate comes from one batch-1 forward: twice the largest output of any module (a layer's input and its
output are alive together) plus the input, per image. It is an estimate, not a measurement; the sweep still
backs off when the allocator fails anyway (``analysis.timing.harness.is_out_of_memory``).
"""
from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.nn.modules.module import register_module_forward_hook


def _kib_field(path: str, field: str) -> int | None:
    """A ``Name:  123 kB`` field of a /proc file, in bytes; None where the file or the field is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def available_bytes() -> int | None:
    """What this process can still allocate: the least of the system's available memory, what the address-space
    limit (``ulimit -v``, RLIMIT_AS) leaves and what the cgroup's limit leaves; None where none is known."""
    found = [_kib_field("/proc/meminfo", "MemAvailable"), _cgroup_left()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    used = _kib_field("/proc/self/status", "VmSize")
    if soft != resource.RLIM_INFINITY and used is not None:
        found.append(soft - used)
    known = [max(v, 0) for v in found if v is not None]
    return min(known) if known else None


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return sum(_tensor_bytes(v) for v in vars(value).values()) if hasattr(value, "__dict__") else 0


def bytes_per_image(forward: Callable[[Any], Any], make_inputs: Callable[[int], Any]) -> int:
    """Estimated activation bytes per image: from a batch-1 forward, twice the largest module output plus the input."""
    largest = 0

    def hook(module, args, output):
        nonlocal largest
        largest = max(largest, _tensor_bytes(output))

    inputs = make_inputs(1)
    handle = register_module_forward_hook(hook)
    try:
        with torch.inference_mode():
            forward(inputs)
    finally:
        handle.remove()
    return 2 * largest + _tensor_bytes(inputs)


def gib(n: float) -> str:
    """Bytes in GiB, MiB or KiB, whichever reads best."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _estimate(runners: Sequence[Any], available: int | None) -> tuple[int, int] | None:
    """(bytes per image, bytes available), or None where the available memory is unknown."""
    available = available_bytes() if available is None else available
    if available is None or not runners:
        return None
    # An engine's runner (compiled, exported at one batch) is estimated by the eager runner it wraps.
    eager = list({id(r): r for r in (getattr(r, "reference", None) or r for r in runners)}.values())
    return max(bytes_per_image(r.forward, r.make_inputs) for r in eager), available


def _shortfall(batch: int, per_image: int, available: int) -> str:
    return (f"its activations would need about {gib(batch * per_image)} ({gib(per_image)} per image, estimated from "
            f"a batch-1 forward) but only {gib(available)} of memory is available")


def batches_that_fit(runners: Sequence[Any], batches: Sequence[int],
                     available: int | None = None) -> tuple[list[int], list[str]]:
    """The batches whose estimated activations fit in the available memory, and one sentence per batch left out.

    ``runners`` have ``forward`` and ``make_inputs`` (``analysis.timing.harness.Runner``); they run one at a time, so
    the largest estimate counts. Nothing is left out where the available memory is unknown."""
    estimate = _estimate(runners, available)
    if estimate is None:
        return list(batches), []
    per_image, available = estimate
    kept, notes = [], []
    for batch in batches:
        if batch * per_image > available:
            notes.append(f"batch {batch} left out: {_shortfall(batch, per_image, available)}.")
        else:
            kept.append(batch)
    return kept, notes


def batch_refusal(runners: Sequence[Any], batch: int, available: int | None = None) -> str | None:
    """One sentence refusing a single ``batch`` that cannot fit (the estimate of ``batches_that_fit``), or None."""
    estimate = _estimate(runners, available)
    if estimate is None or batch * estimate[0] <= estimate[1]:
        return None
    return (f"batch {batch} cannot run: {_shortfall(batch, *estimate)}; use a smaller --batch, or --batches for a "
            f"sweep that leaves out what does not fit.")


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere).

    Memory freed in a thread (a Streamlit script run) stays in that thread's glibc arena: decoding an 88-megapixel
    upload kept about 355 MB after every reference to it was gone, until this."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library (musl) has no malloc_trim
            pass
