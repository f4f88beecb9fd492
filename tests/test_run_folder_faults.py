"""Fault injection on dataset-scale run folders (issue 25): a result is either whole or refused.

Every task's run is made once (random weights, 4 small images written here). Then: a kill at every step of writing
the records and run.json, a real SIGKILL in the middle of taylor_scores.csv, 22 corrupted folders, a class folder
renamed between a kill and its resume. A kill is an exception that no ``except Exception`` catches (``Killed``), or
a real SIGKILL in a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.runs import folders as run_folders
from analysis.data.images import sample_images
from analysis.runs.cli import main
from analysis.runs.folders import RUN_FILE, TASKS, RunFolderError, file_digest, load_run, write_run

ROOT = Path(__file__).resolve().parents[1]
EVIT, DEIT = "efficientvit_m0", "deit_tiny_patch16_224"
RUNS = {  # task: model, extra arguments (small settings: every task stays fast on 2 busy cores)
    "taylor": (EVIT, ()),
    "head-similarity": (EVIT, ()),
    "frontier": (DEIT, ("--settings", "unreduced", "tome=4")),
    "keep-frequency": (DEIT, ()),
    "tome-merge": (DEIT, ("--r", "8")),
}


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and no ``except Exception`` swallows it."""


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def offline_one_thread(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path_factory.mktemp("no-weights")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            mp.delenv(key, raising=False)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """4 small JPEGs in two class sub-folders."""
    root = tmp_path_factory.mktemp("fault-images")
    for folder in ("drake", "otter"):
        (root / folder).mkdir()
        for sample in sample_images():
            sample.image.resize((96, 64)).save(root / folder / f"{sample.name}.jpg", quality=90)
    return root


def cli(task: str, data: Path, out: Path, *extra: str) -> int:
    model, arguments = RUNS[task]
    return main([task, "--model", model, "--random-weights", "--data", str(data), "--out", str(out), "--batch", "2",
                 "--workers", "0", "--no-progress", "--device", "cpu", *arguments, *extra])


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("finished")
    for task in RUNS:
        assert cli(task, images, base / task) == 0
    return {task: base / task for task in RUNS}


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def records(folder: Path, task: str) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TASKS[task].files}


def refusal(folder: Path) -> str | None:
    """load_run's message, or None when it accepts the folder."""
    try:
        load_run(folder)
    except RunFolderError as exc:
        return str(exc)
    return None


