"""The allocator control and the timing environment (analysis.timing.env); no timing assertions."""
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.timing import env as E

ROOT = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"

# Allocates and frees a 40 MiB buffer (above glibc's largest dynamic mmap threshold, 32 MiB) ten times and
# prints the allocator state and the minor page faults per allocation.
FAULT_PROBE = """
import torch
from analysis.timing.env import control_allocator, minor_faults
state = control_allocator()
def once():
    x = torch.empty(10 * 2**20)  # 40 MiB
    x.fill_(1.0)                  # touch every page
    del x
for _ in range(10):  # memalign leaves holes the next buffer does not fit at first: the heap settles in a few calls
    once()
before = minor_faults()
for _ in range(10):
    once()
print(state)
print((minor_faults() - before) / 10)
"""


def _probe(env_name: str) -> tuple[str, float]:
    env = E.allocator_env(env_name)
    done = subprocess.run([sys.executable, "-c", FAULT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    state, faults = done.stdout.strip().splitlines()[-2:]
    return state, float(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_controlled_glibc_reuses_large_buffers_instead_of_faulting_them_in_again():
    controlled_state, controlled = _probe("mallopt")
    default_state, default = _probe("default")
    assert controlled_state.startswith("glibc malloc, fixed thresholds")
    assert "not controlled" in default_state
    assert default > 5000  # 40 MiB = 10240 pages, mapped afresh each time
    assert controlled < 100


@pytest.mark.parametrize("name", ["jemalloc", "tcmalloc"])
def test_a_preloaded_allocator_is_recognised_and_left_alone(name):
    if not Path(E.PRELOADABLE[name]).exists():
        pytest.skip(f"{E.PRELOADABLE[name]} is not installed")
    state, faults = _probe(name)
    assert state == f"{name} (preloaded)"
    assert faults < 100


def test_missing_library_gives_no_environment_and_options_are_exclusive(monkeypatch, tmp_path):
    monkeypatch.setitem(E.PRELOADABLE, "jemalloc", str(tmp_path / "absent.so"))
    assert E.allocator_env("jemalloc") is None
    base = {"PATH": "/bin", "LD_PRELOAD": "/x.so", "MALLOC_TOP_PAD_": "1"}
    assert E.allocator_env("mallopt", base) == {"PATH": "/bin", "VITLAB_ALLOCATOR": "glibc"}
    assert E.allocator_env("default", base) == {"PATH": "/bin", "VITLAB_ALLOCATOR": "default"}
    assert E.allocator_env("malloc-env", base)["MALLOC_MMAP_THRESHOLD_"] == str(64 * 2**20)
    with pytest.raises(ValueError, match="Unknown allocator"):
        E.allocator_env("hoard")


def test_environment_names_the_cpu_threads_allocator_and_settings():
    from models.device import cpu_name

    env = E.timing_environment("cpu", "fp32", 16, "eager")
    assert env["hardware"] == cpu_name() != "cpu"
    assert env["allocator"] == E.control_allocator()
    assert env["batch"] == "16" and env["precision"] == "fp32" and env["engine"] == "eager"
    assert env["intra_op_threads"].isdigit() and env["inter_op_threads"].isdigit()
    assert env["clocks"].startswith("governor ")
    line = E.environment_line(env)
    assert cpu_name() in line and "allocator: " in line and "batch 16" in line


def test_cpu_threads_are_set_and_given_back():
    """The throughput page sets the thread count for one run through these, and sets it back after."""
    from models.device import cpu_threads, device_hardware, set_cpu_threads

    before = cpu_threads()
    previous = set_cpu_threads(before + 1)
    try:
        assert previous == before and cpu_threads() == before + 1
    finally:
        assert set_cpu_threads(previous) == before + 1
    assert cpu_threads() == before
    assert device_hardware("cpu") == "cpu" and device_hardware("mps") == "mps"


def test_the_module_a_command_runs():
    from analysis.timing.preload import command_module

    assert command_module(["python", "-m", "analysis.bench", "--quick"]) == "analysis.bench"
    assert command_module(["python3", "-u", "-X", "dev", "-m", "analysis.throughput"]) == "analysis.throughput"
    assert command_module(["python", "-manalysis.breakdown"]) == "analysis.breakdown"
    assert command_module(["python", "script.py", "-m", "analysis.x"]) is None
    assert command_module(["streamlit", "run", "app.py"]) is None
    assert command_module(["python"]) is None


def test_only_analysis_clis_rerun_under_tcmalloc_and_only_once(tmp_path):
    from analysis.timing.preload import TRIED, rerun_command

    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    cli = ["python", "-m", "analysis.bench", "--quick"]
    env = rerun_command(cli, {"PATH": "/bin"}, str(library), "linux")
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(library), TRIED: "1"}
    assert rerun_command(cli, {"LD_PRELOAD": "/x.so"}, str(library), "linux")["LD_PRELOAD"] == f"{library} /x.so"
    assert rerun_command(cli, env, str(library), "linux") is None  # the rerun itself, or tcmalloc already there
    for other in (["python", "-m", "pytest"], ["python", "-m", "streamlit", "run", "app.py"], ["python", "x.py"]):
        assert rerun_command(other, {}, str(library), "linux") is None
    for chosen in ("glibc", "default"):
        assert rerun_command(cli, {"VITLAB_ALLOCATOR": chosen}, str(library), "linux") is None
    assert rerun_command(cli, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, str(library), "linux") is None
    assert rerun_command(cli, {}, str(tmp_path / "absent.so"), "linux") is None
    assert rerun_command(cli, {}, str(library), "darwin") is None


def test_a_timing_cli_runs_under_tcmalloc_where_installed_and_glibc_on_request():
    if not Path(E.PRELOADABLE["tcmalloc"]).exists():
        pytest.skip(f"{E.PRELOADABLE['tcmalloc']} is not installed")
    base = E.allocator_env("mallopt")
    base.pop("VITLAB_ALLOCATOR")

    def allocator_line(env):
        done = subprocess.run([sys.executable, "-m", "analysis.timing.env"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        return done.stdout.split("allocator: ")[1].split(";")[0]

    assert allocator_line(base) == "tcmalloc (preloaded)"
    assert allocator_line(dict(base, VITLAB_ALLOCATOR="glibc")).startswith("glibc malloc, fixed thresholds")
