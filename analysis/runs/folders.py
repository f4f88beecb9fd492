"""A dataset-scale run's --out folder (``python -m analysis.run``): writing it so that it is either whole or
refused, and reading it back (its run.json and the task's records) for the pages' "Dataset-scale results" panels.
Each task's files, writer and reader come from the task table, ``analysis.runs.tasks.TASKS``.

Writing: an old run.json is removed first, then every record file is written under a staging folder inside the
--out folder, fsynced and renamed into place, and run.json is written last (temporary name, fsync, rename) with
each record's size and SHA-256. Reading: a folder whose records do not match its run.json is "unfinished", never drawn.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.runs.tasks import TASKS

RUN_FILE = "run.json"
STAGING = ".writing"  # record files are written here, then renamed into the --out folder
RESUME_HINT = "finish it with the same command plus --resume (already processed images are not read again)"


# ----------------------------------------------------------------------------- writing a run atomically

def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as run.json records them."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def write_json_atomic(target: Path, data: Any, indent: int | None = 2) -> Path:
    """JSON to a temporary name beside ``target``, fsync, rename: readers see the old file or the whole new one."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str))
    _fsync(tmp)
    os.replace(tmp, target)
    _fsync(target.parent)
    return target


def forget_finished_run(out: Path) -> None:
    """Remove run.json: from now on the folder holds an unfinished run (its records are about to change)."""
    (out / RUN_FILE).unlink(missing_ok=True)
    for stale in out.glob(f".{RUN_FILE}.*.tmp"):  # left by a process killed while writing run.json
        stale.unlink(missing_ok=True)
    _fsync(out)


def write_run(out: Path, task: str, record: Any, info: dict[str, Any]) -> list[str]:
    """Write ``task``'s record files and then run.json (``info`` plus the records' names, sizes and checksums).

    Killed at any point, the folder is refused by ``load_run`` as unfinished (and ``--resume`` finishes it).
    """
    forget_finished_run(out)
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files = TASKS[task].write(record, staging)
    checksums = {}
    for name in files:
        _fsync(staging / name)
        checksums[name] = file_digest(staging / name)
    for name in files:
        os.replace(staging / name, out / name)
    _fsync(out)
    shutil.rmtree(staging, ignore_errors=True)
    write_json_atomic(out / RUN_FILE, {**info, "records": files, "checksums": checksums})
    return files


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


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_run_json(run_file: Path) -> dict[str, Any]:
    """run.json as a dict with dict-valued sections; RunFolderError naming what is wrong otherwise."""
    try:
        text = run_file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RunFolderError(f"{run_file} cannot be read: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise RunFolderError(f"{run_file} is not UTF-8 text (byte {exc.start}): it is damaged.") from exc
    if not text.strip():
        raise RunFolderError(f"{run_file} is empty: the run was interrupted while writing it; {RESUME_HINT}.")
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{run_file} is not valid JSON ({exc.msg} at line {exc.lineno}): it is damaged.") from exc
    if not isinstance(info, dict):
        raise RunFolderError(f"{run_file} holds {_json_type(info)}, not the JSON object of a run "
                             f"(task, settings, records).")
    for key in ("settings", "model", "run", "counts", "timings", "checksums"):
        if key in info and not isinstance(info[key], dict):
            raise RunFolderError(f"{run_file}: its {key!r} field is {_json_type(info[key])}, not an object.")
    return info


def _check_records(root: Path, task: str, info: dict[str, Any]) -> None:
    """Each record file of the task exists and has the size and SHA-256 that run.json recorded for it."""
    checksums = info.get("checksums")
    if checksums is None:
        raise RunFolderError(f"{root / RUN_FILE} records no checksums of its files (it was written by an older "
                             f"version or by hand), so a cut-short file cannot be told from a whole one: "
                             f"rewrite it with the same command plus --resume.")
    for name in TASKS[task].files:
        path, expected = root / name, checksums.get(name)
        if not isinstance(expected, dict):
            raise RunFolderError(f"{root / RUN_FILE} records no checksum for {name}: the run is unfinished; "
                                 f"{RESUME_HINT}.")
        if not path.is_file():
            raise RunFolderError(f"{path} is missing: the run is unfinished; {RESUME_HINT}.")
        found = file_digest(path)
        if found != {"bytes": expected.get("bytes"), "sha256": expected.get("sha256")}:
            size = (f"{found['bytes']:,} bytes where run.json recorded {expected.get('bytes'):,}"
                    if found["bytes"] != expected.get("bytes") and isinstance(expected.get("bytes"), int)
                    else "other contents than run.json recorded")
            raise RunFolderError(f"{path} has {size}: the run is unfinished (interrupted while writing it) or the "
                                 f"file was changed; {RESUME_HINT}.")


def _check_readable(path: Path) -> None:
    """Parse one record file (every array of an NPZ, every row of a CSV); RunFolderError naming what is wrong."""
    if path.stat().st_size == 0:
        raise RunFolderError(f"{path} is empty.")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                for key in z.files:
                    z[key]
            return
        raw = path.read_bytes()
        raw.decode("utf-8")
        if not raw.endswith(b"\n"):
            raise RunFolderError(f"{path} does not end with a line break: it was cut short mid-row.")
        if path.suffix == ".json":
            json.loads(raw)
            return
        if pd.read_csv(path).empty:
            raise RunFolderError(f"{path} has a header but no rows.")
    except RunFolderError:
        raise
    except UnicodeDecodeError as exc:
        raise RunFolderError(f"{path} is not UTF-8 text (byte {exc.start}): it is damaged.") from exc
    except (zipfile.BadZipFile, EOFError) as exc:
        raise RunFolderError(f"{path} is not a whole NPZ archive ({exc or 'empty'}): it is cut short or damaged.") \
            from exc
    except Exception as exc:  # noqa: BLE001 - numpy/pandas raise many types for a damaged file; each is one sentence
        raise RunFolderError(f"{path} cannot be read ({type(exc).__name__}: {exc}).") from exc


def load_run(folder: str | Path, task: str | None = None) -> RunResult:
    """Read ``folder/run.json`` and the task's record files; RunFolderError with one clear sentence otherwise.

    The records must have the sizes and checksums run.json recorded (else the run is unfinished) and parse."""
    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        raise RunFolderError(f"{folder} is not a folder.")
    run_file = root / RUN_FILE
    if not run_file.is_file():
        if (root / "state").is_dir():
            raise RunFolderError(f"{root} holds an unfinished run (no {RUN_FILE} yet): {RESUME_HINT}.")
        raise RunFolderError(f"{root} holds no {RUN_FILE}: it is not the --out folder of a finished "
                             f"`python -m analysis.run` run.")
    info = _read_run_json(run_file)
    found = info.get("task")
    if not isinstance(found, str) or found not in TASKS:
        raise RunFolderError(f"{run_file} names no known task ({found!r}).")
    if task is not None and found != task:
        raise RunFolderError(f"{root} holds a {found!r} run, but this page shows {task!r} results. "
                             f"Run `python -m analysis.run {task} ...` and give its --out folder.")
    _check_records(root, found, info)
    for name in TASKS[found].files:
        _check_readable(root / name)
    try:
        record = TASKS[found].load(root, info)
    except Exception as exc:  # noqa: BLE001 - a parsed file without the expected fields
        raise RunFolderError(f"{root / TASKS[found].files[0]} does not hold a {found} record "
                             f"({type(exc).__name__}: {exc}).") from exc
    return RunResult(root, found, dict(info.get("settings", {})), info, record)
