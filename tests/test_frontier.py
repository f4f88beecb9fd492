"""The accuracy-throughput frontier: exact counts, one pass per backbone, torchrun and resume, the page."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from analysis.data.folders import NO_LABEL
from analysis.runs.frontier import (
    AGREEMENT,
    ACCURACY,
    FrontierSetting,
    FrontierTask,
    default_settings,
    frontier_figure,
    pareto_front,
    paper_points,
    setting_forward,
    wilson_interval,
)
from analysis.data.images import sample_images
from analysis.runs.cli import main
from models.loading import load_model

from models.registry import IMAGE_CLASSIFICATION, list_models

ROOT = Path(__file__).resolve().parents[1]
DEIT = "deit_tiny_patch16_224"
SETTINGS = ["unreduced", "tome=0", "tome=8", "tome=decreasing:13", "rho=0.7:untrained"]
PAGE = str(ROOT / "pages" / "frontier.py")


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory, shared_dir) -> tuple[Path, list[int]]:
    """The five shared photos and the two sample photos, each in a class sub-folder named by its ImageNet label.

    Two photos sit under a wrong class on purpose, so accuracy and agreement differ."""
    root = tmp_path_factory.mktemp("labelled")
    photos = sorted((shared_dir / "images").glob("photo_*.jpg"))
    classes = ["prairie chicken", "drake", "Irish terrier", "otter", "trailer truck"]
    wrong = {3: "drake"}  # photo_4 (an otter) filed as a drake
    for i, photo in enumerate(photos):
        folder = root / wrong.get(i, classes[i]).replace(" ", "_")
        folder.mkdir(exist_ok=True)
        (folder / photo.name).write_bytes(photo.read_bytes())
    for sample in sample_images():
        folder = root / "golden_retriever"
        folder.mkdir(exist_ok=True)
        sample.image.save(folder / f"{sample.name}.jpg")
    return root


@pytest.fixture(scope="module")
def deit(shared_dir):
    return load_model(DEIT, weights_folder=shared_dir / "weights")


def _direct_counts(loaded, folder: Path, settings: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Each setting evaluated on its own over every image, one at a time: the reference the task must match."""
    from analysis.data.folders import FolderImages

    dataset = FolderImages.from_folder(folder, loaded.transform, None, "folder")
    correct, agree = np.zeros(len(settings)), np.zeros(len(settings))
    for index in range(len(dataset)):
        _, image, label, ok = dataset[index]
        with torch.inference_mode():
            reference = loaded.model(image[None]).argmax(-1).item()
            for i, text in enumerate(settings):
                predicted = setting_forward(loaded.model, loaded.name, FrontierSetting.parse(text))(image[None])
                predicted = predicted.argmax(-1).item()
                correct[i] += predicted == label
                agree[i] += predicted == reference
    return correct, agree, len(dataset)


@pytest.mark.shared
def test_counts_equal_a_direct_evaluation(deit, labelled_folder, tmp_path, monkeypatch, shared_dir):
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(shared_dir / "weights"))
    out = tmp_path / "run"
    assert main(["frontier", "--model", DEIT, "--data", str(labelled_folder), "--labels", "folder", "--batch", "3",
                 "--workers", "0", "--no-progress", "--device", "cpu", "--out", str(out), "--settings", *SETTINGS]) == 0
    frame = pd.read_csv(out / "frontier.csv")
    correct, agree, images = _direct_counts(deit, labelled_folder, SETTINGS)
    assert list(frame["setting_key"]) == SETTINGS
    assert (frame["metric"] == ACCURACY).all() and (frame["images"] == images).all()
    np.testing.assert_array_equal(frame["hits"].to_numpy(), correct)
    np.testing.assert_allclose(frame["agreement"].to_numpy(), agree / images)
    assert frame.loc[0, "agreement"] == 1.0 and frame.loc[1, "hits"] == frame.loc[0, "hits"]  # r = 0 is unreduced
    # The real DeiT-Tiny gets the five correctly filed photos right, not the misfiled otter or the two samples.
    assert frame.loc[0, "hits"] == 4
    assert "deit_tiny_patch16_224.safetensors" in frame.loc[0, "weights"]
    assert frame.loc[4, "setting"].endswith("(untrained predictors)")


