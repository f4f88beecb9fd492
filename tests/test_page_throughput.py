"""AppTest runs a tiny benchmark on the live throughput page; its results survive later reruns."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

from analysis.throughput_figures import claim_text, same_hardware

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "throughput.py")


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
