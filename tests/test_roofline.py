"""A roofline you can trust: the hardware's own peak from what the machine says, a measurement with its conditions,
refused by the cache under load, measured again on request, and drawn beside the hardware peak."""
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from analysis.timing import roofline
from analysis.timing.hardware_peak import cpu_peak, cuda_peak, last_level_cache_bytes

TINY = dict(matmul_sizes=(64,), copy_mib=1, samples=1, budget_s=0.5)


def _cpuinfo(flags: str, cores: int = 2, threads_per_core: int = 1, mhz: str = "2445.424") -> str:
    blocks = []
    for cpu in range(cores * threads_per_core):
        blocks.append(f"processor\t: {cpu}\nmodel name\t: Test CPU\ncpu MHz\t\t: {mhz}\nphysical id\t: 0\n"
                      f"core id\t\t: {cpu % cores}\ncpu cores\t: {cores}\nflags\t\t: fpu {flags}\n")
    return "\n".join(blocks)


def test_cpu_peak_from_the_instruction_set_cores_and_clock():
    avx512 = cpu_peak(2, _cpuinfo("sse sse2 avx fma avx2 avx512f"), max_freq_khz="3100000\n")
    assert avx512.gflops == pytest.approx(2 * 3.1 * 64)
    assert "AVX-512" in avx512.how and "cpuinfo_max_freq" in avx512.how and avx512.bandwidth_gbs is None
    avx2 = cpu_peak(2, _cpuinfo("sse sse2 avx fma avx2"))  # no cpufreq: 'cpu MHz' of /proc/cpuinfo
    assert avx2.gflops == pytest.approx(2 * 2.445424 * 32)
    assert avx2.how.startswith("2 cores x 2.45 GHz x 32 fp32 FLOP/cycle, AVX2 FMA") and "'cpu MHz'" in avx2.how
    assert cpu_peak(2, _cpuinfo("sse sse2 avx")).gflops == pytest.approx(2 * 2.445424 * 16)  # AVX without FMA
    # Hyperthreads share a core: 8 threads on 4 logical CPUs of 2 cores count 2 cores; one thread counts one.
    assert cpu_peak(8, _cpuinfo("avx fma avx2", threads_per_core=2)).gflops == pytest.approx(2 * 2.445424 * 32)
    assert cpu_peak(1, _cpuinfo("avx fma avx2")).gflops == pytest.approx(2.445424 * 32)
    assert cpu_peak(2, _cpuinfo("avx fma avx2"), cpus={0}).gflops == pytest.approx(2.445424 * 32)
    unknown = cpu_peak(2, _cpuinfo("asimd"))
    assert unknown.gflops is None and "unknown" in unknown.how


def test_cuda_peak_from_device_properties():
    h100 = SimpleNamespace(major=9, minor=0, multi_processor_count=132, clock_rate=1_980_000,
                           memory_clock_rate=2_619_000, memory_bus_width=5120)
    fp32 = cuda_peak(h100)
    assert fp32.gflops == pytest.approx(132 * 1.98 * 256)  # about 67 TFLOP/s, NVIDIA's fp32 figure
    assert fp32.bandwidth_gbs == pytest.approx(2 * 2.619e9 * 640 / 1e9)  # about 3.35 TB/s
    assert cuda_peak(h100, "bf16").gflops == pytest.approx(132 * 1.98 * 4096)
    old = cuda_peak(SimpleNamespace(major=3, minor=5, multi_processor_count=15, clock_rate=875_000))
    assert old.gflops is None and "unknown" in old.how and old.bandwidth_gbs is None


def test_last_level_cache_from_sysfs(tmp_path):
    for index, (level, size) in enumerate([(1, "32K"), (2, "512K"), (3, "32768K")]):
        folder = tmp_path / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") is None


def _sampler(other: float):
    """A load sampler whose other processes keep ``other`` cores busy: busy time grows by this process's own
    CPU time plus ``other`` per second."""
    clock = {"t": 0.0}

    def snapshot():
        clock["t"] += 10.0
        return clock["t"] * (1 + other), clock["t"], clock["t"]
    return snapshot


@pytest.fixture()
def quick_samples(monkeypatch):
    monkeypatch.setattr(roofline, "GAP_S", 0.001)
    monkeypatch.setattr(roofline, "MIN_SAMPLE_S", 0.005)


