"""This machine's limits: dense matmul GFLOP/s and copy GB/s, measured robustly, with the conditions they were
measured under, cached only when measured on a quiet machine, and set beside the hardware's own peak.

The roofline puts each operator class of a profiled model (``analysis.breakdown``) at its achieved GFLOP/s
against its arithmetic intensity (FLOPs per byte its tensors occupy); below the ridge point
(peak GFLOP/s / bandwidth) an operator cannot be compute-bound on this machine.

How it measures (``measure_roofline``): square matmuls of growing size (CPU 256 .. 4096, CUDA 1024 .. 16384),
two samples each, until a size no longer improves on the best by 5 % or the next one would not fit the time
budget; then the best size again in ``SAMPLES`` samples spaced by short sleeps; the peak is the best sample.
The copy runs on a buffer of at least 8x the last-level cache (at least 256 MiB on CPU, 1 GiB on CUDA, at most
an eighth of the free memory), best of spaced samples; its bandwidth counts bytes read plus bytes written.
A sample repeats its operation until it lasts ``MIN_SAMPLE_S``. About 10-15 s on a 2-core CPU.

Conditions: when (UTC), threads, the 1-minute load average before measuring, and the CPU cores that *other*
processes kept busy during the measurement (busy time of this process's CPUs in ``/proc/stat`` minus this
process's own CPU time from ``getrusage``, over the wall time). **A measurement is under load**, and is
returned and shown but never cached, when other processes used more than ``OTHER_CORES_LIMIT`` (0.25) cores
on average; where ``/proc/stat`` cannot be read, when the 1-minute load average exceeded ``LOADAVG_LIMIT`` (1.0).
On CUDA the CPU does not bound a large matmul: the device counts as under load when NVML reports it more than
``GPU_BUSY_LIMIT`` % busy before measuring, and its load is recorded as unknown without NVML.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from analysis.timing.hardware_peak import available_memory_bytes, hardware_peak, last_level_cache_bytes
from models.device import hardware_info, synchronize

CACHE_ENV = "VITLAB_ROOFLINE_CACHE"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZES = {"cpu": (256, 512, 1024, 2048, 4096), "cuda": (1024, 2048, 4096, 8192, 16384)}
MIN_COPY_MIB = {"cpu": 256, "cuda": 1024}
SAMPLES = 5            # spaced samples of the best matmul size; the copy gets 2x as many
GAP_S = 0.05           # sleep between samples: a burst of other work ends instead of spoiling every sample
MIN_SAMPLE_S = 0.05    # a sample repeats its operation until it lasts this long
IMPROVES = 1.05        # a larger matmul must beat the best so far by 5 % for the sizes to keep growing
BUDGET_S = 10.0        # matmul sweep (the copy takes about a quarter of this more)
OTHER_CORES_LIMIT = 0.25
LOADAVG_LIMIT = 1.0
GPU_BUSY_LIMIT = 10


@dataclass
class Roofline:
    device: str
    dtype: str
    hardware: str
    threads: int
    peak_gflops: float     # best dense square matmul
    bandwidth_gbs: float   # best large copy (bytes read + written per second)
    matmul_sizes: list     # the sizes timed
    copy_mib: int
    peak_size: int = 0     # the matmul size that reached the peak
    measured_at: str = ""  # UTC, ISO 8601
    seconds: float = 0.0   # wall time of the measurement
    load_1min: float | None = None      # 1-minute load average before measuring
    other_cores: float | None = None    # CPU cores other processes kept busy during it (None: not known)
    gpu_busy_percent: float | None = None  # CUDA: NVML's utilisation before measuring (None: no NVML)
    under_load: str = ""   # why the measurement counts as under load; "" when quiet
    hardware_peak_gflops: float | None = None
    hardware_peak_how: str = ""
    hardware_bandwidth_gbs: float | None = None
    hardware_bandwidth_how: str = ""
    cached: bool = False   # read from the cache
    stored: bool = False   # measured by this call and written to the cache

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which the compute roof, not the bandwidth roof, limits."""
        return self.peak_gflops / self.bandwidth_gbs

    def attainable(self, intensity: float) -> float:
        return min(self.peak_gflops, self.bandwidth_gbs * intensity)

    @property
    def hardware_ridge(self) -> float | None:
        if self.hardware_peak_gflops and self.hardware_bandwidth_gbs:
            return self.hardware_peak_gflops / self.hardware_bandwidth_gbs
        return None

    def conditions(self) -> str:
        """When and under what load: 'measured 2025-01-01T12:00:00Z, 2 threads, load 0.31, other processes 0.02
        cores'."""
        load = "load average n/a" if self.load_1min is None else f"load average {self.load_1min:.2f} (1 min)"
        other = ("other processes' CPU use unknown" if self.other_cores is None
                 else f"other processes used {self.other_cores:.2f} cores")
        gpu = ""
        if self.device.startswith("cuda"):
            gpu = (", GPU use before measuring unknown (no NVML)" if self.gpu_busy_percent is None
                   else f", GPU {self.gpu_busy_percent:.0f} % busy before measuring")
        return (f"measured {self.measured_at or 'at an unknown time'} in {self.seconds:.1f} s, {self.threads} "
                f"threads, {load}, {other}{gpu}")

    def cache_status(self) -> str:
        if self.cached:
            return "read from the cache" + (f" (taken under load: {self.under_load})" if self.under_load else "")
        if self.under_load:
            return f"not cached: taken under load ({self.under_load})"
        return "measured now and cached" if self.stored else "measured now, not cached"

    def summary_lines(self) -> list[str]:
        """What the CLI prints and the page shows: the limits against the hardware's, and the conditions."""
        def against(measured: float, peak: float | None, how: str, unit: str) -> str:
            if not peak:
                return f"{measured:.1f} {unit}; {how}"
            return f"{measured:.1f} {unit} = {measured / peak:.0%} of the hardware peak {peak:.1f} {unit} = {how}"

        size = self.peak_size or max(self.matmul_sizes, default=0)
        compute = against(self.peak_gflops, self.hardware_peak_gflops, self.hardware_peak_how, "GFLOP/s")
        copy = against(self.bandwidth_gbs, self.hardware_bandwidth_gbs, self.hardware_bandwidth_how, "GB/s")
        return [f"matmul {size}x{size}: {compute}", f"copy of {self.copy_mib} MiB: {copy}",
                f"ridge {self.ridge:.1f} FLOP/byte; {self.conditions()}; {self.cache_status()}"]