@pytest.mark.shared
def test_torchrun_and_resume_give_the_one_process_counts(labelled_folder, tmp_path, shared_dir, monkeypatch):
    env = {"VITLAB_WEIGHTS_DIR": str(shared_dir / "weights"), "OMP_NUM_THREADS": "1"}
    common = ["frontier", "--model", DEIT, "--data", str(labelled_folder), "--labels", "folder", "--batch", "2",
              "--workers", "0", "--no-progress", "--device", "cpu", "--settings", "unreduced", "tome=8",
              "rho=0.7:untrained"]
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", env["VITLAB_WEIGHTS_DIR"])
    single = tmp_path / "single"
    assert main([*common, "--out", str(single)]) == 0
    resumed = tmp_path / "resumed"
    assert main([*common, "--out", str(resumed), "--stop-after-batches", "1"]) == 0
    assert not (resumed / "frontier.csv").exists()
    assert main([*common, "--out", str(resumed), "--resume"]) == 0
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "analysis.run", *common, "--out", str(two)]
    done = subprocess.run(command, cwd=ROOT, env={**__import__("os").environ, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = pd.read_csv(single / "frontier.csv")
    for folder in (resumed, two):
        other = pd.read_csv(folder / "frontier.csv")
        pd.testing.assert_frame_equal(other[["setting_key", "hits", "images", "agreement"]],
                                      reference[["setting_key", "hits", "images", "agreement"]])
    assert json.loads((two / "run.json").read_text())["run"]["world_size"] == 2


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(8, 10)
    z = 1.959963984540054
    p, n = 0.8, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # nan: no trials, no interval


def test_pareto_front_keeps_only_undominated_points():
    frame = pd.DataFrame({"img_per_s": [10, 20, 30, 25, 5], "score": [0.9, 0.8, 0.5, 0.4, 0.95]})
    front = pareto_front(frame)
    assert front["img_per_s"].tolist() == [5, 10, 20, 30]


def test_one_forward_of_the_unreduced_model_serves_neutral_settings(monkeypatch):
    """Each batch: one unreduced forward plus one per reducing setting (r = 0 reuses the unreduced logits)."""
    loaded = load_model(DEIT, random_weights=True)
    settings = [FrontierSetting.parse(t) for t in ["unreduced", "tome=0", "tome=4", "tome=8"]]
    task = FrontierTask(loaded.model, DEIT, settings)
    calls = []
    original = loaded.model.forward_features

    def counting(x, **kwargs):
        calls.append(x.shape[0])
        return original(x, **kwargs)

    monkeypatch.setattr(loaded.model, "forward_features", counting)
    task.update(torch.randn(2, 3, 224, 224), torch.full((2,), NO_LABEL))
    assert len(calls) == 1  # ToMe's settings walk the blocks themselves; the unreduced model ran once
    record = task.result(task.sums)
    assert record.kind == AGREEMENT and record.images == 2 and record.labelled == 0
    assert record.agree[0] == record.agree[1] == 2


def test_default_settings_cover_every_applicable_method():
    deit = default_settings(DEIT)
    assert {s.method for s in deit} == {"unreduced", "tome", "dynamicvit", "evit"}
    assert all(s.untrained_predictors for s in deit if s.method == "dynamicvit")
    assert max(s.value for s in deit if s.method == "tome") == 16
    assert {s.method for s in default_settings("efficientvit_m0")} == {"unreduced"}
    dyn = default_settings("dynamicvit_deit_small_patch16_224")
    assert not any(s.untrained_predictors for s in dyn)


def test_figure_draws_methods_frontier_and_papers():
    rows = []
    for i, (method, value) in enumerate([("unreduced", None), ("tome", 4), ("tome", 8)]):
        rows.append({"model": DEIT, "weights": "w", "setting": f"s{i}", "setting_key": f"k{i}", "method": method,
                     "value": value, "metric": ACCURACY, "hits": 8 - i, "images": 10, "score": 0.8 - i / 10,
                     "ci_low": 0.5, "ci_high": 0.9, "agreement": 1.0, "img_per_s": 10.0 + 5 * i, "gflops": 2.0 - i / 2})
    figure = frontier_figure(pd.DataFrame(rows), paper_points())
    names = [trace.name for trace in figure.data]
    assert any("ToMe" in n for n in names) and "Pareto frontier (measured)" in names
    papers = next(t for t in figure.data if t.name.startswith("papers"))
    assert "circle-open" in papers.marker.symbol and "deit_tiny_patch16_224" in list(papers.text)
    assert papers.xaxis == "x2" and "V100" in figure.layout.xaxis2.title.text  # never on the local axis
    assert figure.layout.xaxis.type == "log"


@pytest.mark.shared
def test_page_computes_points_that_survive_a_download(real_weights_folder):
    at = AppTest.from_file(PAGE, default_timeout=300)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.multiselect(key="fr_values_tome").set_value([8])
    at.multiselect(key="fr_values_dynamicvit").set_value([0.7])
    at.multiselect(key="fr_values_evit").set_value([0.7])
    at.number_input(key="fr_rounds").set_value(1)
    at.number_input(key="fr_batch").set_value(1)
    next(b for b in at.button if b.label == "Compute the frontier").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[-1].value
    assert set(table["setting"]) == {"unreduced", "ToMe r=8", "DynamicViT rho=0.7 (untrained predictors)",
                                     "EViT keep_rate=0.7"}
    assert (table["img_per_s"] > 0).all() and table["metric"].str.startswith("top-1 agreement").all()
    at.number_input(key="fr_rounds").set_value(2).run()  # any other widget: a rerun
    assert len(at.dataframe[-1].value) == 4 and at.get("plotly_chart")
    assert {b.label for b in at.get("download_button")} >= {"Download points (CSV)", "Download points (JSON)"}


def test_page_offers_only_image_classifiers():
    """METER and ViLT answer questions: the frontier's top-1 means nothing for them (issue 20)."""
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.run()
    offered = list(at.multiselect(key="fr_models").options)
    assert offered == list_models(task=IMAGE_CLASSIFICATION)
    assert "meter_clip16_288_vqa" not in offered and "vilt_b32_vqa" not in offered
    assert "deit_tiny_patch16_224" in offered and "efficientvit_m0" in offered


def _compute(at: AppTest) -> AppTest:
    return next(b for b in at.button if b.label == "Compute the frontier").click().run()


def test_a_failed_compute_is_an_error_and_keeps_the_previous_frontier(tmp_path, monkeypatch, downloads):
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))  # no weights anywhere: a load fails at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_file(PAGE, default_timeout=300)
    at.run()
    at.multiselect(key="fr_values_tome").set_value([])
    at.multiselect(key="fr_values_dynamicvit").set_value([])
    at.multiselect(key="fr_values_evit").set_value([])
    at.multiselect(key="fr_random").set_value([DEIT])
    at.number_input(key="fr_rounds").set_value(1)
    at.number_input(key="fr_batch").set_value(1)
    _compute(at)
    assert not at.exception, [e.value for e in at.exception]
    first = at.dataframe[-1].value
    assert list(first["setting"]) == ["unreduced"]
    assert set(pd.read_csv(__import__("io").BytesIO(downloads["frontier.csv"]))["image"]) == {
        "2 images: china, flower"}  # frontier.csv names its images on every row

    at.multiselect(key="fr_random").set_value([])  # now DeiT-Tiny needs its file, which is not there
    _compute(at)
    assert not at.exception, [e.value for e in at.exception]
    assert not any(s.label.startswith("Done") for s in at.status), [s.label for s in at.status]
    assert [s.state for s in at.status] == ["error"]
    assert any("No points were computed" in e.value for e in at.error)
    assert any("previous frontier" in w.value for w in at.warning)
    assert at.dataframe[-1].value.equals(first)  # still on screen