def test_under_load_is_returned_but_not_cached_quiet_is_cached_refresh_measures_again(tmp_path, monkeypatch, quick_samples):
    cache = tmp_path / "roof.json"
    monkeypatch.setenv(roofline.CACHE_ENV, str(cache))
    monkeypatch.setattr(roofline, "cpu_snapshot", _sampler(1.5))
    busy = roofline.machine_roofline("cpu", **TINY)
    assert busy.peak_gflops > 0 and busy.other_cores == pytest.approx(1.5)
    assert "1.50 cores" in busy.under_load and not busy.stored and not cache.exists()
    assert "not cached: taken under load" in busy.summary_lines()[-1]

    monkeypatch.setattr(roofline, "cpu_snapshot", _sampler(0.0))
    quiet = roofline.machine_roofline("cpu", **TINY)
    assert not quiet.under_load and quiet.stored and quiet.measured_at.endswith("Z")
    (record,) = json.loads(cache.read_text()).values()
    assert record["other_cores"] == 0.0 and record["threads"] == quiet.threads and record["load_1min"] is not None
    again = roofline.machine_roofline("cpu", **TINY)
    assert again.cached and again.measured_at == quiet.measured_at and again.peak_gflops == quiet.peak_gflops
    assert "read from the cache" in again.cache_status()

    monkeypatch.setattr(roofline, "cpu_snapshot", _sampler(0.1))
    fresh = roofline.machine_roofline("cpu", refresh=True, **TINY)
    assert not fresh.cached and fresh.stored and fresh.other_cores == pytest.approx(0.1)
    monkeypatch.setattr(roofline, "cpu_snapshot", _sampler(2.0))
    refused = roofline.machine_roofline("cpu", refresh=True, **TINY)
    assert refused.under_load and roofline.machine_roofline("cpu", **TINY).other_cores == pytest.approx(0.1)

    # A record from before conditions were recorded says nothing about its load: it is measured again.
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: {k: record[k] for k in ("device", "dtype", "hardware", "threads", "peak_gflops",
                                                              "bandwidth_gbs", "matmul_sizes", "copy_mib")}}))
    monkeypatch.setattr(roofline, "cpu_snapshot", _sampler(0.0))
    assert not roofline.machine_roofline("cpu", **TINY).cached


def test_load_verdict_thresholds():
    assert roofline.load_verdict("cpu", 0.2, 9.0, None) == ""  # measured other use decides, not the load average
    assert "0.30 cores" in roofline.load_verdict("cpu", 0.3, 0.0, None)
    assert "load average 1.50" in roofline.load_verdict("cpu", None, 1.5, None)  # no /proc/stat: load average
    assert roofline.load_verdict("cpu", None, 0.5, None) == ""
    assert "50 % busy" in roofline.load_verdict("cuda", 1.9, 3.0, 50.0)
    assert roofline.load_verdict("cuda", 1.9, 3.0, None) == ""


def test_matmul_sizes_grow_until_they_stop_improving(monkeypatch):
    monkeypatch.setattr(roofline, "SIZES", {"cpu": (32, 64, 128, 256, 512)})
    # 128 and 256 are not 5 % better than 64: two flat sizes in a row end the sweep (512 is never timed)
    rates = {32: 10.0, 64: 40.0, 128: 41.0, 256: 40.5, 512: 90.0}
    monkeypatch.setattr(roofline, "_matmul_rate", lambda n, device, dtype, samples, deadline: rates[n])
    peak, size, sizes = roofline.measure_matmul_gflops("cpu", None)
    assert (peak, size, sizes) == (41.0, 128, [32, 64, 128, 256])
    rates[128] = 38.0  # one noisy size below the best does not end it: 256 beats 64 by 5 %, and 512 is timed
    rates[256] = 60.0
    assert roofline.measure_matmul_gflops("cpu", None)[:3] == (90.0, 512, [32, 64, 128, 256, 512])