def inject_kill(mp: pytest.MonkeyPatch, task: str, kill_at: int, count_io: bool = True) -> dict[str, int]:
    """Count the steps of writing a run (each record file's write, each fsync, each rename); be killed at one.

    A kill inside a record file's write leaves that file half written and the later ones unwritten. Without
    ``count_io`` only the record files' writes are steps."""
    steps = {"n": 0}
    real_fsync, real_replace, real_write = run_folders._fsync, os.replace, TASKS[task].write

    def tick():
        steps["n"] += 1
        if steps["n"] == kill_at:
            raise Killed

    def fsync(path):
        tick()
        real_fsync(path)

    def replace(source, target):
        tick()
        real_replace(source, target)

    def write(record, out):
        files = real_write(record, out)
        for i, name in enumerate(files):
            steps["n"] += 1
            if steps["n"] == kill_at:
                data = (out / name).read_bytes()
                (out / name).write_bytes(data[:len(data) // 2])
                for later in files[i + 1:]:
                    (out / later).unlink()
                raise Killed
        return files

    if count_io:
        mp.setattr(run_folders, "_fsync", fsync)
        mp.setattr(os, "replace", replace)
    mp.setattr(TASKS[task], "write", staticmethod(write))
    return steps


# ----------------------------------------------------------------------------- 1. kills while writing

@pytest.mark.parametrize("task", list(RUNS))
def test_a_kill_at_any_step_of_writing_leaves_a_folder_that_is_refused(task, finished, tmp_path):
    reference = load_run(finished[task])
    info = {k: v for k, v in reference.info.items() if k not in ("records", "checksums")}
    with pytest.MonkeyPatch.context() as mp:
        steps = inject_kill(mp, task, kill_at=-1)
        write_run(copy_run(finished[task], tmp_path / "count"), task, reference.record, info)
    total = steps["n"]
    assert total >= 3 * len(TASKS[task].files) + 4  # writes, fsyncs and renames of the records; run.json's
    for kill_at in range(1, total + 1):
        out = copy_run(finished[task], tmp_path / f"kill{kill_at}")
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
            inject_kill(mp, task, kill_at)
            write_run(out, task, reference.record, info)
        message = refusal(out)
        if kill_at < total:
            assert message is not None, f"killed at step {kill_at} of {total}, yet accepted"
            assert "unfinished" in message and "--resume" in message, message
        else:  # killed after run.json was renamed into place, before its folder was flushed: the run is whole
            assert message is None and records(out, task) == records(finished[task], task)


@pytest.mark.parametrize("task", list(RUNS))
def test_resume_finishes_a_run_killed_while_writing_its_first_record(task, finished, tmp_path, images):
    out = copy_run(finished[task], tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
        inject_kill(mp, task, kill_at=1, count_io=False)
        cli(task, images, out, "--resume")
    assert not (out / RUN_FILE).exists()
    assert "unfinished" in refusal(out)
    assert cli(task, images, out, "--resume") == 0
    assert records(out, task) == records(finished[task], task)
    assert not (out / run_folders.STAGING).exists()


DRIVER = """
import os, signal, sys
import pandas as pd
from analysis.runs.cli import main

real_to_csv = pd.DataFrame.to_csv

def to_csv(self, path=None, *args, **kwargs):  # SIGKILL at the 10th write of taylor_scores.csv
    if str(path).endswith("taylor_scores.csv"):
        with open(path, "w") as f:
            for n, line in enumerate(real_to_csv(self, None, *args, **kwargs).splitlines(True), start=1):
                f.write(line)
                f.flush()
                if n == 10:
                    os.kill(os.getpid(), signal.SIGKILL)
    return real_to_csv(self, path, *args, **kwargs)

pd.DataFrame.to_csv = to_csv
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_writing_taylor_scores_leaves_an_unfinished_run_that_resume_finishes(finished, tmp_path,
                                                                                           images):
    out = copy_run(finished["taylor"], tmp_path / "run")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = ["taylor", "--model", EVIT, "--random-weights", "--data", str(images), "--out", str(out), "--batch", "2",
            "--workers", "0", "--no-progress", "--device", "cpu", "--resume"]
    done = subprocess.run([sys.executable, str(driver), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    partial = (out / run_folders.STAGING / "taylor_scores.csv").read_text()
    assert len(partial.splitlines()) == 10  # killed mid-file, as asked
    assert (out / "taylor_scores.csv").read_bytes() == (finished["taylor"] / "taylor_scores.csv").read_bytes()
    message = refusal(out)  # the old records are whole, but run.json is gone: the folder is unfinished
    assert message and "unfinished" in message and "--resume" in message
    assert cli("taylor", images, out, "--resume") == 0
    assert records(out, "taylor") == records(finished["taylor"], "taylor")


# ----------------------------------------------------------------------------- 2. corrupt folders

def _rewrite(path: Path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


def _edit_json(change):
    def edit(folder: Path) -> None:
        info = json.loads((folder / RUN_FILE).read_text())
        change(info)
        (folder / RUN_FILE).write_text(json.dumps(info))
    return edit


def _cut_mid_row(data: bytes) -> bytes:
    cut = len(data) // 3
    while data[cut - 1:cut] == b"\n":
        cut += 1
    return data[:cut]


def _unknown_method(data: bytes) -> bytes:
    """frontier.csv edited by hand: a method the table does not know (issue 30: a KeyError in ``figures``)."""
    import io

    import pandas as pd

    frame = pd.read_csv(io.BytesIO(data))
    frame.loc[frame["method"] != "unreduced", "method"] = "abc"
    return frame.to_csv(index=False).encode()


def _first_lines(count: int):
    return lambda data: b"".join(data.splitlines(True)[:count])


def _flip_byte(data: bytes) -> bytes:
    return data[:40] + b"\xff" + data[41:]


def _record(name: str, change):
    return lambda folder: _rewrite(folder / name, change)


def _replace_run_json(text: bytes):
    return lambda folder: (folder / RUN_FILE).write_bytes(text)


# (id, task, corruption, file named in the message, words of the message)
RUN_JSON_CASES = [
    ("run.json empty", "taylor", _replace_run_json(b""), RUN_FILE, "is empty"),
    ("run.json not UTF-8", "taylor", _replace_run_json(b'{"task": "\xff\xfe"}'), RUN_FILE, "not UTF-8"),
    ("run.json cut mid-way", "taylor", _record(RUN_FILE, lambda d: d[:len(d) // 2]), RUN_FILE, "not valid JSON"),
    ("run.json []", "taylor", _replace_run_json(b"[]"), RUN_FILE, "holds an array"),
    ("run.json null", "taylor", _replace_run_json(b"null"), RUN_FILE, "holds null"),
    ("settings not an object", "taylor", _edit_json(lambda i: i.update(settings=5)), RUN_FILE, "is a number"),
    ("counts a list", "head-similarity", _edit_json(lambda i: i.update(counts=[])), RUN_FILE, "is an array"),
    ("unknown task", "frontier", _edit_json(lambda i: i.update(task="nope")), RUN_FILE, "no known task"),
    ("no checksums (older version)", "frontier", _edit_json(lambda i: i.pop("checksums")), RUN_FILE,
     "records no checksums"),
]
RECORD_CASES = [  # each is refused by its checksum; with run.json's checksums re-recorded, by the parser
    ("npz cut short", "head-similarity", "head_similarity.npz", lambda d: d[:len(d) // 2], "not a whole NPZ"),
    ("npz empty", "head-similarity", "head_similarity.npz", lambda d: b"", "is empty"),
    ("npz garbage", "keep-frequency", "keep_frequency.npz", lambda d: os.urandom(len(d)), "cannot be read"),
    ("npz of another task", "tome-merge", "tome_merge.npz", None, "does not hold a tome-merge record"),
    ("taylor csv cut mid-row", "taylor", "taylor_scores.csv", _cut_mid_row, "cut short mid-row"),
    ("taylor csv header only", "taylor", "taylor_scores.csv", _first_lines(1), "no rows"),
    ("taylor csv empty", "taylor", "taylor_scores.csv", lambda d: b"", "is empty"),
    ("taylor csv not UTF-8", "taylor", "taylor_scores.csv", _flip_byte, "not UTF-8"),
    ("frontier csv cut mid-row", "frontier", "frontier.csv", _cut_mid_row, "cut short mid-row"),
    ("frontier csv header only", "frontier", "frontier.csv", _first_lines(1), "no rows"),
    ("frontier csv unknown method", "frontier", "frontier.csv", _unknown_method, "'abc', which the method table"),
]
BOUNDARY_CASES = [  # whole rows only: a valid file, so only the checksum can tell
    ("taylor csv cut on a row boundary", "taylor", "taylor_scores.csv", _first_lines(10)),
    ("frontier csv cut on a row boundary", "frontier", "frontier.csv", _first_lines(2)),
]


def _other_npz(folder: Path) -> None:
    """tome_merge.npz replaced by a whole NPZ with other arrays."""
    np.savez(folder / "tome_merge.npz", something=np.arange(3))


def _corrupt_record(folder: Path, name: str, change) -> None:
    if change is None:
        _other_npz(folder)
    else:
        _rewrite(folder / name, change)


def _one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("case", RUN_JSON_CASES, ids=[c[0] for c in RUN_JSON_CASES])
def test_a_damaged_run_json_is_refused_in_one_sentence(case, finished, tmp_path):
    _, task, corrupt, name, words = case
    out = copy_run(finished[task], tmp_path / "run")
    corrupt(out)
    with pytest.raises(RunFolderError) as caught:
        load_run(out)
    assert name in str(caught.value) and words in str(caught.value), str(caught.value)
    _one_sentence(str(caught.value))


@pytest.mark.parametrize("case", RECORD_CASES + [(*c, None) for c in BOUNDARY_CASES],
                         ids=[c[0] for c in RECORD_CASES + BOUNDARY_CASES])
def test_a_record_that_does_not_match_run_json_is_unfinished(case, finished, tmp_path):
    _, task, name, change, _ = case
    out = copy_run(finished[task], tmp_path / "run")
    _corrupt_record(out, name, change)
    with pytest.raises(RunFolderError) as caught:
        load_run(out)
    message = str(caught.value)
    assert str(out / name) in message and "unfinished" in message and "--resume" in message, message
    _one_sentence(message)


@pytest.mark.parametrize("case", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_a_damaged_record_is_refused_by_its_parser_even_with_matching_checksums(case, finished, tmp_path):
    """As if run.json had been rewritten by hand for the damaged file: the parser names the file and the fault."""
    _, task, name, change, words = case
    out = copy_run(finished[task], tmp_path / "run")
    _corrupt_record(out, name, change)
    _edit_json(lambda info: info["checksums"].update({name: file_digest(out / name)}))(out)
    with pytest.raises(RunFolderError) as caught:
        load_run(out)
    message = str(caught.value)
    assert str(out / name) in message and words in message, message
    _one_sentence(message)


@pytest.mark.parametrize("corrupt", ["npz cut short", "run.json null", "frontier csv header only"])
def test_the_pages_panel_shows_the_sentence_not_a_traceback(corrupt, finished, tmp_path):
    from streamlit.testing.v1 import AppTest

    case = next(c for c in RUN_JSON_CASES + RECORD_CASES if c[0] == corrupt)
    task = case[1]
    out = copy_run(finished[task], tmp_path / "run")
    if len(case) == 5 and callable(case[2]):
        case[2](out)
    else:
        _corrupt_record(out, case[2], case[3])

    def page(task: str):
        from pages._results import dataset_run_section

        dataset_run_section([task], key="x")

    at = AppTest.from_function(page, args=(task,), default_timeout=60).run()
    at.text_input(key="x-folder").input(str(out)).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and str(out) in at.error[0].value
    assert not at.get("plotly_chart")


# ----------------------------------------------------------------------------- 3. resume over changed data

def test_resume_refuses_a_renamed_class_folder_and_names_what_changed(images, finished, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    out = tmp_path / "run"
    assert cli("head-similarity", data, out, "--batch", "1", "--stop-after-batches", "2") == 0
    (data / "otter").rename(data / "otters")
    assert cli("head-similarity", data, out, "--batch", "1", "--resume") == 2
    message = capsys.readouterr().err
    assert "changed since the interrupted run" in message, message
    assert "2 file(s) gone or renamed (otter/china.jpg, otter/flower.jpg)" in message
    assert "2 new or renamed (otters/china.jpg, otters/flower.jpg)" in message

    (data / "otters").rename(data / "otter")
    touched = data / "drake" / "china.jpg"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cli("head-similarity", data, out, "--batch", "1", "--resume") == 2
    assert "1 with another size, modification time or label (drake/china.jpg)" in capsys.readouterr().err

    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the data as they were: the resume is accepted
    assert cli("head-similarity", data, out, "--batch", "1", "--resume") == 0
    resumed, fresh = load_run(out).record, load_run(finished["head-similarity"]).record
    assert resumed.num_images == fresh.num_images == 4
    for a, b in zip(resumed.blocks, fresh.blocks):
        np.testing.assert_allclose(a.attention_similarity, b.attention_similarity, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 6. a plain DeiT and rho=

def test_rho_on_a_plain_deit_says_how_to_attach_untrained_predictors(images, tmp_path, capsys):
    assert cli("frontier", images, tmp_path / "run", "--settings", "unreduced", "rho=0.7") == 2
    message = capsys.readouterr().err
    assert "rho=0.7:untrained" in message and "deit_tiny_patch16_224" in message, message
    assert cli("frontier", images, tmp_path / "run", "--settings", "rho=0.7:untrained") == 0
    assert load_run(tmp_path / "run", "frontier").record["setting_key"].tolist() == ["rho=0.7:untrained"]


def test_a_folder_of_an_older_version_is_refused_until_resume_rewrites_it(finished, tmp_path, images):
    """No checksums in run.json, no data fingerprint in the state: --resume (reading no image) brings both."""
    out = copy_run(finished["taylor"], tmp_path / "run")
    _edit_json(lambda info: (info.pop("checksums"), info["settings"].pop("data_fingerprint")))(out)
    state_file = out / "state" / "rank0.pt"
    state = torch.load(state_file, weights_only=True)
    state["settings"].pop("data_fingerprint")
    torch.save(state, state_file)
    assert "records no checksums" in refusal(out) and "--resume" in refusal(out)
    assert cli("taylor", images, out, "--resume") == 0
    assert refusal(out) is None and records(out, "taylor") == records(finished["taylor"], "taylor")
    assert load_run(out).info["counts"]["images_this_invocation"] == 0
