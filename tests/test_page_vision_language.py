"""The vision-language page: a fast, short message without weights (ViLT and METER), and the full walk-through with
each model's small random version, results surviving reruns."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "vision_language.py")
VILT, METER = "vilt_b32_vqa", "meter_clip16_288_vqa"


@pytest.fixture
def offline_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    st.cache_resource.clear()  # failed resolutions are cached per process: start from a clean slate
    yield tmp_path
    st.cache_resource.clear()


@pytest.fixture
def answer_calls(monkeypatch):
    """Counts answer_question calls (the page imports it on every run, so the counting wrapper is what it gets)."""
    import analysis.vision_language as vl

    calls = []
    original = vl.answer_question

    def counted(*args, **kwargs):
        calls.append(kwargs.get("method"))
        return original(*args, **kwargs)

    monkeypatch.setattr(vl, "answer_question", counted)
    return calls


def _two_sentences(message: str) -> bool:
    return message.count(". ") + message.endswith(".") <= 2


def test_the_models_come_from_the_method_table():
    from analysis.vision_language import pumer_models
    from models.methods import methods_for
    from models.registry import REGISTRY

    offered = [m.name for m in pumer_models()]
    expected = [n for n, s in REGISTRY.items() if any(m.label == "PuMer" for m in methods_for(s))]
    assert offered == expected and {VILT, METER} <= set(offered)


def test_missing_weights_are_explained(offline_without_weights):
    """A first visit without the weights (issue 30: it opened on a red error box): an info with what to put where
    and the small random model, no error."""
    app = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not app.exception
    assert app.radio(key="vl_model").value == VILT
    assert not app.error, [e.value for e in app.error]
    message = " ".join(i.value for i in app.info)
    assert "small random ViLT" in message
    assert str(offline_without_weights / "vilt-b32-finetuned-vqa") in message
    assert "download dandelin/vilt-b32-finetuned-vqa" in message
    assert _two_sentences(message) and "Tried" not in message
    assert app.expander[-1].label == "What was tried" and "Tried:" in app.expander[-1].markdown[0].value
    assert app.checkbox(key=f"vl_random_{VILT}").value is False
    assert not app.dataframe  # nothing computed without a model


def test_missing_meter_weights_are_explained(offline_without_weights):
    start = time.perf_counter()
    app = AppTest.from_file(PAGE, default_timeout=120).run()
    app.radio(key="vl_model").set_value(METER).run()
    assert not app.exception and time.perf_counter() - start < 20
    assert not app.error, [e.value for e in app.error]
    message = " ".join(i.value for i in app.info)
    assert "meter_clip16_288_roberta_vqa.ckpt" in message and str(offline_without_weights) in message
    assert str(offline_without_weights / "roberta-base") in message and "roberta-base tokenizer" in message
    assert "small random METER" in message
    assert _two_sentences(message) and "Tried" not in message
    assert app.expander[-1].label == "What was tried" and "Tried:" in app.expander[-1].markdown[0].value
    assert app.button(key="vl_retry").label == "Retry"
    assert app.checkbox(key=f"vl_random_{METER}").value is False
    assert not app.dataframe


def test_a_failed_resolution_is_remembered_until_retry(offline_without_weights, monkeypatch):
    """The slow part (hub attempts) happens once per process, not on every visit; Retry looks again."""
    from analysis.vision_language import PuMerModel
    from models.checkpoints import WeightsNotFoundError

    calls = []

    def slow_missing(self, *args, **kwargs):
        calls.append(self.name)
        time.sleep(2.5)  # what hub connection attempts cost
        raise WeightsNotFoundError("ViLT-VQA weights were not found. Tried: the hub.")

    monkeypatch.setattr(PuMerModel, "load", slow_missing)
    AppTest.from_file(PAGE, default_timeout=120).run()
    assert calls == [VILT]
    for _ in range(2):  # new visits (new sessions) and reruns
        start = time.perf_counter()
        app = AppTest.from_file(PAGE, default_timeout=120).run()
        assert time.perf_counter() - start < 2.0 and app.info
    app.run()
    assert calls == [VILT]
    app.button(key="vl_retry").click().run()
    assert calls == [VILT, VILT]


def _protocol_of_two_batches(model, processor, image, question, settings, method=None, family=None,
                              time_limit=120.0, progress=None):
    """What ``paper_protocol`` returns after batches 32 and 40 (the timing itself is tested in test_peak_memory)."""
    from analysis.timing.env import timing_environment
    from analysis.timing.harness import BenchSettings, ThroughputRow, add_speedups
    from analysis.vision_language import PuMerProtocol
    from analysis.vision_language.compute import FULL, _speed

    def row(model, batch, img_s, peak):
        return ThroughputRow(model=model, batch=batch, device="cpu", precision="fp32", img_per_s=img_s,
                             ms_per_batch=1000 * batch / img_s, params_m=1.0, gflops=1.0, peak_mem_mib=None,
                             weights="random", rounds=[img_s], img_per_s_q1=img_s, img_per_s_q3=img_s,
                             forward_peak_mib=peak, environment=timing_environment("cpu", "fp32", batch))

    rows = [row(FULL, 32, 10.0, 100.0), row("PuMer", 32, 18.0, 60.0)]
    add_speedups(rows, FULL)
    rows2 = [row(FULL, 40, 9.0, 125.0), row("PuMer", 40, 17.0, 75.0)]
    add_speedups(rows2, FULL)
    speed = _speed(rows[0], rows[1], BenchSettings(batch=32, iters=1, rounds=1, device="cpu"))
    return PuMerProtocol(32, 8, time_limit, 32, speed, tuple(rows + rows2),
                         ("stopped the sweep before batch 48: the time limit of 10 s was reached after batch 40.",),
                         measured_at="2026-01-01T00:00:00", load_average=1.5)


def test_random_vilt_shows_answers_layers_and_labelled_downloads(offline_without_weights, downloads, answer_calls,
                                                                 monkeypatch):
    import analysis.vision_language as vl

    monkeypatch.setattr(vl, "paper_protocol", _protocol_of_two_batches)
    app = AppTest.from_file(PAGE, default_timeout=120).run()
    app.checkbox(key=f"vl_random_{VILT}").check().run()
    assert not app.exception
    assert any("Random weights" in w.value for w in app.warning)
    assert not app.error

    answers = app.dataframe[0].value
    assert list(answers["rank"]) == [1, 2, 3, 4, 5]
    assert {"ViLT answer", "ViLT+PuMer answer"} <= set(answers.columns)
    assert [t.label for t in app.tabs] == ["Layer 2", "Layer 5", "Layer 8"]
    assert app.metric[0].value.endswith("x")
    assert app.metric[3].value.endswith("%")  # peak memory on every device, the CPU included
    memory = next(c.value for c in app.caption if c.value.startswith("Peak memory of one forward at batch 1"))
    assert "MiB (ViLT)" in memory and "MiB (ViLT+PuMer)" in memory and "% less." in memory
    steps = app.dataframe[1].value
    assert list(steps["layer"]) == [2, 5, 8] and (steps["image_pruned"] > 0).all()
    assert len(app.get("download_button")) == 2 * 3 + 4
    assert not any(" 1 image tokens" in c.value or "1 text tokens" in c.value for c in app.caption)
    corrections = app.dataframe[-1].value  # PuMer's code as set, then each correction flipped
    assert list(corrections["run"]) == ["as set", "protect the image CLS", "size-weighted merges"]
    assert corrections["image CLS after each reduce layer"].iloc[1] == "first, first, first"
    assert any("ranged" in c.value and "warm-up" in c.value for c in app.caption)  # the spread of the rounds

    records = json.loads(downloads["pumer_vilt_tiny_random_records.json"])
    assert records["model"] == "vilt_tiny_random" and records["weights"].startswith("random")
    assert records["image"] == "china" and records["speed"]["speedup"] > 0
    for csv in ("pumer_vilt_tiny_random_reduce_steps.csv", "pumer_vilt_tiny_random_tokens_per_layer.csv"):
        frame = pd.read_csv(io.BytesIO(downloads[csv]))
        assert list(frame.columns[:4]) == ["model", "weights", "image", "layer"]
        assert (frame["image"] == "china").all()
    chart = app.get("plotly_chart")[0].proto.spec
    assert '"text":"layer"' in chart and "china" in chart

    app.run()  # a rerun (a download click, another widget) shows the stored result
    assert len(answer_calls) == 1 and app.dataframe[0].value.equals(answers)

    app.number_input(key=f"vl_protocol_limit_{VILT}").set_value(10).run()
    app.button(key="vl_protocol_run").click().run()  # the paper's protocol: the best batch, both sides, memory
    assert not app.exception
    assert [m.value for m in app.metric[-3:]] == ["32", "10.0 / 18.0", "40.0 %"]
    protocol = pd.read_csv(io.BytesIO(downloads["pumer_vilt_tiny_random_paper_protocol.csv"]))
    assert list(protocol["batch"]) == [32, 32, 40, 40] and list(protocol["reported"]) == [True, True, False, False]
    assert list(protocol["memory_reduction_pct"]) == [0.0, 40.0, 0.0, 40.0]
    assert json.loads(downloads["pumer_vilt_tiny_random_paper_protocol.json"])["best_batch"] == 32
    assert any("time limit of 10 s" in c.value for c in app.caption)
    assert any("1-minute load average 1.50" in c.value for c in app.caption)

    app.radio(key=f"vl_layers_{VILT}").set_value("Visual entailment: layers 2, 4, 6, 8").run()
    assert not app.exception
    assert [t.label for t in app.tabs] == ["Layer 2", "Layer 4", "Layer 6", "Layer 8"]


def test_random_meter_shows_fusion_blocks_and_survives_reruns(offline_without_weights, downloads, answer_calls):
    app = AppTest.from_file(PAGE, default_timeout=120).run()
    app.radio(key="vl_model").set_value(METER).run()
    app.checkbox(key=f"vl_random_{METER}").check().run()
    assert not app.exception and not app.error
    assert any("Random weights" in w.value and "METER" in w.value for w in app.warning)
    assert app.slider(key=f"vl_prune_{METER}").value == 0.2  # the paper's METER setting
    assert app.radio(key=f"vl_layers_{METER}").value == "VQA (paper): fusion blocks 0, 1, 2, 3"
    assert any("fusion block 3 of the preset does not exist" in c.value for c in app.caption)  # 3 blocks here

    answers = app.dataframe[0].value
    assert list(answers["rank"]) == [1, 2, 3, 4, 5]
    assert {"METER answer", "METER+PuMer answer"} <= set(answers.columns)
    assert [t.label for t in app.tabs] == ["Fusion block 0", "Fusion block 1", "Fusion block 2"]
    steps = app.dataframe[1].value
    assert list(steps["fusion_block"]) == [0, 1, 2] and (steps["image_pruned"] > 0).all()
    assert len(app.get("download_button")) == 2 * 3 + 4
    assert list(app.dataframe[-1].value["run"]) == ["as set", "protect the image CLS", "size-weighted merges",
                                                    "METER image layer attends to"]
    panels = [h.proto.body for h in app.get("html")]
    assert len(panels) == 3 and "&lt;s&gt;" in panels[0] and "\u0120" not in "".join(panels)
    chart = app.get("plotly_chart")[0].proto.spec
    assert '"text":"fusion block"' in chart and "meter_tiny_random" in chart

    records = json.loads(downloads["pumer_meter_tiny_random_records.json"])
    assert records["model"] == "meter_tiny_random" and records["weights"].startswith("random")
    assert records["layers_are"] == "fusion blocks"
    assert [s["fusion_block"] for s in records["reduce_steps"]] == [0, 1, 2]
    frame = pd.read_csv(io.BytesIO(downloads["pumer_meter_tiny_random_tokens_per_fusion_block.csv"]))
    assert list(frame.columns[:4]) == ["model", "weights", "image", "fusion_block"]
    assert frame["total_tokens"].is_monotonic_decreasing

    app.run()
    assert len(answer_calls) == 1 and app.dataframe[0].value.equals(answers)
    assert answer_calls[0].key == "pumer-meter"

    app.slider(key=f"vl_prune_{METER}").set_value(0.0).run()  # a new setting computes anew
    assert len(answer_calls) == 2 and not app.exception
    assert (app.dataframe[1].value["image_pruned"] == 0).all()

    app.radio(key="vl_model").set_value(VILT).run()  # back to ViLT: its own checkbox, its own message
    assert app.checkbox(key=f"vl_random_{VILT}").value is False and "ViLT-VQA" in app.info[0].value
    app.radio(key="vl_model").set_value(METER).run()  # and METER's choices are still there
    assert app.checkbox(key=f"vl_random_{METER}").value is True and not app.error and not app.exception
    assert app.slider(key=f"vl_prune_{METER}").value == 0.0 and len(answer_calls) == 2
    assert not [w.value for w in app.warning if "Session State" in w.value]


def test_meter_without_tokenizer_then_with_an_unreadable_checkpoint(offline_without_weights):
    """A checkpoint alone is not enough (the tokenizer is named); a file that is no checkpoint says so."""
    from models.meter import _tiny_tokenizer

    (offline_without_weights / "meter_clip16_288_roberta_vqa.ckpt").write_bytes(b"not a checkpoint")
    app = AppTest.from_file(PAGE, default_timeout=120).run()
    app.radio(key="vl_model").set_value(METER).run()
    assert not app.error and str(offline_without_weights / "roberta-base") in app.info[0].value  # missing: an info
    assert "RoBERTa tokenizer" in app.expander[-1].markdown[0].value

    _tiny_tokenizer(24).save_pretrained(offline_without_weights / "roberta-base")
    app.button(key="vl_retry").click().run()
    assert not app.exception and "roberta-base" not in app.error[0].value
    assert "meter_clip16_288_roberta_vqa.ckpt" in app.error[0].value and not app.dataframe