def _cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vitlab" / "roofline.json"))


def _report(progress: Callable[[float, str], None] | None, fraction: float, message: str) -> None:
    if progress:
        progress(fraction, message)


def best_rate(call: Callable[[], object], work: float, device: str, samples: int, deadline: float,
              gap_s: float | None = None) -> float:
    """Best ``work`` per second of ``call`` over up to ``samples`` samples spaced by ``gap_s`` of sleep (the
    first always, further ones only before ``deadline``), after one untimed call (warm-up, first touch). Each
    sample repeats ``call`` until it lasts ``MIN_SAMPLE_S``, so small operations are not timed one by one."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    reps = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-9)))
    gap_s = GAP_S if gap_s is None else gap_s
    best = 0.0
    for i in range(samples):
        if i and time.perf_counter() > deadline:
            break
        time.sleep(gap_s)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            call()
        synchronize(device)
        best = max(best, work * reps / (time.perf_counter() - start))
    return best


def _matmul_rate(n: int, device: str, dtype: torch.dtype, samples: int, deadline: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return best_rate(lambda: a @ b, 2 * n ** 3 / 1e9, device, samples, deadline)


def measure_matmul_gflops(device: str, dtype: torch.dtype, sizes=None, samples: int = SAMPLES,
                          budget_s: float = BUDGET_S, progress=None) -> tuple[float, int, list[int]]:
    """(best GFLOP/s, the size that reached it, the sizes timed). With ``sizes=None`` the sizes grow through
    ``SIZES`` (two samples each) until two in a row no longer beat the best by ``IMPROVES`` or the next (8x the work)
    would not fit the budget with its samples; the best size then gets ``samples`` more spaced samples. Given
    ``sizes`` are each timed with ``samples`` samples."""
    grow = sizes is None
    candidates = list((SIZES.get(torch.device(device).type) or SIZES["cuda"]) if grow else sizes)
    deadline = time.perf_counter() + budget_s
    rates: dict[int, float] = {}
    flat = 0  # sizes in a row that did not beat the best by IMPROVES
    for i, n in enumerate(candidates):
        _report(progress, 0.8 * i / len(candidates), f"matmul {n}x{n}")
        best_before = max(rates.values(), default=0.0)
        try:
            rates[n] = _matmul_rate(n, device, dtype, 2 if grow else samples, deadline)
        except torch.OutOfMemoryError:
            if not rates:
                raise
            break  # a device too small for the next size: the sizes that fitted decide
        one_call_s = 2 * n ** 3 / 1e9 / rates[n]
        flat = flat + 1 if rates[n] < IMPROVES * best_before else 0
        # Two flat sizes in a row: one noisy sample of a size must not end the sweep below the peak (on 2 cores
        # one run stopped at 512, 125 GFLOP/s, where 2048 reached 178).
        if grow and (flat >= 2 or time.perf_counter() + 8 * one_call_s * (3 + samples) > deadline):
            break
    size = max(rates, key=rates.get)
    peak = rates[size]
    if grow:
        _report(progress, 0.7, f"matmul {size}x{size}, {samples} spaced samples")
        peak = max(peak, _matmul_rate(size, device, dtype, samples, time.perf_counter() + budget_s / 2))
    return peak, size, list(rates)


def copy_buffer_mib(device: str) -> int:
    """At least 8x the last-level cache (CPU: /sys; CUDA: the L2), at least 256 MiB on CPU and 1 GiB on CUDA,
    at most an eighth of the free memory (source and destination take two)."""
    kind = torch.device(device).type
    if kind == "cuda":
        cache, free = torch.cuda.get_device_properties(device).L2_cache_size, torch.cuda.mem_get_info(device)[0]
    else:
        cache, free = last_level_cache_bytes(), available_memory_bytes()
    mib = max(MIN_COPY_MIB.get(kind, 256), 8 * (cache or 0) / 2**20)
    if free:
        mib = min(mib, free / 8 / 2**20)
    return max(1, int(mib))


def measure_copy_gbs(device: str, mib: int, samples: int = 2 * SAMPLES, budget_s: float = BUDGET_S / 4) -> float:
    """Best copy rate of a ``mib`` MiB buffer, counting bytes read plus bytes written."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return best_rate(lambda: dst.copy_(src), 2 * src.numel() / 1e9, device, samples,
                     time.perf_counter() + budget_s)


