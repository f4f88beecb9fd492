"""How much memory a batch needs and how much this process can still get: to refuse, before a CPU run or sweep
starts, a batch that cannot fit, in one sentence with the estimate (instead of waiting for the allocator to fail).

The estimate comes from one batch-1 forward: twice the largest output of any module (a layer's input and its
output are alive together) plus the input, per image. It is an estimate, not a measurement; the sweep still
backs off when the allocator fails anyway (``analysis.timing.harness.is_out_of_memory``).

And what one forward did need: ``forward_peak_bytes`` measures its peak on CUDA and on a CPU alike, net of what was
allocated before it (``kept_activations_peak_bytes``: the same with autograd on).
"""
from __future__ import annotations

import ctypes
import os
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


def largest_batch_that_fits(runners: Sequence[Any], available: int | None = None) -> int | None:
    """The largest batch whose estimated activations (``batches_that_fit``'s estimate) fit; None where unknown."""
    estimate = _estimate(runners, available)
    return None if estimate is None else estimate[1] // max(estimate[0], 1)


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


# ----------------------------------------------------------------------------------------------- peak of one forward
# How the peak of one forward is measured on each device type, in words for pages and exports.
PEAK_MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated during one forward, net of what was allocated before it",
    "cpu": "the CPU allocator's live bytes during one forward (torch.profiler memory events), net of what was "
           "allocated before it",
}
_CPU_MEMORY_DEVICES = ("DeviceType.CPU", "DeviceType.MKLDNN", "DeviceType.IDEEP")


def _cpu_peak_bytes(call: Callable[[], Any]) -> int:
    """The highest running sum of the CPU allocator's allocations minus frees while ``call`` runs.

    ``torch.profiler`` with ``profile_memory=True`` records one event per allocation and per free of c10's CPU
    allocator (``+nbytes`` / ``-nbytes``, with the time); c10 keeps no peak of its own on the CPU, so the running sum
    over the time-ordered events is summed here (hand-written: no torch API returns it). Only what is allocated
    while the profiler runs is counted: the weights and the inputs, allocated before, are not."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto (the profiler's C++ side) prints lines to stderr below level 6; it reads the level at its first start.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()) in _CPU_MEMORY_DEVICES)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def forward_peak_bytes(call: Callable[[], Any], device: str | torch.device) -> int | None:
    """Peak memory of one ``call()`` (a forward over inputs already on ``device``), in bytes, net of everything
    allocated before it (weights, inputs, caches): the activations and workspaces the forward itself needs. None on
    a device with no allocator to ask (MPS).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` before.
    CPU: the allocator's live bytes through ``torch.profiler``'s memory events (``_cpu_peak_bytes``). Why not the
    process's peak resident memory (``ru_maxrss`` / VmHWM) net of the resident memory after loading: that counts
    pages, not tensors. It includes glibc's slack and depends on what ran before in the process (freed memory kept
    in arenas is reused without raising the resident size, so a second forward often raises it by nothing); the
    high-water mark never comes down, so it can be read only once per process. The profiler counts exactly the
    bytes the forward's tensors and kernels' scratch buffers ask the allocator for, in this process, however many
    times, and the count does not depend on what ran before (it measures allocations, not pages). Run a warm-up
    forward first: one-time allocations (kernel caches, lazily built buffers) would count otherwise."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if kind == "cpu":
        return _cpu_peak_bytes(call)
    return None


def kept_activations_peak_bytes(forward: Callable[[Any], Any], inputs: Any, device: str | torch.device) -> int | None:
    """``forward_peak_bytes`` of ``forward(inputs)`` with autograd on, after one warm forward: every layer's
    activations are kept for a backward (as in training, or an inference run without ``torch.no_grad``), so the peak
    grows with the tokens summed over all layers, where under ``inference_mode`` only one layer's are alive at a time.
    Equal to the inference peak where no parameter requires a gradient."""
    with torch.enable_grad():
        forward(inputs)
        return forward_peak_bytes(lambda: forward(inputs), device)


def memory_reduction(full: float | None, reduced: float | None) -> float | None:
    """1 - reduced / full: the share of the peak memory a reduction saves (the paper's 35-51 %); None when unknown."""
    return None if not full or reduced is None else 1.0 - reduced / full
