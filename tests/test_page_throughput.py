"""AppTest runs a tiny benchmark on the live throughput page; its results survive later reruns."""
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.throughput.figures import claim_text, same_hardware
from models.device import cpu_name

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "throughput.py")


@pytest.fixture(autouse=True)
def _timing_here(timing_in_this_process):
    """What the page shows is under test here; its worker process is tested in tests/test_timing_request.py."""


def _tiny_run() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=240).run()
    assert not at.exception
    at.multiselect(key="tp_models").set_value(["efficientvit_m0", "mobilenetv3_large_100"]).run()
    at.selectbox(key="tp_baseline").set_value("mobilenetv3_large_100")
    at.number_input(key="tp_batch").set_value(2)
    at.number_input(key="tp_iters").set_value(1)
    at.number_input(key="tp_rounds").set_value(2)
    at.button(key="tp_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_tiny_benchmark_runs_reports_speedups_and_keeps_them_across_reruns():
    at = _tiny_run()
    table = at.dataframe[0].value.set_index("model")
    assert set(table.index) == {"efficientvit_m0", "mobilenetv3_large_100"}
    assert (table["img_per_s"] > 0).all()
    assert table.loc["mobilenetv3_large_100", "speedup"] == 1.0
    assert table.loc["efficientvit_m0", "published top-1"] == 63.2
    assert table.loc["efficientvit_m0", "paper img/s (V100)"] == 27644
    assert table.loc["efficientvit_m0", "claimed speed-up"].endswith("(paper, V100, not comparable)")
    assert len(at.get("plotly_chart")) == 2  # every round, and the accuracy chart
    assert at.status[0].label == "Done: 4 measurements (2 models x 2 rounds) on cpu"  # what the chart shows
    assert {b.label for b in at.get("download_button")} == {"Download CSV", "Download JSON"}

    # Any other widget reruns the page: the results of the run must stay until the next run.
    at.checkbox(key="tp_channels_last").check().run()
    assert not at.exception
    assert not at.info  # not back to "Pick models and press Run benchmark"
    assert at.dataframe[0].value.set_index("model")["img_per_s"].equals(table["img_per_s"])
    assert len(at.get("plotly_chart")) == 2 and len(at.get("download_button")) == 2
    assert any("settings above have changed" in c.value for c in at.caption)


def test_token_reduction_variants_are_offered():
    at = AppTest.from_file(PAGE, default_timeout=240).run()
    at.multiselect(key="tp_models").set_value(["deit_tiny_patch16_224"]).run()
    at.multiselect[1].set_value([8]).run()
    assert "deit_tiny_patch16_224@tome=8" in at.selectbox(key="tp_baseline").options


def test_claims_are_compared_only_on_their_hardware():
    assert same_hardware("V100, off the shelf", "Tesla V100-SXM2-16GB")
    assert not same_hardware("V100, off the shelf", "NVIDIA H200")
    assert same_hardware("GPU", "NVIDIA H200") and not same_hardware("GPU", "cpu")
    assert not same_hardware("V100 / Xeon CPU", "cpu")
    assert claim_text("1.64x", "V100, off the shelf", "cpu") == "1.64x (paper, V100, not comparable)"
    assert claim_text("1.64x", "V100, off the shelf", "Tesla V100") == "1.64x (paper, V100)"


def test_method_table_gives_the_variant_widgets_and_the_variants_run():
    """DeiT, a DynamicViT release and ViLT: one widget per method of the table, labelled from its record."""
    at = AppTest.from_file(PAGE, default_timeout=240).run()
    at.multiselect(key="tp_models").set_value(
        ["deit_tiny_patch16_224", "dynamicvit_deit_256_patch16_224", "vilt_b32_vqa"]).run()
    assert not at.exception, [e.value for e in at.exception]
    widgets = {w.label: w for w in at.multiselect}
    assert set(widgets) == {"Models", "ToMe: tokens merged per block (r)", "DynamicViT: keep ratio rho",
                            "EViT: keep rate", "PuMer: image prune ratio", "ToMe: target FLOP ratio",
                            "EViT: target FLOP ratio", "Input size: input size (px)",
                            "Engines (timed interleaved in the same rounds)"}
    assert widgets["EViT: keep rate"].value == []  # EViT has no release: nothing picked until asked
    rho = widgets["DynamicViT: keep ratio rho"]
    assert rho.value == ["trained"] and rho.format_func("trained") == "each release's trained rho (0.7)"
    assert widgets["ToMe: tokens merged per block (r)"].value == []
    assert [c.label for c in at.checkbox if c.value] == ["PuMer at the paper's setting"]
    # r = 16: a value ViLT's ToMe record does not offer (its r goes to 12), so only DeiT gets it
    widgets["ToMe: tokens merged per block (r)"].set_value([16]).run()
    expected = {"deit_tiny_patch16_224", "dynamicvit_deit_256_patch16_224", "vilt_b32_vqa",
                "deit_tiny_patch16_224@tome=16", "dynamicvit_deit_256_patch16_224@rho=0.7", "vilt_b32_vqa@pumer"}
    assert set(at.selectbox(key="tp_baseline").options) == expected

    at.selectbox(key="tp_baseline").set_value("deit_tiny_patch16_224")
    _run_once(at)
    table = at.dataframe[0].value.set_index("model")
    assert set(table.index) == expected and (table["img_per_s"] > 0).all()


def test_releases_run_at_their_own_trained_ratio_and_pumer_covers_vilt_and_meter():
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.multiselect(key="tp_models").set_value(
        ["dynamicvit_deit_256_patch16_224", "dynamicvit_lvvit_s_rho05", "vilt_b32_vqa", "meter_clip16_288_vqa"]).run()
    assert not at.exception, [e.value for e in at.exception]
    options = set(at.selectbox(key="tp_baseline").options)
    # DeiT and LV-ViT releases share one DynamicViT widget; each runs at the ratio it was trained for.
    assert {"dynamicvit_deit_256_patch16_224@rho=0.7", "dynamicvit_lvvit_s_rho05@rho=0.5"} <= options
    assert not {"dynamicvit_deit_256_patch16_224@rho=0.5", "dynamicvit_lvvit_s_rho05@rho=0.7"} & options
    assert {"vilt_b32_vqa@pumer", "meter_clip16_288_vqa@pumer"} <= options
    assert [c.label for c in at.checkbox].count("PuMer at the paper's setting") == 1
    at.checkbox(key="tp_PuMer_paper").uncheck().run()
    assert not {o for o in at.selectbox(key="tp_baseline").options if o.endswith("@pumer")}


def test_latency_mode_shows_median_p90_and_batch1_speedup_and_keeps_them(downloads):
    at = AppTest.from_file(PAGE, default_timeout=240).run()
    at.multiselect(key="tp_models").set_value(["efficientvit_m0", "mobilenetv3_large_100"]).run()
    at.toggle(key="tp_latency").set_value(True).run()
    assert at.toggle(key="tp_sweep").disabled
    at.selectbox(key="tp_baseline").set_value("mobilenetv3_large_100")
    at.number_input(key="tp_iters").set_value(1)
    at.number_input(key="tp_rounds").set_value(2)
    at.button(key="tp_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [s.value for s in at.subheader] == ["Batch-1 latency"]
    table = at.dataframe[0].value.set_index("model")
    assert list(table.columns[:6]) == ["median_ms", "p90_ms", "speedup", "speedup_q1", "speedup_q3", "baseline"]
    assert (table["median_ms"] > 0).all() and (table["p90_ms"] >= table["median_ms"]).all()
    assert table.loc["mobilenetv3_large_100", "speedup"] == 1.0 and table["speedup"].notna().all()
    assert len(at.get("plotly_chart")) == 1
    assert any("gains less at batch 1 on CPU" in i.value for i in at.info)
    assert at.status[0].label == "Done: 4 measurements (2 models x 2 rounds) on cpu"
    assert downloads["latency.csv"].decode().splitlines()[0].startswith("model,weights,image,median_ms,p90_ms")
    saved = json.loads(downloads["latency.json"])
    assert saved["weights"] == "random" and saved["settings"]["batch"] == 1
    assert [len(r["rounds_ms"]) for r in saved["rows"]] == [2, 2]
    # the environment: above the results, in the JSON and on every CSV row
    shown = " ".join(m.value for m in at.markdown if m.value.startswith("**Measured on**"))
    assert cpu_name() in shown and "allocator:" in shown and "(cpu)" not in shown
    assert saved["environment"]["allocator"] == saved["rows"][0]["environment"]["allocator"]
    header = downloads["latency.csv"].decode().splitlines()[0].split(",")
    assert {"env_allocator", "env_hardware", "env_intra_op_threads", "env_inter_op_threads", "env_torch",
            "env_timm", "env_precision", "env_engine", "env_batch"} <= set(header)

    at.get("download_button")[0].click().run()
    assert not at.exception
    assert at.dataframe[0].value.set_index("model")["median_ms"].equals(table["median_ms"])
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download JSON"]


def _run_once(at: AppTest) -> AppTest:
    """Press Run benchmark with the smallest run (batch 1, one iteration, one round)."""
    for key in ("tp_batch", "tp_iters", "tp_rounds"):
        at.number_input(key=key).set_value(1)
    at.button(key="tp_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_throughput_page_times_onnx_runtime_beside_eager(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("VITLAB_ONNX_CACHE", str(tmp_path))
    at = AppTest.from_file(PAGE, default_timeout=300).run()
    at.multiselect(key="tp_models").set_value(["efficientvit_m0"]).run()
    at.multiselect(key="tp_engines").set_value(["eager", "onnxruntime"])
    _run_once(at)
    table = at.dataframe[0].value.set_index("model")
    assert set(table.index) == {"efficientvit_m0", "efficientvit_m0 [onnxruntime]"}
    assert (table["img_per_s"] > 0).all()
    assert "Engines" in [s.value for s in at.subheader]
    engines = at.dataframe[1].value
    assert list(engines["engine"]) == ["eager PyTorch", "ONNX Runtime"] and set(engines["variant"]) == {"efficientvit_m0"}
    assert engines["speed-up over eager"].iloc[1] > 0


def _timed(model: str, img_per_s: float):
    from analysis.timing.harness import ThroughputRow

    return ThroughputRow(model=model, batch=8, device="cpu", precision="fp32", img_per_s=img_per_s,
                         ms_per_batch=8000.0 / img_per_s, params_m=1.0, gflops=1.0, peak_mem_mib=None,
                         weights="random", rounds=[img_per_s])


def _accuracy_table():
    from analysis.throughput.figures import results_table

    models = ["deit_tiny_patch16_224", "efficientvit_m0", "mobilenetv3_large_100", "deit_tiny_patch16_224@tome=8",
              "deit3_small_patch16_224"]
    return results_table([_timed(m, 100.0 + i) for i, m in enumerate(models)])


def test_accuracy_chart_legend_names_the_families_in_words():
    """Issue 30: the legend read 'mhsa' / 'cga' (internal codes)."""
    from analysis.throughput.figures import accuracy_figure

    figure = accuracy_figure(_accuracy_table())
    legend = {trace.name for trace in figure.data}
    assert legend == {"ViT / DeiT (multi-head self-attention)", "EfficientViT (cascaded group attention)", "CNN"}
    assert figure.layout.legend.orientation == "h" and figure.layout.legend.y < 0  # below: it hid labels at the right


def test_accuracy_caption_names_every_model_left_out_and_why():
    """Issue 30: a typed deit3_small_patch16_224 was missing from the chart while the caption said only
    token-reduction variants were left out."""
    from analysis.throughput.figures import accuracy_caption, accuracy_figure

    table = _accuracy_table()
    plotted = {text for trace in accuracy_figure(table).data for text in trace.text}
    assert plotted == {"deit_tiny_patch16_224", "efficientvit_m0", "mobilenetv3_large_100"}
    caption = accuracy_caption(table)
    assert "deit3_small_patch16_224 (no published ImageNet top-1 on record" in caption
    assert "deit_tiny_patch16_224@tome=8 (token-reduction variant" in caption
    assert "deit_tiny_patch16_224," not in caption  # a plotted model is not named as left out
    everything = accuracy_caption(table[table["model"] == "deit_tiny_patch16_224"])
    assert "left out" not in everything.lower()