# ------------------------------------------------------------------------------------------- conditions
def cpu_snapshot() -> tuple[float | None, float, float]:
    """(busy seconds since boot of the CPUs this process may run on, from /proc/stat, or None where it cannot be
    read; this process's own CPU seconds, all threads; a monotonic clock)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    own, now = usage.ru_utime + usage.ru_stime, time.monotonic()
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return None, own, now
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    busy = 0
    for line in text.splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal (steal: other VMs)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK"), own, now


def other_cores(before: tuple, after: tuple) -> float | None:
    """CPU cores other processes kept busy on average between two ``cpu_snapshot``s."""
    if before[0] is None or after[0] is None or after[2] <= before[2]:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2]))


def gpu_busy_percent(device: str) -> float | None:
    """NVML's utilisation of the GPU (any process) where NVML is installed, else None."""
    try:
        return float(torch.cuda.utilization(torch.device(device)))
    except Exception:  # noqa: BLE001 - needs pynvml; without it the GPU's load is recorded as unknown
        return None


def load_verdict(kind: str, other: float | None, load_1min: float | None, gpu_busy: float | None) -> str:
    """Why a measurement counts as taken under load ('' when it does not): see the module's docstring."""
    if kind == "cuda":
        if gpu_busy is not None and gpu_busy > GPU_BUSY_LIMIT:
            return f"the GPU was {gpu_busy:.0f} % busy before measuring, over {GPU_BUSY_LIMIT} %"
        return ""
    if other is not None:
        return f"other processes used {other:.2f} cores, over {OTHER_CORES_LIMIT}" if other > OTHER_CORES_LIMIT else ""
    if load_1min is not None and load_1min > LOADAVG_LIMIT:
        return f"1-minute load average {load_1min:.2f}, over {LOADAVG_LIMIT}"
    return ""


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def measure_roofline(device: str = "cpu", precision: str = "fp32", *, matmul_sizes=None, copy_mib: int | None = None,
                     samples: int = SAMPLES, budget_s: float = BUDGET_S, progress=None) -> Roofline:
    """Measure the limits now (nothing read from or written to the cache), with their conditions and the
    hardware's own peak. ``progress(fraction, message)`` follows the steps."""
    kind = torch.device(device).type
    dtype = DTYPES[precision] if kind != "cpu" else torch.float32
    info, threads = hardware_info(), torch.get_num_threads()
    mib = copy_mib or copy_buffer_mib(device)
    load_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    gpu_busy = gpu_busy_percent(device) if kind == "cuda" else None
    when, started, before = _utc_now(), time.perf_counter(), cpu_snapshot()
    peak, size, sizes = measure_matmul_gflops(device, dtype, matmul_sizes, samples, budget_s, progress)
    _report(progress, 0.85, f"copy of {mib} MiB")
    bandwidth = measure_copy_gbs(device, mib, 2 * samples, budget_s / 4)
    other = other_cores(before, cpu_snapshot())
    hw = hardware_peak(device, precision if kind != "cpu" else "fp32", threads)
    _report(progress, 1.0, "limits measured")
    return Roofline(device=device, dtype=str(dtype).removeprefix("torch."), threads=threads,
                    hardware=str(info.get("gpu") if kind == "cuda" else info.get("cpu")),
                    peak_gflops=peak, bandwidth_gbs=bandwidth, matmul_sizes=sizes, copy_mib=mib, peak_size=size,
                    measured_at=when, seconds=round(time.perf_counter() - started, 2), load_1min=load_1min,
                    other_cores=other, gpu_busy_percent=gpu_busy,
                    under_load=load_verdict(kind, other, load_1min, gpu_busy),
                    hardware_peak_gflops=hw.gflops, hardware_peak_how=hw.how, hardware_bandwidth_gbs=hw.bandwidth_gbs,
                    hardware_bandwidth_how=hw.bandwidth_how)


