"""The state a timing depends on: the memory allocator (put into one fixed state) and the environment report.

Why the allocator: glibc's malloc serves a buffer above its mmap threshold (128 KiB at start) with a fresh
mapping, so every forward of a fresh process page-faults its activation buffers in again; once large blocks
have been freed, glibc raises the threshold (up to 32 MiB) and serves them from the heap. The same model then
runs at a different speed depending on what ran before it in the process (measured: README, Limits).
``control_allocator`` removes that history: with jemalloc or tcmalloc preloaded (``LD_PRELOAD``) it leaves
them be; on glibc it fixes the thresholds with ``mallopt`` (the same settings as ``MALLOC_MMAP_THRESHOLD_`` and
friends, with a higher mmap and trim threshold, applied from inside the process, so it also holds in a
long-lived Streamlit server: every buffer under 512 MiB comes from the heap, and up to 1 GiB of freed heap is
kept for the next forward instead of being returned and faulted in again); elsewhere it
says that the allocator is not controlled. ``VITLAB_ALLOCATOR=default`` turns the control off (to reproduce
the history effect). The CLIs go one step further where Debian's tcmalloc is installed: ``analysis.timing.preload``
reruns them under it (``VITLAB_ALLOCATOR=glibc`` keeps glibc with the fixed thresholds).
"""
from __future__ import annotations

import ctypes
import os
import platform
import resource
from pathlib import Path

import torch

from analysis.timing.preload import TCMALLOC
from analysis.timing.preload import TRIED as PRELOAD_TRIED

# glibc's malloc.h: mallopt parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MIB = 2 ** 20
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 512 * MIB, M_TRIM_THRESHOLD: 1024 * MIB, M_TOP_PAD: 64 * MIB}
MALLOC_TEXT = "mmap 512 MiB, trim 1 GiB, top pad 64 MiB"
# The first try as environment variables (mmap 64 MiB, trim 128 MiB, top pad 64 MiB): with them a fresh
# process still page-faults MobileNetV3's batch-16 buffers, because the heap's top outgrows the trim threshold.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * MIB), "MALLOC_TRIM_THRESHOLD_": str(128 * MIB),
              "MALLOC_TOP_PAD_": str(64 * MIB)}
PRELOADABLE = {  # name -> Debian's library (packages libjemalloc2, libtcmalloc-minimal4)
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": TCMALLOC,
}
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
OFF = "default"  # VITLAB_ALLOCATOR value that leaves the allocator as the process found it
GLIBC = "glibc"  # VITLAB_ALLOCATOR value that keeps glibc (fixed thresholds) in a CLI that would rerun under tcmalloc

_state: str | None = None


def preloaded_allocator() -> str | None:
    """'jemalloc' or 'tcmalloc' when such a library is mapped into this process (LD_PRELOAD), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return None


def control_allocator() -> str:
    """Put the allocator into its fixed timing state (once per process); returns the sentence that describes it."""
    global _state
    if _state is not None:
        return _state
    preloaded = preloaded_allocator()
    if preloaded:
        _state = f"{preloaded} (preloaded)"
    elif os.environ.get("VITLAB_ALLOCATOR", "").lower() == OFF:
        _state = "glibc malloc, default dynamic thresholds (not controlled: VITLAB_ALLOCATOR=default)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = f"system allocator ({platform.system()}), not controlled: no glibc mallopt here"
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
            ok = all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())
        except (OSError, AttributeError):
            ok = False
        _state = (f"glibc malloc, fixed thresholds ({MALLOC_TEXT})" if ok else
                  "glibc malloc, not controlled: mallopt refused the fixed thresholds")
    return _state


def allocator_env(name: str, base: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment for a child process with allocator ``name``: 'default' (glibc as it comes), 'mallopt'
    (this module's fixed thresholds), 'malloc-env' (the same thresholds as MALLOC_* variables), 'jemalloc' or
    'tcmalloc' (preloaded). None when that library is not installed here."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()
           if k not in ("LD_PRELOAD", "VITLAB_ALLOCATOR", PRELOAD_TRIED) and k not in MALLOC_ENV}
    if name == "mallopt":
        env["VITLAB_ALLOCATOR"] = GLIBC  # else a `python -m analysis...` child reruns itself under tcmalloc
    elif name == "default":
        env["VITLAB_ALLOCATOR"] = OFF
    elif name == "malloc-env":
        env.update(MALLOC_ENV, VITLAB_ALLOCATOR=OFF)
    elif name in PRELOADABLE:
        if not Path(PRELOADABLE[name]).exists():
            return None
        env["LD_PRELOAD"] = PRELOADABLE[name]
        if name == "jemalloc":  # PyTorch's CPU performance guide: keep freed pages instead of returning them
            env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    elif name != "mallopt":
        raise ValueError(f"Unknown allocator {name!r}; known: default, mallopt, malloc-env, "
                         + ", ".join(PRELOADABLE))
    return env


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


STEADY_FAULTS = 64  # a call with fewer minor page faults than this runs on memory the allocator already holds


def warm_until_steady(call, max_calls: int = 8, steady_faults: int = STEADY_FAULTS) -> int:
    """Call ``call()`` until one call page-faults fewer than ``steady_faults`` times (at most ``max_calls``);
    returns the number of calls. Even with fixed thresholds glibc needs a few calls before its heap has holes
    that fit the next call's buffers; until then each call faults fresh pages in."""
    for calls in range(1, max_calls + 1):
        before = minor_faults()
        call()
        if minor_faults() - before < steady_faults:
            return calls
    return max_calls


def cpu_governor() -> str:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return "n/a (not exposed)"


def gpu_clocks() -> str:
    """'SM 1980 MHz, memory 2619 MHz' of GPU 0 through NVML when it is installed, else ''."""
    try:
        import pynvml  # optional: ships with nvidia-ml-py

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        sm = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
        mem = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        return f"SM {sm} MHz, memory {mem} MHz"
    except Exception:  # noqa: BLE001 - clocks are reported where NVML is available, never required
        return ""


def timing_environment(device: str = "cpu", precision: str = "fp32", batch: int | None = None,
                       engine: str = "eager") -> dict[str, str]:
    """What a timing depends on, for every exported row: versions, threads, allocator, the chip and its clock
    policy, precision, batch and engine (a key of ``analysis.timing.engines.ENGINES``)."""
    from models.device import cpu_name, timm_version

    on_gpu = torch.device(device).type == "cuda" and torch.cuda.is_available()
    env = {
        "torch": torch.__version__,
        "timm": timm_version(),
        "intra_op_threads": str(torch.get_num_threads()),
        "inter_op_threads": str(torch.get_num_interop_threads()),
        "allocator": control_allocator(),
        "hardware": torch.cuda.get_device_name() if on_gpu else cpu_name(),
        "clocks": (gpu_clocks() or "n/a (no NVML)") if on_gpu else f"governor {cpu_governor()}",
        "precision": precision,
        "engine": engine,
    }
    if batch is not None:
        env["batch"] = str(batch)
    return env


def environment_line(env: dict[str, str]) -> str:
    """One line for a page or a table header."""
    batch = f", batch {env['batch']}" if "batch" in env else ""
    return (f"{env['hardware']} ({env['clocks']}), {env['intra_op_threads']} intra-op / {env['inter_op_threads']} "
            f"inter-op threads, allocator: {env['allocator']}; torch {env['torch']}, timm {env['timm']}; "
            f"{env['precision']}{batch}, {env['engine']}")


def main() -> int:
    """`python -m analysis.timing_env` (or `analysis.timing.env`): what this machine's timings run under."""
    print(environment_line(timing_environment()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
