"""AppTest: the "Where the time goes" page profiles tiny models, shows shares, savings and the roofline, and keeps
its results across reruns."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "breakdown.py")


@pytest.fixture()
def small_roofline(tmp_path, monkeypatch):
    # A cached roofline so the page does not spend its time measuring this machine.
    from analysis.timing import roofline

    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "roof.json"))
    roofline.store(roofline.machine_roofline("cpu", matmul_sizes=(128,), copy_mib=4, samples=1))  # even under load


def test_page_profiles_shows_figures_and_keeps_results(small_roofline):
    at = AppTest.from_file(PAGE, default_timeout=300).run()
    assert not at.exception
    assert at.info and "Profile" in at.info[0].value  # nothing computed yet
    at.multiselect(key="bd_models").set_value(["efficientvit_m0"]).run()
    at.text_input(key="bd_variants").set_value("deit_tiny_patch16_224@tome=8").run()
    at.multiselect(key="bd_batches").set_value([1]).run()
    at.number_input(key="bd_iters").set_value(1)
    at.button(key="bd_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.status[0].label == "Done: 3 profiles on cpu"  # M0, DeiT-T (added as ToMe's baseline), DeiT-T + ToMe
    names = {"efficientvit_m0", "deit_tiny_patch16_224", "deit_tiny_patch16_224@tome=8"}  # variants in full
    check = at.dataframe[0].value  # does the attribution add up: first, its ratios in the first columns
    assert set(check["model"]) == names and check["attributed_vs_plain"].gt(0).all()
    summary = at.dataframe[1].value.set_index("model")
    assert set(summary.index) == names
    assert summary["memory_bound_share"].between(0, 1).all()
    assert summary["below_bandwidth_roof"].between(0, 1).all()
    components = at.dataframe[2].value
    assert {"attention", "FFN", "token reduction"} <= set(components["component"])
    assert set(components["model"]) == names
    charts = at.get("plotly_chart")
    assert len(charts) == 5  # classes, components, blocks, savings, roofline
    labels = {b.label for b in at.get("download_button")}
    assert {"Per-operator table (CSV)", "Per-operator table (JSON)",
            "Raw trace (Chrome JSON, opens in Perfetto)"} <= labels

    # Another widget reruns the page: the results stay, marked as those of the last run.
    at.number_input(key="bd_iters").set_value(2).run()
    assert not at.exception
    assert at.dataframe[1].value.shape[0] == 3
    assert any("settings above have changed" in c.value for c in at.caption)


def test_unknown_variant_gets_one_sentence(small_roofline):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at.multiselect(key="bd_models").set_value([]).run()
    at.text_input(key="bd_variants").set_value("deit_tiny_patch16_224@rho=0.7").run()
    at.multiselect(key="bd_batches").set_value([1]).run()
    at.button(key="bd_run").click().run()
    assert not at.exception
    assert at.error and "DynamicViT" in at.error[0].value


def test_page_profiles_two_engines_side_by_side(small_roofline, tmp_path, monkeypatch):
    """Eager and ONNX Runtime on one model: the memory-bound time of each, side by side, downloadable; a variant
    ONNX cannot export is named in one sentence and the rest is still profiled."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("VITLAB_ONNX_CACHE", str(tmp_path))
    at = AppTest.from_file(PAGE, default_timeout=300).run()
    at.multiselect(key="bd_models").set_value(["efficientvit_m0"]).run()
    at.multiselect(key="bd_batches").set_value([1]).run()
    at.multiselect(key="bd_engines").set_value(["eager", "onnxruntime"]).run()
    at.checkbox(key="bd_fuse_bn").check()
    at.number_input(key="bd_iters").set_value(1)
    at.button(key="bd_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.status[0].label == "Done: 2 profiles on cpu"
    assert "Engines side by side: how much memory-bound time each removes" in [s.value for s in at.subheader]
    table = next(d.value for d in at.dataframe if "speedup_over_eager" in d.value.columns)
    assert list(table["engine"]) == ["eager PyTorch", "ONNX Runtime"]
    assert table["speedup_over_eager"].iloc[0] == 1.0 and table["memory_bound_share"].between(0, 1).all()
    assert "Engines table (CSV)" in {b.label for b in at.get("download_button")}
    summary = next(d.value for d in at.dataframe if "note" in d.value.columns)
    assert any("BatchNorm folded" in str(v) for v in summary["note"])
