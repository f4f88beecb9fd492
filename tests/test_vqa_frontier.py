"""``python -m analysis.run vqa-frontier`` end to end on the small random ViLT and METER, real photos and a questions
file written here: scores, agreement, timing columns, a stopped then resumed run, shards that add up, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.data.folders import ShardSampler
from analysis.data.images import sample_images
from analysis.data.questions import QuestionImages
from analysis.runs.cli import main
from analysis.runs.folders import load_run
from analysis.runs.vqa_frontier import VQAFrontierTask, evaluate
from analysis.runs.vqa_points import ACCURACY, AGREEMENT, default_variants, variant_of
from analysis.runs.vqa_sizes import ModelsAtSizes
from analysis.vision_language.models import pumer_models
from analysis.vision_language.vqa_accuracy import vqa_accuracy
from models.input_sizes import sized_forward
from models.vilt_pumer import tiny_vilt

VILT, METER = "vilt_b32_vqa", "meter_clip16_288_vqa"
# Every answer of the small random models' vocabulary, in varied counts: whatever they answer scores differently.
QUESTIONS = [
    ("china.jpg", "What animal is in the picture?",
     ["bird", "bird", "dog", "cat", "cat", "cat", "yes", "no", "2", "red"]),
    ("flower.jpg", "What color is the flower?",
     ["Red.", "red", "red", "bird", "water", "no", "dog", "cat", "2", "yes"]),
    ("china.jpg", "Is there water?", ["yes", "Yes", "no", "water", "bird", "bird", "bird", "dog", "cat", "two"]),
    ("missing_pixels.jpg", "How many birds?", ["2", "two", "2", "bird", "yes", "no", "red", "dog", "cat", "water"]),
    ("flower.jpg", "Is it a dog?", ["no", "no", "no", "no", "dog", "bird", "bird", "bird", "bird", "cat"]),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Each run of this module on one torch thread (``one_torch_thread`` in conftest)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The two scikit-learn photos (small), an unreadable image, a questions file with answers and one without."""
    root = tmp_path_factory.mktemp("vqa")
    images = root / "images"
    images.mkdir()
    for sample in sample_images():
        sample.image.resize((120, 90)).save(images / f"{sample.name}.jpg", quality=90)
    (images / "missing_pixels.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    labelled, unlabelled = root / "questions.jsonl", root / "no_answers.jsonl"
    labelled.write_text("".join(json.dumps({"image": i, "question": q, "answers": a, "question_id": n}) + "\n"
                                for n, (i, q, a) in enumerate(QUESTIONS)))
    unlabelled.write_text("\n".join(json.dumps({"image": i, "question": q}) for i, q, _ in QUESTIONS) + "\n")
    return images, labelled, unlabelled


def run_cli(tmp_path: Path, name: str, *argv: str, expect: int = 0) -> Path:
    out = tmp_path / name
    assert main(["vqa-frontier", *argv, "--out", str(out), "--workers", "0", "--no-progress", "--device", "cpu",
                 "--random-weights"]) == expect
    return out


def test_vilt_scores_times_and_resumes_to_the_same_answers(files, tmp_path):
    images, questions, _ = files
    argv = ("--model", VILT, "--images", str(images), "--questions", str(questions), "--batch", "2",
            "--variants", "pumer", f"{VILT}@pumer,prune=0", "size=256", "--timing-iters", "1", "--timing-rounds", "1")
    whole = run_cli(tmp_path, "whole", *argv)
    run = load_run(whole, "vqa-frontier")  # checksums and record files as for every task
    assert run.info["counts"]["corrupt_skipped"] == 1 and run.info["counts"]["images_seen"] == 4
    points, answers = run.record, pd.read_csv(whole / "vqa_answers.csv", keep_default_na=False)
    assert list(points["variant"]) == [VILT, f"{VILT}@pumer", f"{VILT}@pumer,prune=0", f"{VILT}@size=256"]
    assert list(points["setting"]) == ["unreduced", "PuMer (paper setting)", "PuMer: merging only", "Input size 256 px"]
    assert (points["metric"] == ACCURACY).all() and (points["questions"] == 4).all()
    scored = answers[answers["scored"]]
    for variant in points["variant"]:  # every score is VQAv2's accuracy of the answer written beside it
        expected = [vqa_accuracy(a, s.split("|")) for a, s in zip(scored[f"{variant} answer"], scored["answers"])]
        assert np.allclose(scored[f"{variant} accuracy"].astype(float), expected)
        row = points[points["variant"] == variant].iloc[0]
        assert row["score"] == pytest.approx(np.mean(expected))
        assert row["ci_low"] <= row["score"] <= row["ci_high"]
    assert points["drop"].iloc[0] == 0 and (points["img_per_s"] > 0).all() and points["speedup"].iloc[0] == 1.0
    assert {"gflops", "peak_mem_mib", "measured_at", "env_intra_op_threads"} <= set(points.columns)
    # Peak memory of one forward on the CPU too, and each variant's saving against the unreduced model
    assert (points["peak_mem_mib"] > 0).all() and points["memory_saving"].iloc[0] == 0.0
    assert json.loads((whole / "vqa_frontier.json").read_text())["points"][1]["variant"] == f"{VILT}@pumer"
    assert "questions per second" in run.figures()["vqa_frontier"].layout.xaxis.title.text

    split = run_cli(tmp_path, "split", *argv, "--stop-after-batches", "1")
    assert not (split / "run.json").exists()
    run_cli(tmp_path, "split", *argv, "--resume", "--no-timing")  # timings differ run to run; answers may not
    assert (split / "vqa_answers.csv").read_bytes() == (whole / "vqa_answers.csv").read_bytes()
    deterministic = ["variant", "setting", "questions", "score", "ci_low", "ci_high", "drop", "drop_ci_low",
                     "drop_ci_high", "agreement"]
    resumed = load_run(split, "vqa-frontier")
    assert resumed.record[deterministic].equals(points[deterministic])
    assert resumed.info["run"]["samples_resumed"] == 2


def test_meter_without_answers_scores_agreement_with_the_table_variants(files, tmp_path):
    images, _, unlabelled = files
    out = run_cli(tmp_path, "meter", "--model", METER, "--images", str(images), "--questions", str(unlabelled),
                  "--batch", "3", "--no-timing")
    points = load_run(out, "vqa-frontier").record
    assert list(points["variant"]) == [v.name for v in default_variants(METER)]
    assert {"PuMer (paper setting)", "PuMer: pruning only", "PuMer: merging only", "PuMer: larger ratios",
            "PuMer: late fusion blocks", "Input size 320 px", "Input size 288 px"} <= set(points["setting"])
    assert (points["metric"] == AGREEMENT).all() and points["score"].iloc[0] == 1.0
    assert np.allclose(points["score"], points["agreement"]) and "img_per_s" not in points
    assert (points["questions"] == 4).all() and points["score"].notna().all()
    answers = pd.read_csv(out / "vqa_answers.csv", keep_default_na=False)
    assert not any(c.endswith(" accuracy") for c in answers.columns)
    # Each variant runs on the model and the images at its size: the same weights, the position embedding resized.
    entry = next(e for e in pumer_models() if e.name == METER)
    variants = [variant_of(METER, t) for t in ("unreduced", "size=320", "pumer,size=320", "pumer")]
    models = ModelsAtSizes.load(variants, lambda size: entry.load(True, image_size=size)[:2], "cpu")
    assert sorted(models.models, key=str) == [320, None]
    dataset = models.questions(QuestionImages.from_files(images, unlabelled, models.processors[None]))
    batch = dataset.collate([dataset[i] for i in (0, 1)])
    assert {s: b["pixel_values"].shape[-1] for s, b in batch.images.items()} == {None: 64, 320: 320}
    with torch.inference_mode():
        logits = [models.bind(v, METER)(batch.images) for v in variants]
        direct = sized_forward(models.models[320], batch.images[320], 320)
    assert torch.equal(logits[1], direct) and not torch.allclose(logits[1], logits[0])
    assert models.bind(variants[2], METER).model is models.models[320]


def test_bad_input_is_one_sentence(files, tmp_path, capsys):
    images, questions, _ = files
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "china.jpg", "question": "Why?"}\n{"image": "china.jpg"\n')
    absent = tmp_path / "absent.jsonl"
    absent.write_text('{"image": "nowhere.jpg", "question": "Why?"}\n')
    common = ("--model", VILT, "--images", str(images), "--no-timing")
    run_cli(tmp_path, "a", *common, "--questions", str(broken), expect=2)
    run_cli(tmp_path, "b", *common, "--questions", str(absent), expect=2)
    run_cli(tmp_path, "c", *common, "--questions", str(questions), "--variants", f"{METER}@pumer", expect=2)
    run_cli(tmp_path, "d", *common, expect=2)
    err = capsys.readouterr().err
    assert "broken.jsonl, line 2 is not JSON" in err
    assert "1 image(s) the questions name are not in" in err and "nowhere.jpg" in err
    assert f"is of {METER}, and this run answers with {VILT}" in err
    assert "needs --questions" in err


def test_variants_come_from_the_method_table(monkeypatch):
    from models import methods
    from models.registry import VILT as VILT_FAMILY

    names = [v.name for v in default_variants(VILT)]
    assert names[:2] == [VILT, f"{VILT}@pumer"] and f"{VILT}@pumer,reduce=0-1-2" in names
    assert len(names) == len(set(names))
    extra = methods.Method("zz-test", "ZZ", frozenset({VILT_FAMILY}), "models.vilt_pumer:pumer_forward",
                           (methods.Setting("zz", "prune_ratio", "zz ratio", float, (0.4, 0.6), 0.4),),
                           neutral_arguments={"prune_ratio": 0.0})
    monkeypatch.setitem(methods.METHODS, extra.key, extra)
    added = [v for v in default_variants(VILT) if v.method == extra.key]
    assert [v.name for v in added] == [f"{VILT}@zz=0.4", f"{VILT}@zz=0.6"] and added[0].label == "ZZ zz=0.4"
    assert variant_of(VILT, "zz=0.5,").name == f"{VILT}@zz=0.5"
    with pytest.raises(ValueError, match="match no method"):
        variant_of(VILT, "nothing=1")


def test_shards_add_up_to_one_process(files):
    """What torchrun's all-reduce adds: two ranks' sums over their shards equal one process's sums."""
    images, questions, _ = files
    model, processor = tiny_vilt(0)
    dataset = QuestionImages.from_files(images, questions, processor)
    variants = [variant_of(VILT, t) for t in ("unreduced", "pumer")]

    def sums(rank: int, world: int) -> dict[str, torch.Tensor]:
        task = VQAFrontierTask(ModelsAtSizes.single(model, processor), VILT, variants, dataset.questions)
        for start in range(0, len(dataset), 2):
            indices = list(ShardSampler(dataset, world, rank))[start:start + 2]
            if indices:
                task.update_batch(dataset.collate([dataset[i] for i in indices]), torch.device("cpu"))
        return task.sums

    one, (a, b) = sums(0, 1), (sums(0, 2), sums(1, 2))
    assert all(torch.equal(one[k], a[k] + b[k]) for k in one)
    record = evaluate(ModelsAtSizes.single(model, processor), VILT, dataset, variants[1:], batch_size=2)
    assert record.seen.sum() == 4 and np.array_equal(record.scores, one["score"].numpy())
