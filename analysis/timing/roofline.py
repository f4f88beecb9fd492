"""This machine's limits, measured once per device and dtype and cached: dense matmul GFLOP/s and copy GB/s.

The roofline puts each operator class of a profiled model (``analysis.breakdown``) at its achieved GFLOP/s
against its arithmetic intensity (FLOPs per byte its tensors occupy); below the ridge point
(peak GFLOP/s / bandwidth) an operator cannot be compute-bound on this machine.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.device import hardware_info, synchronize

CACHE_ENV = "VITLAB_ROOFLINE_CACHE"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Roofline:
    device: str
    dtype: str
    hardware: str
    threads: int
    peak_gflops: float     # best dense square matmul
    bandwidth_gbs: float   # best large copy (bytes read + written per second)
    matmul_sizes: list
    copy_mib: int
    cached: bool = False

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which the compute roof, not the bandwidth roof, limits."""
        return self.peak_gflops / self.bandwidth_gbs

    def attainable(self, intensity: float) -> float:
        return min(self.peak_gflops, self.bandwidth_gbs * intensity)


def _cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vitlab" / "roofline.json"))


def measure_matmul_gflops(device: str, dtype: torch.dtype, sizes=(1024, 2048), repeats: int = 3) -> float:
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def measure_copy_gbs(device: str, mib: int = 256, repeats: int = 5) -> float:
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = max(best, 2 * src.numel() / (time.perf_counter() - start) / 1e9)
    return best


def machine_roofline(device: str = "cpu", precision: str = "fp32", *, refresh: bool = False,
                     matmul_sizes=(1024, 2048), copy_mib: int = 256) -> Roofline:
    """The cached limits for (device, hardware, threads, dtype); measured and stored when missing."""
    info = hardware_info()
    hardware = info.get("gpu") if torch.device(device).type == "cuda" else info.get("cpu")
    key = f"{device}|{hardware}|{torch.get_num_threads()}|{precision}"
    path = _cache_path()
    stored = {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
    if key in stored and not refresh:
        return Roofline(**dict(stored[key], cached=True))
    dtype = DTYPES[precision] if torch.device(device).type != "cpu" or precision == "fp32" else torch.float32
    roof = Roofline(device=device, dtype=str(dtype).removeprefix("torch."), hardware=str(hardware),
                    threads=torch.get_num_threads(),
                    peak_gflops=measure_matmul_gflops(device, dtype, matmul_sizes),
                    bandwidth_gbs=measure_copy_gbs(device, copy_mib), matmul_sizes=list(matmul_sizes),
                    copy_mib=copy_mib)
    record = asdict(roof)
    record.pop("cached")
    stored[key] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=1))
    except OSError:
        pass  # an unwritable cache only means measuring again next time
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
        out.append(dict(g, model=breakdown.model, batch=breakdown.batch, intensity=intensity,
                        gflops_per_s=achieved, gbytes_per_s=g["bytes"] / (g["ms"] / 1000) / 1e9,
                        roof_gflops=None if intensity is None else roof.attainable(intensity),
                        below_ridge=intensity is None or intensity < roof.ridge))
    return out


def below_roof_share(breakdown, roof: Roofline) -> float:
    """Fraction of the model's attributed time in (class, component) groups whose arithmetic intensity is below
    the ridge point: time that this machine's memory bandwidth, not its arithmetic, bounds. Time that moves no
    bytes and does no FLOPs (Python between operators) is left out of both sides."""
    groups = [p for p in points(breakdown, roof, by=("op_class", "component")) if p["bytes"] > 0 or p["flops"] > 0]
    total = sum(p["ms"] for p in groups)
    return sum(p["ms"] for p in groups if p["below_ridge"]) / total if total else 0.0