def test_roofline_figure_draws_the_hardware_peak():
    from analysis.breakdown.figures import roofline_figure

    roof = roofline.Roofline(device="cpu", dtype="float32", hardware="test", threads=2, peak_gflops=100.0,
                             bandwidth_gbs=10.0, matmul_sizes=[64], copy_mib=1, hardware_peak_gflops=400.0,
                             hardware_peak_how="2 cores x 3.1 GHz x 64")
    names = {t.name: t for t in roofline_figure([], roof).data}
    hardware = names["hardware peak 400 GFLOP/s"]
    assert hardware.line.dash == "dash" and set(hardware.y) == {400.0} and max(names["measured roof"].y) == 100.0
    roof.hardware_bandwidth_gbs = 50.0
    sloped = [t for t in roofline_figure([], roof).data if t.name.startswith("hardware peak")][0]
    assert min(sloped.y) < 400.0 == max(sloped.y)
    roof.hardware_peak_gflops = None
    assert not [t for t in roofline_figure([], roof).data if t.name.startswith("hardware peak")]


def test_repeatability_benchmark_reports_ratios():
    from analysis.bench import roofline as bench
    from analysis.bench.suite import BENCHMARKS

    assert "analysis.bench.roofline" in BENCHMARKS.values() and callable(bench.main)
    assert list(inspect.signature(bench.measure).parameters)[:2] == ["quick", "progress"]
    first = roofline.Roofline(device="cpu", dtype="float32", hardware="t", threads=2, peak_gflops=100.0,
                              bandwidth_gbs=20.0, matmul_sizes=[], copy_mib=1, hardware_peak_gflops=200.0)
    second = roofline.Roofline(**{**first.__dict__, "peak_gflops": 95.0, "bandwidth_gbs": 25.0,
                                  "under_load": "other processes used 1.00 cores, over 0.25"})
    peak, bandwidth, share, _ = bench.figures(first, second)
    assert peak["value"] == 0.95 and peak["passed"] and bandwidth["value"] == 1.25 and not bandwidth["passed"]
    assert "under load" in bandwidth["detail"] and share["value"] == 50.0


def test_cli_refreshes_the_roofline_and_prints_it_against_the_hardware_peak(monkeypatch, capsys):
    from analysis.breakdown import cli

    asked = {}

    def fake(device, precision, refresh=False, progress=None):
        asked["refresh"] = refresh
        return roofline.Roofline(device=device, dtype="float32", hardware="t", threads=2, peak_gflops=100.0,
                                 bandwidth_gbs=20.0, matmul_sizes=[64], copy_mib=1, peak_size=64,
                                 measured_at="2030-01-01T00:00:00Z", load_1min=3.0, other_cores=1.2,
                                 under_load="other processes used 1.20 cores, over 0.25",
                                 hardware_peak_gflops=400.0, hardware_peak_how="2 cores x 3.1 GHz x 64")
    monkeypatch.setattr(cli, "machine_roofline", fake)
    assert cli.main(["--models", "no_such_model", "--refresh-roofline"]) == 2
    out = capsys.readouterr().out
    assert asked == {"refresh": True}
    assert "100.0 GFLOP/s = 25% of the hardware peak 400.0 GFLOP/s" in out
    assert "2030-01-01T00:00:00Z" in out and "load average 3.00" in out and "not cached: taken under load" in out


def test_page_measures_the_limits_again_on_request(tmp_path, monkeypatch, quick_samples):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "roof.json"))
    monkeypatch.setattr(roofline, "cpu_snapshot", _sampler(0.0))
    roofline.machine_roofline("cpu", **TINY)
    measure = roofline.measure_roofline
    monkeypatch.setattr(roofline, "measure_roofline",  # the button's measurement, at test sizes, under load
                        lambda device, precision, **kw: measure(device, precision, **{**kw, **TINY}))
    monkeypatch.setattr(roofline, "cpu_snapshot", _sampler(1.0))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "pages" / "breakdown.py"),
                           default_timeout=120).run()
    at.multiselect(key="bd_models").set_value(["efficientvit_m0"]).run()
    at.multiselect(key="bd_batches").set_value([1]).run()
    at.number_input(key="bd_iters").set_value(1)
    at.button(key="bd_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    limits = next(m.value for m in at.markdown if "This machine's limits" in m.value)
    assert "read from the cache" in limits and "hardware peak" in limits and "other processes used" in limits
    at.button(key="bd_remeasure").click().run()
    assert not at.exception, [e.value for e in at.exception]
    limits = next(m.value for m in at.markdown if "This machine's limits" in m.value)
    assert "not cached: taken under load (other processes used 1.00 cores" in limits
    assert any("measured under load" in w.value for w in at.warning)  # besides any attribution warning