# ------------------------------------------------------------------------------------------- cache
def cache_key(device: str, precision: str) -> str:
    info = hardware_info()
    hardware = info.get("gpu") if torch.device(device).type == "cuda" else info.get("cpu")
    return f"{device}|{hardware}|{torch.get_num_threads()}|{precision}"


def _read_cache() -> dict:
    path = _cache_path()
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _from_record(record) -> Roofline | None:
    """A cached record as a Roofline; None for a record without its conditions (written before they were
    recorded: such a measurement says nothing about its load, so it is measured again)."""
    if not isinstance(record, dict) or not record.get("measured_at"):
        return None
    names = {f.name for f in fields(Roofline)} - {"cached", "stored"}
    try:
        return Roofline(**{k: v for k, v in record.items() if k in names}, cached=True)
    except TypeError:
        return None


def store(roof: Roofline, key: str | None = None) -> bool:
    """Write ``roof`` to the cache whatever its load (``machine_roofline`` calls it only for quiet measurements;
    tests and a user who accepts the load call it directly). False when the cache cannot be written."""
    stored = _read_cache()
    record = asdict(roof)
    record.pop("cached"), record.pop("stored")
    stored[key or cache_key(roof.device, _precision_of(roof))] = record
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=1))
    except OSError:
        return False  # an unwritable cache only means measuring again next time
    return True


def _precision_of(roof: Roofline) -> str:
    return {"float16": "fp16", "bfloat16": "bf16"}.get(roof.dtype, "fp32")


def machine_roofline(device: str = "cpu", precision: str = "fp32", *, refresh: bool = False, matmul_sizes=None,
                     copy_mib: int | None = None, samples: int = SAMPLES, budget_s: float = BUDGET_S,
                     progress=None) -> Roofline:
    """The limits for (device, hardware, threads, precision): from the cache unless ``refresh`` or none is
    cached; a new measurement is cached only when it was not taken under load (else it is returned, with
    ``under_load`` saying why, and the cache keeps what it had)."""
    key = cache_key(device, precision)
    found = None if refresh else _from_record(_read_cache().get(key))
    if found is not None:
        return found
    roof = measure_roofline(device, precision, matmul_sizes=matmul_sizes, copy_mib=copy_mib, samples=samples,
                            budget_s=budget_s, progress=progress)
    if not roof.under_load:
        roof.stored = store(roof, key)
    return roof


def points(breakdown, roof: Roofline, by=("op_class",)) -> list[dict]:
    """Roofline points of one profiled model: per group, achieved GFLOP/s, intensity, the attainable roof there,
    and whether the group sits below the ridge (bandwidth-bound on this machine)."""
    out = []
    for g in breakdown.groups(by):
        if g["ms"] <= 0:
            continue
        intensity = g["flops"] / g["bytes"] if g["bytes"] > 0 else None
        achieved = g["flops"] / (g["ms"] / 1000) / 1e9
        out.append(dict(g, model=breakdown.model, batch=breakdown.batch, engine=breakdown.engine,
                        intensity=intensity, gflops_per_s=achieved, gbytes_per_s=g["bytes"] / (g["ms"] / 1000) / 1e9,
                        roof_gflops=None if intensity is None else roof.attainable(intensity),
                        below_ridge=intensity is None or intensity < roof.ridge))
    return out


def below_roof_share(breakdown, roof: Roofline) -> float | None:
    """Fraction of the model's attributed time in (class, component) groups whose arithmetic intensity is below
    the ridge point: time that this machine's memory bandwidth, not its arithmetic, bounds. Time that moves no
    bytes and does no FLOPs (Python between operators) is left out of both sides; None (not 0) when no operator
    has FLOPs or bytes counted: nothing was measured."""
    groups = [p for p in points(breakdown, roof, by=("op_class", "component")) if p["bytes"] > 0 or p["flops"] > 0]
    total = sum(p["ms"] for p in groups)
    return sum(p["ms"] for p in groups if p["below_ridge"]) / total if total else None
