"""The timing CLIs (``python -m analysis...``) run under tcmalloc when it is installed.

Measured on this project's 2-core CPU (README, *Limits*): with glibc's malloc, even with its thresholds fixed
(``analysis.timing.env.control_allocator``), MobileNetV3-Large ran about 10 % slower in a process that had run
the DeiT-S group first than in a fresh one, and still did after 12 s of idling (so not the CPU's clock);
under Debian's tcmalloc (``libtcmalloc-minimal4``) it was faster in both and the gap smaller. An allocator can
only be preloaded before the process starts, so ``rerun_under_tcmalloc`` replaces a fresh ``python -m
analysis.<cli>`` process with the same command under ``LD_PRELOAD`` before torch is imported. It does nothing
for any other program (pytest, ``streamlit run``), when an allocator is already preloaded, when the library is
absent, or when ``VITLAB_ALLOCATOR`` names a choice (``glibc``: fixed thresholds; ``default``: glibc as it comes).

Torch-free on purpose: it runs from ``analysis/__init__.py``, before anything large is imported.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # Debian's libtcmalloc-minimal4
TRIED = "VITLAB_PRELOAD_TRIED"  # set in the rerun's environment: never a second rerun


def command_module(argv: Sequence[str]) -> str | None:
    """The module a ``python [options] -m MODULE ...`` command runs, else None."""
    args = iter(list(argv)[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-X", "-W"):  # options that take the next argument
            next(args, None)
        elif arg.startswith("-c") or not arg.startswith("-"):
            return None  # -c or a script: not a module command
    return None


def rerun_command(argv: Sequence[str], environ: Mapping[str, str], library: str = TCMALLOC,
                  platform: str = sys.platform) -> dict[str, str] | None:
    """The environment to rerun ``argv`` under ``library`` in, or None when it should run as it is."""
    module = command_module(argv) or ""
    if not platform.startswith("linux") or not (module == "analysis" or module.startswith("analysis.")):
        return None
    if environ.get("VITLAB_ALLOCATOR") or environ.get(TRIED):
        return None
    if any(name in environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc")):
        return None
    if not Path(library).exists():
        return None
    preload = " ".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    return {**environ, "LD_PRELOAD": preload, TRIED: "1"}


def rerun_under_tcmalloc(execve: Callable = os.execve) -> None:
    """Called while ``python -m analysis.<cli>`` locates its module (``sys.argv[0]`` is then ``-m``)."""
    if not sys.argv or sys.argv[0] != "-m":
        return
    env = rerun_command(sys.orig_argv, os.environ)
    if env is not None:
        sys.stdout.flush(), sys.stderr.flush()
        execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
