"""Out of memory on a CPU (issue 25): recognised like CUDA's, backed off in a sweep that keeps its rows, and a batch
whose estimated activations exceed the available memory is refused up front. The real allocator failures run in
subprocesses whose address space is limited with ``resource.setrlimit`` (RLIMIT_AS) in ``preexec_fn``."""
from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from analysis.timing.harness import Runner, is_out_of_memory
from analysis.timing.memory import available_bytes, batches_that_fit, bytes_per_image

ROOT = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# What a fresh python holds after the imports the limited runs make; measured in a child because this worker's own
# size depends on what the tests before ran in it (a parallel worker grows), which made the limit drift.
BASELINE = "import torch, timm, analysis.throughput.cli; from analysis.timing.memory import _kib_field; " \
           "print(_kib_field('/proc/self/status', 'VmSize'))"


@functools.lru_cache(maxsize=1)
def fresh_process_size() -> int:
    done = subprocess.run([sys.executable, "-c", BASELINE], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def limited_run(code_or_args: list[str], headroom: int) -> subprocess.CompletedProcess:
    """Run python with an address-space limit of a fresh process's size (same imports) plus ``headroom`` bytes."""
    limit = fresh_process_size() + headroom

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_memory)


def test_cpu_and_cuda_out_of_memory_are_recognised_alike():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(cpu) and is_out_of_memory(cuda) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))


SWEEP = """
import json, torch
import analysis.timing.harness as throughput
from analysis.timing.harness import BenchSettings, Runner, is_out_of_memory, sweep

try:
    torch.empty(1 << 40, dtype=torch.uint8)
    allocator = None
except RuntimeError as exc:
    allocator = {"message": str(exc), "recognised": is_out_of_memory(exc)}
throughput.batches_that_fit = lambda runners, batches: (list(batches), [])  # the back-off alone is under test
megabyte = Runner("squares", forward=lambda x: (x * x).sum(1), make_inputs=lambda b: torch.empty(b, 1 << 18),
                  flops_per_image=1.0)
rows, notes = sweep([megabyte], BenchSettings(iters=1, rounds=1, warmup=0, device="cpu"), [1, 2, 1 << 16])
print(json.dumps({"allocator": allocator, "rows": [[r.batch, r.note] for r in rows], "notes": notes}))
"""


def test_a_sweep_backs_off_from_a_real_cpu_out_of_memory_and_keeps_its_rows():
    done = limited_run(["-c", SWEEP], headroom=512 * 2**20)  # a batch of 128-256 MiB then fits: little memory touched
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "DefaultCPUAllocator: can't allocate memory" in found["allocator"]["message"]
    assert found["allocator"]["recognised"]
    batches = [b for b, _ in found["rows"]]
    assert batches[:2] == [1, 2] and len(batches) == 3  # the rows measured before the failure are kept
    assert 2 < batches[2] < 1 << 16 and found["rows"][2][1] == "asked for batch 65536"
    assert "batch 65536: out of memory; backed off to batch 32768." in found["notes"]
    assert any(n.startswith("stopped the sweep at batch 65536") for n in found["notes"])


def test_the_cli_refuses_a_batch_that_cannot_fit_before_the_sweep_in_one_sentence():
    """The issue's command (`ulimit -v` as RLIMIT_AS): batch 4096 is left out with its estimate, batch 1 measured."""
    done = limited_run(["-m", "analysis.throughput", "--models", "deit_tiny_patch16_224", "--batches", "1", "4096",
                        "--device", "cpu", "--random-weights", "--rounds", "1", "--iters", "1", "--warmup", "0",
                        "--threads", "1"], headroom=1024 * 2**20)
    assert done.returncode == 0, done.stderr[-3000:]
    note = next(line for line in done.stdout.splitlines() if line.startswith("note: batch 4096 left out"))
    assert "GiB" in note and "per image, estimated from a batch-1 forward" in note and "available" in note
    table = done.stdout.split(note, 1)[1]
    assert "deit_tiny_patch16_224" in table and " 4096 " not in table


def test_the_activation_estimate_and_the_refusal():
    model = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 5))
    per_image = bytes_per_image(model, lambda b: torch.zeros(b, 10))
    assert per_image == 2 * 1000 * 4 + 10 * 4  # twice the largest output (the first Linear's), plus the input
    runner = Runner("mlp", forward=model, make_inputs=lambda b: torch.zeros(b, 10))
    kept, notes = batches_that_fit([runner], [1, 1000, 10**6], available=100 * 2**20)
    assert kept == [1, 1000]
    assert notes == ["batch 1000000 left out: its activations would need about 7.5 GiB (8 KiB per image, "
                     "estimated from a batch-1 forward) but only 100.0 MiB of memory is available."]


AVAILABLE = """
import json, resource
from analysis.timing.memory import _kib_field, available_bytes
print(json.dumps({"available": available_bytes(), "limit": resource.getrlimit(resource.RLIMIT_AS)[0],
                  "used": _kib_field("/proc/self/status", "VmSize")}))
"""


def test_available_memory_follows_the_address_space_limit():
    done = limited_run(["-c", AVAILABLE], headroom=512 * 2**20)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["available"] <= found["limit"] - found["used"] + 16 * 2**20
    assert found["limit"] - found["used"] < available_bytes()  # the limit, not the machine's memory, counted


def test_the_throughput_page_answers_an_out_of_memory_with_a_sentence(monkeypatch, timing_in_this_process):
    from streamlit.testing.v1 import AppTest

    import analysis.timing.request

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 99857989632 bytes. Error code 12 (Cannot allocate memory)")

    # The page's worker, run in this process (timing_in_this_process) so that its benchmark can fail here; its
    # answer travels as JSON.
    monkeypatch.setattr(analysis.timing.request, "benchmark", out_of_memory)
    at = AppTest.from_file(str(ROOT / "pages" / "throughput.py"), default_timeout=240).run()
    at.multiselect(key="tp_models").set_value(["efficientvit_m0"]).run()
    at.number_input(key="tp_batch").set_value(2)
    at.button(key="tp_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(e.value.startswith("Out of memory at batch 2 on ") for e in at.error), [e.value for e in at.error]


def test_a_single_batch_that_cannot_fit_is_refused_before_any_timed_forward(monkeypatch, capsys):
    """Issue 30: ``--batch 4096`` on a CPU was tried and failed 10 s later, while ``--batches`` refused it up front."""
    import analysis.throughput.cli as throughput
    import analysis.timing.memory

    class Benchmarked(Exception):
        pass

    def benchmark(*args, **kwargs):
        raise Benchmarked

    monkeypatch.setattr(throughput, "benchmark", benchmark)
    monkeypatch.setattr(analysis.timing.memory, "available_bytes", lambda: 64 * 2**20)
    args = ["--models", "efficientvit_m0", "--device", "cpu", "--random-weights", "--rounds", "1", "--iters", "1",
            "--warmup", "0"]
    assert throughput.main([*args, "--batch", "4096"]) == 2
    error = capsys.readouterr().err
    assert "batch 4096" in error and "would need about" in error and "64.0 MiB of memory is available" in error
    with pytest.raises(Benchmarked):  # a batch that fits goes on to be measured
        throughput.main([*args, "--batch", "2"])
