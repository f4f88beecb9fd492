"""Timing in a fresh worker process: ``python -m MODULE --worker SPEC`` (SPEC is JSON).

Why a fresh process: even with the allocator controlled, what a process ran before moves a CPU timing (README,
*Limits*: MobileNetV3-Large about 10 % slower under glibc after the DeiT-S group, 6 % under tcmalloc). So the full
benchmark times every group in its own process, and the throughput page times every run in one, so a figure
does not depend on what the benchmark or the Streamlit server ran before.

The worker writes one JSON object per line on stdout: ``{"progress": [fraction, message]}`` and
``{"measure": [...]}`` while it runs and ``{"result": ...}`` at the end; the parent passes progress and
measurements on and returns the result. The worker inherits the parent's environment unless ``env`` is given;
``python -m`` reruns it under tcmalloc where installed (``analysis.timing.preload``).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
Progress = Callable[[float, str], None]


def run_in_fresh_process(module: str, spec: dict, env: dict[str, str] | None = None,
                         progress: Progress | None = None, on_measure: Callable | None = None,
                         timeout: float = 3600) -> Any:
    """Run ``module``'s worker on ``spec`` in a new Python process and return its result; a worker still running
    after ``timeout`` seconds is killed (reading its lines would otherwise wait for it forever)."""
    command = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    with tempfile.TemporaryFile(mode="w+") as stderr:  # a file, not a pipe: a chatty stderr cannot block the worker
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            proc.kill()

        watchdog = threading.Timer(timeout, stop)
        watchdog.start()
        result, found = None, False
        try:
            for line in proc.stdout:
                message = _message(line)
                if "progress" in message and progress is not None:
                    progress(*message["progress"])
                elif "measure" in message and on_measure is not None:
                    on_measure(*message["measure"])
                elif "result" in message:
                    result, found = message["result"], True
            code = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
        if stopped.is_set():
            raise RuntimeError(f"{module} worker {spec} was stopped after {timeout:g} s.")
        if code != 0 or not found:
            stderr.seek(0)
            raise RuntimeError(f"{module} worker {spec} failed ({code}): {stderr.read().strip()[-800:]}")
    return result


def _message(line: str) -> dict:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return message if isinstance(message, dict) else {}


def report_progress(fraction: float, message: str) -> None:
    """Worker side: one progress line for the parent."""
    print(json.dumps({"progress": [fraction, message]}), flush=True)


def report_measure(*values: Any) -> None:
    """Worker side: one measurement (e.g. a round's img/s) for the parent's live chart."""
    print(json.dumps({"measure": list(values)}), flush=True)


def report_result(result: Any) -> None:
    """Worker side: the result, the last line the parent reads."""
    print(json.dumps({"result": result}), flush=True)
