"""The hardware's own limits, from what the machine says about itself: the roof a measured roofline sits under.

CPU: compute units x clock x fp32 FLOPs per cycle per core from the instruction set in ``/proc/cpuinfo``'s
flags (two FMA units per core, each a multiply and an add per lane: AVX-512 64, AVX2 + FMA 32; without FMA one
add and one multiply unit per core: AVX 16, SSE 8). The clock is the highest the kernel exposes:
``cpufreq/cpuinfo_max_freq`` where there is a cpufreq driver, else ``cpu MHz`` in ``/proc/cpuinfo`` (the
current or, in a VM, the nominal clock: a boost clock can run faster, so a measurement may exceed this peak).
Wide vector code may also run below the nominal clock (AVX-512 licences), so the peak is an upper bound, not a
target. CPU memory bandwidth is not stated: the DIMMs' speed and channel count are only in DMI tables that need
root, and nothing here guesses them.

CUDA: ``torch.cuda.get_device_properties`` (torch 2.14 exposes ``clock_rate`` and ``memory_clock_rate`` in kHz
and ``memory_bus_width`` in bits): SMs x clock x FLOPs per cycle per SM of the architecture (CUDA C++
Programming Guide, "Arithmetic Instructions": fp32 results per clock per SM, x2 for a fused multiply-add;
tensor-core rates from NVIDIA's V100, A100 and H100 whitepapers), memory 2 x memory clock x bus width (the
formula of CUDA's deviceQuery sample). An architecture not in the tables says unknown.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CPU0 = Path("/sys/devices/system/cpu/cpu0")

# fp32 FLOPs per cycle per core, by the widest vector extension /proc/cpuinfo lists (first match wins)
CPU_FLOPS_PER_CYCLE = (  # (flags, FLOPs per cycle, short name, why)
    (("avx512f",), 64, "AVX-512", "two 512-bit FMA units x 16 lanes x 2 per core; CPUs with one reach half"),
    (("avx2", "fma"), 32, "AVX2 FMA", "two 256-bit FMA units x 8 lanes x 2 per core"),
    (("avx",), 16, "AVX", "one 256-bit add and one 256-bit multiply per cycle per core"),
    (("sse",), 8, "SSE", "one 128-bit add and one 128-bit multiply per cycle per core"),
)
# fp32 FLOPs per cycle per SM (2 x fp32 results per clock per SM in the CUDA Programming Guide), by (major, minor)
CUDA_FP32_PER_SM = {(5, 0): 256, (5, 2): 256, (5, 3): 256, (6, 0): 128, (6, 1): 256, (6, 2): 256, (7, 0): 128,
                    (7, 2): 128, (7, 5): 128, (8, 0): 128, (8, 6): 256, (8, 7): 256, (8, 9): 256, (9, 0): 256}
# dense fp16/bf16 tensor-core FLOPs per cycle per SM: V100 (fp16 only), A100, H100
CUDA_TENSOR_PER_SM = {("fp16", (7, 0)): 1024, ("fp16", (8, 0)): 2048, ("bf16", (8, 0)): 2048,
                      ("fp16", (9, 0)): 4096, ("bf16", (9, 0)): 4096}


@dataclass
class HardwarePeak:
    gflops: float | None       # None: unknown, and ``how`` says why
    how: str                   # one line: where the number comes from
    bandwidth_gbs: float | None
    bandwidth_how: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """``/proc/cpuinfo`` as one dict per logical CPU."""
    blocks = []
    for chunk in text.strip().split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def flops_per_cycle(flags: set[str]) -> tuple[int | None, str, str]:
    """(fp32 FLOPs per cycle per core, the extension's name, why) of the widest extension among ``flags``."""
    for needed, flops, name, why in CPU_FLOPS_PER_CYCLE:
        if all(f in flags for f in needed):
            return flops, name, why
    return None, "", "hardware peak unknown: no x86 vector extension in the CPU flags"


def physical_cores(blocks: list[dict[str, str]], cpus: set[int] | None = None) -> int:
    """Distinct (package, core) pairs among the logical CPUs this process may run on."""
    chosen = [b for b in blocks if cpus is None or int(b.get("processor", -1)) in cpus]
    pairs = {(b.get("physical id"), b.get("core id")) for b in chosen if "core id" in b}
    return len(pairs) or len(chosen)


def cpu_clock_mhz(blocks: list[dict[str, str]], max_freq_khz: str | None = None) -> tuple[float | None, str]:
    if max_freq_khz and max_freq_khz.strip().isdigit():
        return int(max_freq_khz) / 1000, "cpufreq cpuinfo_max_freq"
    mhz = [float(b["cpu MHz"]) for b in blocks if b.get("cpu MHz", "").replace(".", "", 1).isdigit()]
    if mhz:
        return max(mhz), "'cpu MHz' in /proc/cpuinfo, the current or nominal clock, a boost clock can be faster"
    return None, "hardware peak unknown: no clock in cpufreq or /proc/cpuinfo"


def cpu_peak(threads: int, cpuinfo: str | None = None, max_freq_khz: str | None = None,
             cpus: set[int] | None = None) -> HardwarePeak:
    """fp32 peak of ``threads`` threads on the physical cores of ``cpus``, from ``/proc/cpuinfo`` text and the
    cpufreq maximum (both read from this machine when not given)."""
    if cpuinfo is None:
        cpuinfo = _read(CPUINFO) or ""
        max_freq_khz = _read(CPU0 / "cpufreq" / "cpuinfo_max_freq")
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    blocks = cpuinfo_blocks(cpuinfo)
    no_bandwidth = "memory bandwidth peak unknown: DIMM speed and channel count are only in DMI tables, which need root"
    if not blocks:
        return HardwarePeak(None, "no /proc/cpuinfo: hardware peak unknown", None, no_bandwidth)
    flags = set(blocks[0].get("flags", "").split())
    per_cycle, name, why = flops_per_cycle(flags)
    mhz, clock_source = cpu_clock_mhz(blocks, max_freq_khz)
    cores = physical_cores(blocks, cpus)
    units = min(threads, cores)
    if per_cycle is None or mhz is None:
        return HardwarePeak(None, why if per_cycle is None else clock_source, None, no_bandwidth)
    how = (f"{units} cores x {mhz / 1000:.2f} GHz x {per_cycle} fp32 FLOP/cycle, {name} (cores: {threads} threads "
           f"used, {cores} physical cores available; clock: {clock_source}; {name}: {why})")
    return HardwarePeak(units * mhz / 1000 * per_cycle, how, None, no_bandwidth)


def cuda_peak(props, precision: str = "fp32") -> HardwarePeak:
    """Peak of a CUDA device from its properties (``torch.cuda.get_device_properties``, or any object with the
    same attributes)."""
    arch = (props.major, props.minor)
    sms, clock_khz = props.multi_processor_count, getattr(props, "clock_rate", None)
    per_sm, source = CUDA_FP32_PER_SM.get(arch), "fp32 FLOP/cycle/SM (CUDA Programming Guide)"
    if precision != "fp32":
        per_sm, source = CUDA_TENSOR_PER_SM.get((precision, arch)), f"dense {precision} tensor-core FLOP/cycle/SM"
    if per_sm is None or not clock_khz:
        peak, how = None, (f"hardware peak unknown: no {precision} FLOPs/cycle for compute capability "
                           f"{arch[0]}.{arch[1]}" if per_sm is None else "hardware peak unknown: no SM clock")
    else:
        peak = sms * clock_khz / 1e6 * per_sm
        how = (f"{sms} SMs x {clock_khz / 1e6:.2f} GHz x {per_sm} {source}, compute capability "
               f"{arch[0]}.{arch[1]}")
    mem_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if mem_khz and bus_bits:
        bandwidth = 2 * mem_khz * 1e3 * bus_bits / 8 / 1e9
        bandwidth_how = f"2 x {mem_khz / 1e3:.0f} MHz memory clock x {bus_bits}-bit bus (deviceQuery's formula)"
    else:
        bandwidth, bandwidth_how = None, "memory bandwidth peak unknown: memory clock or bus width not exposed"
    return HardwarePeak(peak, how, bandwidth, bandwidth_how)


def hardware_peak(device: str, precision: str = "fp32", threads: int = 1) -> HardwarePeak:
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_peak(threads)
    if kind == "cuda" and torch.cuda.is_available():
        return cuda_peak(torch.cuda.get_device_properties(torch.device(device)), precision)
    return HardwarePeak(None, f"hardware peak unknown on {kind}", None, f"memory bandwidth peak unknown on {kind}")


def last_level_cache_bytes(cpu_dir: Path = CPU0) -> int | None:
    """Size of the highest cache level of CPU 0 (``/sys/devices/system/cpu/cpu0/cache/index*/size``)."""
    best = (0, 0)
    for index in sorted((cpu_dir / "cache").glob("index*")):
        level, size = _read(index / "level"), (_read(index / "size") or "").strip()
        if not level or not size:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        number = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        best = max(best, (int(level), number))
    return best[1] or None


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None