def test_papers_points_have_their_own_labelled_panel_shown_by_default():
    rows = [{"model": DEIT, "weights": "w", "setting": "unreduced", "setting_key": "unreduced", "method": "unreduced",
             "value": None, "metric": AGREEMENT, "hits": 5, "images": 5, "score": 1.0, "ci_low": 0.6, "ci_high": 1.0,
             "agreement": 1.0, "img_per_s": 40.0, "gflops": 2.5}]
    figure = frontier_figure(pd.DataFrame(rows), paper_points())
    papers = next(t for t in figure.data if t.name.startswith("papers"))
    assert papers.visible is True  # not hidden behind a legend click
    assert (papers.xaxis, papers.yaxis) == ("x2", "y2")
    assert "ImageNet top-1" in figure.layout.yaxis2.title.text
    assert "agreement" in figure.layout.yaxis.title.text and "ImageNet" not in figure.layout.yaxis.title.text
    assert figure.layout.xaxis2.domain[0] > figure.layout.xaxis.domain[1]  # side by side, not overlaid
    assert figure.layout.xaxis2.overlaying is None
    ticks = list(figure.layout.xaxis2.ticktext)
    assert ticks and all(t.rstrip("k").replace(".", "").isdigit() for t in ticks)  # 300, 1k, 20k: no garbling
    assert len(set(papers.textposition)) > 1  # labels point inwards, from both sides


