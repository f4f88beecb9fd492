"""Quiet hangs and leftovers of the dataset CLI (issue 25): a frozen torchrun rank is named within --timeout,
DataLoader workers die with a killed main process, and --workers defaults to the cores available."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.data.images import sample_images
from analysis.runs.cli import default_workers

ROOT = Path(__file__).resolve().parents[1]
FREEZE = """
import os, sys, time
import analysis.runs.cli as run

if os.environ["FREEZE_RANK"] == os.environ.get("RANK", "0"):
    run.run_shard = lambda *args: time.sleep(3600)  # a rank that hangs (a stuck file system, a deadlocked worker)
sys.exit(run.main(sys.argv[1:]))
"""
WORKERS = """
import os, sys, time
import analysis.runs.cli as run

def started_then_frozen(task, dataset, state, args, env, path):  # the shard's DataLoader workers run, then a hang
    batches = iter(run.make_loader(dataset, run.ShardSampler(dataset, env.world_size, env.rank), args, env))
    next(batches)
    open(os.environ["READY"], "w").close()
    time.sleep(3600)

run.run_shard = started_then_frozen
sys.exit(run.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("process-images")
    for sample in sample_images():
        for copy in range(2):
            sample.image.resize((96, 64)).save(root / f"{sample.name}_{copy}.jpg", quality=90)
    return root


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def cli_args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["head-similarity", "--model", "efficientvit_m0", "--random-weights", "--data", str(images), "--out",
            str(out), "--batch", "1", "--device", "cpu", "--no-progress", *extra]


def test_a_frozen_rank_is_named_when_the_timeout_fires(images, tmp_path):
    driver = tmp_path / "freeze.py"
    driver.write_text(FREEZE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
               *cli_args(images, tmp_path / "run", "--workers", "0", "--timeout", "10")]
    done = subprocess.run(command, cwd=ROOT, env=child_env(FREEZE_RANK="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0
    assert ("rank 1 did not reach the final all-reduce of the sums within --timeout 10 s" in done.stderr
            ), done.stderr[-3000:]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_dataloader_workers_die_with_a_killed_main_process(images, tmp_path):
    driver = tmp_path / "workers.py"
    driver.write_text(WORKERS)
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, str(driver), *cli_args(images, tmp_path / "run", "--workers", "2")],
                               cwd=ROOT, env=child_env(READY=str(ready)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if ready.exists() or process.poll() is not None:
                break
            time.sleep(0.25)
        assert ready.exists(), process.stderr.read()[-3000:] if process.poll() is not None else "never ready"
        workers = _children(process.pid)
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        # Without PR_SET_PDEATHSIG they notice only at their next 5 s watchdog check; with it, the kernel kills them.
        for _ in range(20):
            if not any(_alive(w) for w in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        if process.poll() is None:
            process.kill()


def test_workers_default_to_the_cores_available(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on two cores: one worker each
    assert default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_missing_while_the_group_is_set_up_is_named(images, tmp_path, monkeypatch, capsys):
    """A rank frozen before it joins the process group (the first seconds of a torchrun run) never publishes its
    address: rank 0 names it in one sentence, not a raw DistStoreError. Run in this process as rank 0 of 2, with a
    TCPStore in the role of torchrun's agent store; without one (plain env://) rank 0 hosts the store itself."""
    import torch.distributed as dist

    from analysis.runs.cli import main

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                           WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    args = cli_args(images, tmp_path / "run", "--workers", "0", "--timeout", "1")
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "rank 1 did not join the process group within --timeout 1 s" in error and "Traceback" not in error
    assert not dist.is_initialized()

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert main(args) == 1
    assert "only 1 of 2 processes joined the process group within --timeout 1 s" in capsys.readouterr().err
