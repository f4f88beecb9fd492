"""AppTest runs a tiny benchmark on the live throughput page."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "throughput.py")


def test_tiny_benchmark_runs_and_reports_speedups():
    at = AppTest.from_file(PAGE, default_timeout=240).run()
    assert not at.exception
    at.multiselect[0].set_value(["efficientvit_m0", "mobilenetv3_large_100"]).run()
    at.selectbox[0].set_value("mobilenetv3_large_100")
    at.number_input[0].set_value(2)  # batch
    at.number_input[1].set_value(1)  # iterations per round
    at.number_input[2].set_value(2)  # rounds
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value.set_index("model")
    assert set(table.index) == {"efficientvit_m0", "mobilenetv3_large_100"}
    assert (table["img_per_s"] > 0).all()
    assert table.loc["mobilenetv3_large_100", "speedup"] == 1.0
    assert table.loc["efficientvit_m0", "published top-1"] == 63.2
    assert table.loc["efficientvit_m0", "paper img/s (V100)"] == 27644
    assert len(at.get("plotly_chart")) >= 2  # the live chart and the accuracy chart
    assert {b.label for b in at.get("download_button")} >= {"Download CSV", "Download JSON"}


def test_token_reduction_variants_are_offered():
    at = AppTest.from_file(PAGE, default_timeout=240).run()
    at.multiselect[0].set_value(["deit_tiny_patch16_224"]).run()
    at.multiselect[1].set_value([8]).run()
    assert "deit_tiny_patch16_224@tome=8" in at.selectbox[0].options
