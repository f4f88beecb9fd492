"""Reading a finished dataset-scale run (the --out folder of ``python -m analysis.run``) back: its run.json and
the task's records, for the pages' "Dataset-scale results" panels. The task table lives here, below the CLI."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.dataset_tasks import TASKS as ANALYSIS_TASKS
from analysis.dataset_tasks import DatasetTask
from analysis.frontier import FRONTIER, FrontierTask

TASKS: dict[str, type[DatasetTask]] = {**ANALYSIS_TASKS, FRONTIER: FrontierTask}
RUN_FILE = "run.json"


# ----------------------------------------------------------------------------- reading a run back

class RunFolderError(ValueError):
    """A folder that holds no finished run of the expected task; the message says what is wrong."""


@dataclass
class RunResult:
    """A finished run read back: its task, settings, the whole run.json, and the task's record."""

    folder: Path
    task: str
    settings: dict[str, Any]
    info: dict[str, Any]
    record: Any

    def figures(self):
        """The task's figures (plotly), keyed by a short name, drawn with the pages' builders."""
        return TASKS[self.task].figures(self.record)

    def summary(self) -> str:
        counts, timings = self.info.get("counts", {}), self.info.get("timings", {})
        return (f"{self.task} on {self.settings.get('model')}: {counts.get('images_seen')} images from "
                f"{self.settings.get('data')} ({counts.get('corrupt_skipped', 0)} corrupt skipped), "
                f"{self.info.get('run', {}).get('world_size', 1)} process(es), "
                f"{timings.get('images_per_s')} img/s")


def load_run(folder: str | Path, task: str | None = None) -> RunResult:
    """Read ``folder/run.json`` and the task's record files; RunFolderError with a clear message otherwise."""
    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        raise RunFolderError(f"{folder} is not a folder.")
    run_file = root / RUN_FILE
    if not run_file.is_file():
        hint = " Its state/ holds an unfinished run: finish it with --resume." if (root / "state").is_dir() else ""
        raise RunFolderError(f"{root} holds no {RUN_FILE}: it is not the --out folder of a finished "
                             f"`python -m analysis.run` run.{hint}")
    try:
        info = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{run_file} cannot be read: {exc}") from exc
    found = info.get("task")
    if found not in TASKS:
        raise RunFolderError(f"{run_file} names no known task ({found!r}).")
    if task is not None and found != task:
        raise RunFolderError(f"{root} holds a {found!r} run, but this page shows {task!r} results. "
                             f"Run `python -m analysis.run {task} ...` and give its --out folder.")
    try:
        record = TASKS[found].load(root, info)
    except (OSError, KeyError, ValueError) as exc:
        raise RunFolderError(f"The {found} records in {root} cannot be read: {exc}") from exc
    return RunResult(root, found, dict(info.get("settings", {})), info, record)
