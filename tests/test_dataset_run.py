"""Dataset-scale CLI: torchrun (2 gloo processes) equals one process, resume equals uninterrupted, corrupt files.

Two torchrun launches in all (start-up is the expensive part): the real ``-m analysis.run`` entry point for
keep-frequency, and one launch of a small driver that runs head-similarity, taylor and an interrupted then
resumed tome-merge in the same process group. One-process references run in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from analysis.data.folders import (NO_LABEL, FolderImages, ShardSampler, collate_readable, folder_batches,
                                   image_batches)
from analysis.runs.cli import main
from analysis.runs.folders import RunFolderError, load_run

ROOT = Path(__file__).resolve().parents[1]
DEIT, EVIT = "deit_tiny_patch16_224", "efficientvit_m0"
CORRUPT = "otter/broken.jpg"
LIMIT = 5  # the first 5 sorted files: 4 readable + the corrupt one; shards of 3 and 2 (DistributedSampler pads)
DRIVER = """
import json, sys
import torch.distributed as dist
from analysis.runs.cli import main
dist.init_process_group("gloo")
try:
    for argv in json.loads(sys.argv[1]):
        if main(argv) != 0:
            sys.exit(1)
finally:
    dist.destroy_process_group()
"""


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, shared_dir) -> Path:
    """9 files in two ImageNet-class sub-folders: 5 shared photos, 2 scikit-learn photos, a PNG, one corrupt file."""
    from analysis.data.images import sample_images

    root = tmp_path_factory.mktemp("images")
    (root / "drake").mkdir()
    (root / "otter").mkdir()
    photos = sorted((shared_dir / "images").glob("photo_*.jpg"))
    china, flower = sample_images()
    china.image.save(root / "drake" / "china.jpg", quality=90)
    flower.image.save(root / "otter" / "flower.jpg", quality=90)
    for photo in photos[:2]:
        (root / "drake" / photo.name).write_bytes(photo.read_bytes())
    for photo in photos[2:]:
        (root / "otter" / photo.name).write_bytes(photo.read_bytes())
    Image.open(photos[0]).convert("RGB").resize((160, 120)).save(root / "otter" / "photo_1_small.png")
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def cli_env(shared_dir) -> dict[str, str]:
    return {"VITLAB_WEIGHTS_DIR": str(shared_dir / "weights"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Each run of this module on one torch thread (``one_torch_thread`` in conftest)."""


@pytest.fixture(scope="module")
def run_here(cli_env, tmp_path_factory):
    """Run the CLI in this process (one process, no torchrun) and return its --out folder."""
    def run(name: str, *argv: str, expect: int = 0) -> Path:
        out = single_out(tmp_path_factory, name)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in cli_env.items():
                mp.setenv(key, value)
            for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
                mp.delenv(key, raising=False)
            assert main([*argv, "--out", str(out), "--workers", "0", "--no-progress"]) == expect
        return out
    return run