def test_measured_axis_ticks_are_distinct_round_numbers():
    """A short log range (0.3-3 img/s on a busy CPU) read '2 3 4 5 6 7 8 9 1 2 3' with plotly's own ticks."""
    rows = [{"model": DEIT, "weights": "w", "setting": f"s{i}", "setting_key": f"k{i}", "method": m, "value": v,
             "metric": AGREEMENT, "hits": 1, "images": 2, "score": 0.5, "ci_low": 0.1, "ci_high": 0.9,
             "agreement": 0.5, "img_per_s": x, "gflops": 2.0}
            for i, (m, v, x) in enumerate([("unreduced", None, 0.31), ("tome", 8, 1.1), ("tome", 16, 2.9)])]
    axis = frontier_figure(pd.DataFrame(rows), paper_points()).layout.xaxis
    texts = list(axis.ticktext)
    assert len(texts) >= 3 and len(set(texts)) == len(texts)
    assert [float(t) for t in texts] == sorted(float(t) for t in texts) == list(axis.tickvals)


def test_frontier_timing_carries_its_spread_and_environment():
    from analysis.runs.frontier import measure_throughput
    from analysis.timing.harness import BenchSettings

    loaded = load_model(DEIT, random_weights=True)
    settings = [FrontierSetting.parse(t) for t in ["unreduced", "tome=4"]]
    speed = measure_throughput(loaded, settings, BenchSettings(batch=1, iters=1, rounds=2, warmup=1))
    assert (speed["img_per_s_q1"] <= speed["img_per_s"]).all() and (speed["img_per_s"] <= speed["img_per_s_q3"]).all()
    assert speed["env_allocator"].nunique() == 1 and speed["env_batch"].tolist() == ["1", "1"]
    assert {"env_hardware", "env_intra_op_threads", "env_torch", "env_engine"} <= set(speed.columns)


def test_a_point_takes_every_setting_of_its_method_as_variant_names_do(tmp_path, capsys):
    """``--settings evit=0.7,fuse=off`` (issue 30): the settings after a variant's ``@``, read by the same parser."""
    from models.variants import forward_for, parse_variant

    point = FrontierSetting.parse("evit=0.7,fuse=off")
    assert (point.method, point.value) == ("evit", 0.7)
    assert FrontierSetting.parse(point.text()) == point and point != FrontierSetting.parse("evit=0.7")
    loaded = load_model(DEIT, random_weights=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        dropped = setting_forward(loaded.model, DEIT, point)(x)
        variant = forward_for(loaded.model, DEIT, parse_variant(f"{DEIT}@evit=0.7,fuse=off"))(x)
        fused = setting_forward(loaded.model, DEIT, FrontierSetting.parse("evit=0.7"))(x)
    torch.testing.assert_close(dropped, variant)
    assert not torch.allclose(dropped, fused)

    folder = tmp_path / "images"
    folder.mkdir()
    for sample in sample_images():
        sample.image.save(folder / f"{sample.name}.jpg")
    out = tmp_path / "run"
    common = ["frontier", "--model", DEIT, "--data", str(folder), "--random-weights", "--batch", "2", "--workers",
              "0", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main([*common, "--settings", "unreduced", "evit=0.7,fuse=off", "evit=0.7"]) == 0
    frame = pd.read_csv(out / "frontier.csv")
    assert [FrontierSetting.parse(k) for k in frame["setting_key"]] == [
        FrontierSetting.parse(t) for t in ["unreduced", "evit=0.7,fuse=off", "evit=0.7"]]
    assert frame["setting"].nunique() == 3
    series = {t.name for t in frontier_figure(frame.assign(img_per_s=[3.0, 2.0, 1.0])).data}
    assert len([name for name in series if "EViT" in name]) == 2  # fused and dropped: two lines, not one zigzag
    capsys.readouterr()
    assert main([*common[:-1], str(tmp_path / "bad"), "--settings", "tome=8,fuse=off"]) == 2
    assert "match no method" in capsys.readouterr().err