def single_out(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / "single" / name


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        full_env.pop(key, None)
    done = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def common(task: str, model: str, data: Path, *extra: str) -> list[str]:
    return [task, "--model", model, "--data", str(data), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def two_process_runs(image_folder, cli_env, tmp_path_factory) -> dict[str, Path]:
    """One torchrun launch of a driver: head-similarity, taylor, then tome-merge stopped after a batch and resumed."""
    base = tmp_path_factory.getbasetemp() / "torchrun"
    outs = {name: base / name for name in ("head", "taylor", "tome")}
    evit = ("--random-weights", "--batch", "3", "--workers", "0", "--no-progress")
    tome = common("tome-merge", DEIT, image_folder, "--limit", str(LIMIT), "--batch", "1", "--r", "decreasing:16",
                  "--workers", "0", "--no-progress", "--out", str(outs["tome"]))
    runs = [
        common("head-similarity", EVIT, image_folder, *evit, "--out", str(outs["head"])),
        common("taylor", EVIT, image_folder, *evit, "--labels", "folder", "--out", str(outs["taylor"])),
        tome + ["--stop-after-batches", "1"],
        tome + ["--resume"],
    ]
    driver = base / "driver.py"
    base.mkdir(parents=True, exist_ok=True)
    driver.write_text(DRIVER)
    torchrun([str(driver), json.dumps(runs)], cli_env)
    return outs


def npz(folder: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(folder / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run_info(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


# ----------------------------------------------------------------------------- sharding and the dataset

@pytest.mark.parametrize("size", [1, 5, 9, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_sample_exactly_once(size, world):
    data = list(range(size))
    shards = [list(ShardSampler(data, world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == data
    assert [len(ShardSampler(data, world, rank)) for rank in range(world)] == [len(s) for s in shards]
    padded = sum(len(DistributedSampler(data, world, rank, shuffle=False)) for rank in range(world))
    assert padded >= size  # torch's own sampler repeats samples whenever world does not divide size
    resumed = list(ShardSampler(data, world, 0, start=1))
    assert resumed == shards[0][1:]


def test_folder_dataset_flags_corrupt_files_and_collate_drops_them(image_folder):
    import torchvision.transforms as T

    dataset = FolderImages.from_folder(image_folder, T.Compose([T.Resize((32, 32)), T.ToTensor()]),
                                       label_mode="folder")
    assert len(dataset) == 9 and dataset.path(3) == CORRUPT
    assert set(dataset.labels) == {97, 360}  # ImageNet indices of "drake" and "otter"
    batch = collate_readable([dataset[i] for i in range(2, 6)])
    assert batch.images.shape == (3, 3, 32, 32)
    assert batch.indices.tolist() == [2, 4, 5] and batch.corrupt == [3] and batch.num_samples == 4


def test_folder_and_image_batches_as_the_frontier_page_takes_them(image_folder):
    import torchvision.transforms as T

    from analysis.data.images import sample_images

    transform = T.Compose([T.Resize((32, 32)), T.ToTensor()])
    batches, count = folder_batches(image_folder, transform, 4, label_mode="folder")
    batches = list(batches)
    assert count == 3 and [len(x) for x, _ in batches] == [3, 4, 1]  # the 4th file is the corrupt one
    assert {int(y) for _, labels in batches for y in labels} == {97, 360}
    assert len(list(folder_batches(image_folder, transform, 4, limit=2)[0])[0][0]) == 2
    batches, count = image_batches(sample_images() * 3, transform, 4)
    batches = list(batches)
    assert count == 2 and [x.shape[0] for x, _ in batches] == [4, 2]
    assert torch.equal(batches[0][0][1], transform(sample_images()[1].image))
    assert all((labels == NO_LABEL).all() for _, labels in batches)


# ----------------------------------------------------------------------------- torchrun == one process

def test_torchrun_keep_frequency_equals_one_process(image_folder, cli_env, run_here, tmp_path, deit_tiny_real):
    out = tmp_path / "keep2"
    torchrun(["-m", "analysis.run", *common("keep-frequency", DEIT, image_folder, "--limit", str(LIMIT),
                                            "--batch", "2", "--workers", "1", "--out", str(out))], cli_env)
    single = run_here("keep1", *common("keep-frequency", DEIT, image_folder, "--limit", str(LIMIT), "--batch", "4"))
    two, one = npz(out, "keep_frequency.npz"), npz(single, "keep_frequency.npz")
    assert int(two["images"]) == int(one["images"]) == LIMIT - 1
    np.testing.assert_array_equal(two["kept_count"], one["kept_count"])
    np.testing.assert_allclose(two["keep_score_sum"], one["keep_score_sum"], rtol=1e-5)
    np.testing.assert_array_equal(two["kept_count"].sum(1), (LIMIT - 1) * two["kept_tokens"])

    info = run_info(out)
    assert info["run"]["world_size"] == 2 and info["counts"]["images_seen"] == LIMIT - 1
    assert info["counts"]["corrupt_paths"] == [CORRUPT] and info["counts"]["corrupt_skipped"] == 1
    assert info["timings"]["images_per_s"] > 0 and info["note"] == "untrained score predictors"

    # The same statistic as the token page's own keep_frequency(trace) on the same four images.
    import timm.data

    from analysis.token_reduction import keep_frequency
    from models.methods import METHODS
    from models.dynamicvit import dynamicvit_forward

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=deit_tiny_real))
    dataset = FolderImages.from_folder(image_folder, transform, limit=LIMIT)
    batch = torch.stack([dataset[i][1] for i in range(LIMIT) if dataset[i][3]])
    pruner = METHODS["dynamicvit"].with_untrained_parts(deit_tiny_real, seed=0)
    with torch.inference_mode():
        _, trace = dynamicvit_forward(pruner, batch, 0.7, return_trace=True)
    record = load_run(out, "keep-frequency").record
    for stage in range(3):
        np.testing.assert_allclose(record.frequency(stage), keep_frequency(trace, stage))


def test_torchrun_head_similarity_equals_one_process_and_the_page_analysis(two_process_runs, image_folder,
                                                                            run_here, cli_env):
    from analysis.head_redundancy import analyze_model
    from models.loading import load_model

    single = run_here("head1", *common("head-similarity", EVIT, image_folder, "--random-weights", "--batch", "5"))
    two, one = npz(two_process_runs["head"], "head_similarity.npz"), npz(single, "head_similarity.npz")
    assert int(two["images"]) == int(one["images"]) == 8
    similarity_keys = [k for k in one if k.endswith("_similarity") or k.endswith("_profile")]
    assert len(similarity_keys) == 3 * len(one["blocks"])
    for key in similarity_keys:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)

    torch.manual_seed(0)  # the CLI's default --seed: the same random EfficientViT-M0
    loaded = load_model(EVIT, random_weights=True)
    dataset = FolderImages.from_folder(image_folder, loaded.transform)
    batch = torch.stack([s[1] for s in (dataset[i] for i in range(len(dataset))) if s[3]])
    reference = analyze_model(loaded.model, batch, EVIT, random_weights=True, chunk=4)
    loaded_run = load_run(two_process_runs["head"], "head-similarity")
    for mine, theirs in zip(loaded_run.record.blocks, reference.blocks):
        np.testing.assert_allclose(mine.attention_similarity, theirs.attention_similarity, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mine.feature_redundancy, theirs.feature_redundancy, rtol=1e-5, atol=1e-6)
    assert set(loaded_run.figures()) == {"redundancy vs depth", "similarity"}


def test_torchrun_taylor_equals_one_process_and_taylor_importance(two_process_runs, image_folder, run_here):
    import pandas as pd

    from analysis.channel_importance import taylor_importance
    from models.loading import load_model

    single = run_here("taylor1", *common("taylor", EVIT, image_folder, "--random-weights", "--batch", "8",
                                          "--labels", "folder"))
    two = pd.read_csv(two_process_runs["taylor"] / "taylor_scores.csv")
    one = pd.read_csv(single / "taylor_scores.csv")
    assert len(two) == len(one) > 1000
    scale = one["score"].abs().max()
    np.testing.assert_allclose(two["score"], one["score"], rtol=1e-4, atol=1e-6 * scale)

    torch.manual_seed(0)
    loaded = load_model(EVIT, random_weights=True)
    dataset = FolderImages.from_folder(image_folder, loaded.transform, label_mode="folder")
    samples = [s for s in (dataset[i] for i in range(len(dataset))) if s[3]]
    batches = [(torch.stack([s[1] for s in samples]), torch.tensor([s[2] for s in samples]))]
    reference = taylor_importance(loaded.model, batches, loss_target="labels")
    np.testing.assert_allclose(two["score"], reference.score, rtol=1e-4, atol=1e-6 * scale)
    result = load_run(two_process_runs["taylor"], "taylor")
    assert result.record.num_images == 8 and result.settings["loss_target"] == "labels"
    assert set(result.figures()) == {"components", "heads", "budget"}


def test_interrupted_then_resumed_torchrun_equals_uninterrupted_run(two_process_runs, image_folder, run_here):
    resumed = two_process_runs["tome"]
    single = run_here("tome1", *common("tome-merge", DEIT, image_folder, "--limit", str(LIMIT), "--batch", "2",
                                       "--r", "decreasing:16"))
    two, one = npz(resumed, "tome_merge.npz"), npz(single, "tome_merge.npz")
    for key in ("size_hist", "merged_count", "schedule", "tokens_per_layer"):
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    np.testing.assert_allclose(two["group_size_sum"], one["group_size_sum"], rtol=1e-6)
    info = run_info(resumed)
    assert info["run"]["resumed"] and info["run"]["samples_resumed"] == 2  # one batch of 1 on each rank
    assert info["counts"]["images_this_invocation"] == 2  # rank 0: 2 more images; rank 1: the corrupt file
    assert info["counts"]["corrupt_paths"] == [CORRUPT]
    # ToMe invariants: every patch is in exactly one token; tokens shrink by the schedule.
    images, patches = int(two["images"]), 196
    sizes = np.arange(patches + 1)
    np.testing.assert_array_equal((two["size_hist"] * sizes).sum(1), images * patches)
    np.testing.assert_array_equal(two["size_hist"].sum(1), images * (two["tokens_per_layer"] - 1))
    record = load_run(resumed, "tome-merge").record
    assert record.mean_group_size()[-1] > record.mean_token_size()[-1] > 1


def test_resume_refuses_another_world_size_or_other_settings(two_process_runs, image_folder, run_here, capsys,
                                                             tmp_path_factory):
    tome = common("tome-merge", DEIT, image_folder, "--limit", str(LIMIT), "--batch", "1", "--resume")
    # The torchrun state was written by 2 processes; resuming it with 1 is refused.
    shutil.copytree(two_process_runs["tome"], single_out(tmp_path_factory, "tome_copy"))
    run_here("tome_copy", *tome, "--r", "decreasing:16", expect=2)
    assert "written by 2 process(es) but this run has 1" in capsys.readouterr().err

    run_here("tome_stop", *tome[:-1], "--r", "decreasing:16", "--stop-after-batches", "1")
    run_here("tome_stop", *tome, "--r", "13", expect=2)
    message = capsys.readouterr().err
    assert "other settings" in message and "r: 'decreasing:16' -> '13'" in message


# ----------------------------------------------------------------------------- reading runs back

def test_load_run_checks_the_folder_and_the_task(two_process_runs, tmp_path):
    with pytest.raises(RunFolderError, match="holds no run.json"):
        load_run(tmp_path)
    with pytest.raises(RunFolderError, match="holds a 'taylor' run"):
        load_run(two_process_runs["taylor"], "head-similarity")
    with pytest.raises(RunFolderError, match="is not a folder"):
        load_run(tmp_path / "missing")
    result = load_run(two_process_runs["tome"], "tome-merge")
    assert all(isinstance(f, go.Figure) for f in result.figures().values())
    assert "tome-merge on deit_tiny_patch16_224: 4 images" in result.summary()


def test_result_folder_input_widget(two_process_runs):
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from pages._results import result_folder_input

        result = result_folder_input("head-similarity", key="folder")
        if result is not None:
            st.write(f"loaded {result.task} with {result.record.num_images} images")

    at = AppTest.from_function(page, default_timeout=60).run()
    assert not at.error and not at.markdown
    at.text_input(key="folder").input(str(two_process_runs["head"])).run()
    assert not at.error and "loaded head-similarity with 8 images" in at.markdown[0].value
    assert "RANDOM weights" in at.warning[0].value
    at.text_input(key="folder").input(str(two_process_runs["taylor"])).run()
    assert "holds a 'taylor' run" in at.error[0].value
