"""Where the time goes: attribution of profiled operator time to classes and components, roofline, ONNX engine."""
import json

import numpy as np
import pytest
import torch

from analysis import breakdown as B
from analysis.timing.roofline import Roofline, below_roof_share, machine_roofline, points
from models.loading import load_model
from models.scopes import ATTENTION, EMBEDDING, FFN, HEAD, REDUCTION, open_scopes


@pytest.fixture(scope="module")
def deit():
    return load_model("deit_tiny_patch16_224", random_weights=True)


@pytest.fixture(scope="module")
def deit_profile(deit):
    return B.profile_model("deit_tiny_patch16_224", batch=1, iters=2, warmup=1, loaded=deit)


def test_operator_names_fall_into_the_papers_classes():
    assert B.op_class("aten::addmm") == B.op_class("aten.convolution.default") == B.COMPUTE
    assert B.op_class("aten::scaled_dot_product_attention") == B.COMPUTE
    assert B.op_class("aten::reshape") == B.op_class("aten::permute") == B.op_class("aten::cat") == B.DATA
    assert B.op_class("aten::gelu") == B.op_class("aten::add") == B.ELEMENTWISE
    assert B.op_class("aten::layer_norm") == B.op_class("aten::batch_norm") == B.NORM
    assert B.op_class("aten::softmax") == B.SOFTMAX
    assert B.op_class("aten::topk") == B.op_class("aten::argsort") == B.BOOKKEEPING
    assert B.op_class("aten::adaptive_avg_pool2d") == B.OTHER


def test_attribution_adds_up_to_the_profiled_forward(deit_profile):
    b = deit_profile
    # Every microsecond inside the forward goes to exactly one (operator, class, component): nothing is lost
    # or counted twice.
    assert sum(r.ms for r in b.ops) == pytest.approx(b.attributed_ms, rel=1e-9)
    # As recorded, the self times are the forward's total; the profiler's cost per event comes out of them.
    assert b.raw_attributed_ms == pytest.approx(b.forward_scope_ms, rel=0.01)
    assert b.attributed_ms <= b.raw_attributed_ms
    assert sum(b.shares().values()) == pytest.approx(1.0)
    assert sum(b.shares("component").values()) == pytest.approx(1.0)
    assert b.plain_median_ms > 0 and b.overhead > 0 and b.attributed_vs_plain > 0
    assert len(b.plain_ms) == len(b.profiled_ms) == 2
    json.loads(b.trace)  # a Chrome trace


def test_vit_components_and_classes_appear_where_expected(deit, deit_profile):
    b = deit_profile
    components = b.shares("component")
    assert {EMBEDDING, ATTENTION, FFN, HEAD} <= set(components)
    assert REDUCTION not in components
    by = {(r.op, r.component): r for r in b.ops if " > " not in r.op}  # the outermost operators
    assert ("linear", ATTENTION) in by and ("linear", FFN) in by
    assert by[("scaled_dot_product_attention", ATTENTION)].op_class == B.COMPUTE
    sdpa_calls = sum(r.calls for r in b.ops if r.op == "scaled_dot_product_attention" and r.component == ATTENTION)
    assert sdpa_calls == 12  # one per block
    assert by[("gelu", FFN)].op_class == B.ELEMENTWISE
    assert by[("layer_norm", B.REST)].op_class == B.NORM  # the pre-norms sit between the components
    # FLOPs of the compute class equal torch.utils.flop_counter's count of the whole forward.
    from analysis.timing.flops import measure_flops
    with torch.inference_mode():
        total = measure_flops(lambda: deit.model(torch.randn(1, 3, 224, 224)))[1]
    assert sum(g["flops"] for g in b.groups() if g["op_class"] == B.COMPUTE) == pytest.approx(total, rel=1e-6)


def test_profiling_leaves_the_cached_model_untouched(deit, deit_profile):
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in deit.model.modules())
    assert open_scopes() == ()


def test_cascaded_group_attention_has_no_softmax_over_all_heads():
    loaded = load_model("efficientvit_m0", random_weights=True)
    b = B.profile_model("efficientvit_m0", batch=2, iters=1, warmup=1, loaded=loaded)
    softmax = [r for r in b.ops if r.op_class == B.SOFTMAX and r.calls]
    assert softmax and all(r.component == ATTENTION for r in softmax)
    shapes = [s[0] for r in softmax for s in r.shapes]
    # One softmax per head over that head's own (batch x windows, N, N) logits, never a [B, heads, N, N] tensor.
    assert all(len(shape) == 3 and shape[-1] == shape[-2] for shape in shapes)
    heads = sum(m.num_heads for m in loaded.model.modules() if type(m).__name__ == "CascadedGroupAttention")
    assert sum(r.calls for r in softmax if " > " not in r.op) == heads  # the outer aten::softmax
    assert sum(r.calls for r in softmax if r.op == "softmax > _softmax") == heads  # a child counts its own calls
    assert {EMBEDDING, ATTENTION, FFN, HEAD} <= set(b.shares("component"))


def test_tome_matching_shows_under_bookkeeping(deit):
    b = B.profile_model("deit_tiny_patch16_224@tome=8", batch=1, iters=1, warmup=1, loaded=deit)
    reduction = [r for r in b.ops if r.component == REDUCTION]
    assert reduction
    kinds = {r.op_class for r in reduction}
    assert B.BOOKKEEPING in kinds
    # The matching's matmul (key similarity) is bookkeeping there, not compute; the merge's scatter stays data movement.
    assert any(r.op.startswith("matmul") or r.op.startswith("argsort") or r.op.startswith("sort")
               for r in reduction if r.op_class == B.BOOKKEEPING)
    assert any(r.op_class == B.DATA for r in reduction)
    base = B.profile_model("deit_tiny_patch16_224", batch=1, iters=1, warmup=1, loaded=deit)
    saved = {s["component"]: s for s in B.reduction_savings(b, base)}
    assert saved[REDUCTION]["baseline_ms"] == 0 and saved[REDUCTION]["saved_ms"] < 0  # its machinery is all cost
    assert B.baseline_of("deit_tiny_patch16_224@tome=8") == "deit_tiny_patch16_224"
    assert B.baseline_of("deit_tiny_patch16_224") is None


def test_roofline_is_measured_once_and_cached(tmp_path, monkeypatch, deit_profile):
    from analysis.timing import roofline

    monkeypatch.setenv("VITLAB_ROOFLINE_CACHE", str(tmp_path / "roof.json"))
    monkeypatch.setattr(roofline, "other_cores", lambda before, after: 0.0)  # a quiet machine: cached
    roof = machine_roofline("cpu", matmul_sizes=(256,), copy_mib=8, samples=2)
    assert not roof.cached and roof.peak_gflops > 0 and roof.bandwidth_gbs > 0
    again = machine_roofline("cpu", matmul_sizes=(256,), copy_mib=8)
    assert again.cached and again.peak_gflops == roof.peak_gflops
    assert roof.attainable(1e9) == roof.peak_gflops
    assert roof.attainable(roof.ridge / 2) == pytest.approx(roof.peak_gflops / 2)
    pts = {p["op_class"]: p for p in points(deit_profile, roof)}
    # Dense products reuse their operands; element-wise operators and norms read and write each value once.
    assert pts[B.COMPUTE]["intensity"] > 10 > 1 > pts[B.ELEMENTWISE]["intensity"]
    assert pts[B.NORM]["intensity"] < 1
    # With a ridge at 10 FLOP/byte the products are above it and everything else below: a share strictly inside.
    fixed = Roofline(device="cpu", dtype="float32", hardware="test", threads=1, peak_gflops=100.0, bandwidth_gbs=10.0,
                     matmul_sizes=[], copy_mib=0)
    share = below_roof_share(deit_profile, fixed)
    memory = sum(p["ms"] for p in points(deit_profile, fixed, by=("op_class", "component"))
                 if p["op_class"] != B.COMPUTE and (p["flops"] or p["bytes"]))
    compute = sum(p["ms"] for p in points(deit_profile, fixed, by=("op_class", "component"))
                  if p["op_class"] == B.COMPUTE and p["intensity"] and p["intensity"] >= 10)
    assert 0.0 < share < 1.0
    assert share == pytest.approx(1 - compute / (memory + compute + sum(
        p["ms"] for p in points(deit_profile, fixed, by=("op_class", "component"))
        if p["op_class"] == B.COMPUTE and not (p["intensity"] and p["intensity"] >= 10) and (p["flops"] or p["bytes"]))))


def test_cli_prints_shares_and_writes_tables(tmp_path, capsys):
    code = B.main(["--models", "efficientvit_m0", "--batch", "1", "--iters", "1", "--warmup", "1",
                   "--no-roofline", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "efficientvit_m0" in out and "attention:" in out and "profiled/plain" in out
    import pandas as pd
    ops = pd.read_csv(tmp_path / "ops.csv")
    assert set(ops["component"]) >= {ATTENTION, FFN}
    data = json.loads((tmp_path / "breakdown.json").read_text())
    assert data["models"][0]["model"] == "efficientvit_m0"
    assert list(tmp_path.glob("trace_*.json"))
    assert B.main(["--models", "no_such_model", "--no-roofline"]) == 2


def test_onnx_runtime_output_is_checked_and_a_broken_export_refused(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper  # noqa: F401 - onnx.helper is used below
    import onnx.helper

    from analysis.timing.onnx_engine import OnnxMismatchError, check_equal, onnx_runner, session

    monkeypatch.setenv("VITLAB_ONNX_CACHE", str(tmp_path))
    from analysis.timing.runners import make_runner

    loaded = load_model("efficientvit_m0", random_weights=True)
    runner = onnx_runner(make_runner("efficientvit_m0", loaded=loaded), batch=2)
    assert runner.max_abs_diff <= 1e-4 and runner.name == "efficientvit_m0"  # the engine table tags rows
    logits = runner.forward(runner.make_inputs(2))[0]
    assert logits.shape == (2, 1000)
    # A deliberately broken export: the graph adds 0.001 to the logits after the classifier.
    graph = onnx.load(runner.onnx_file)
    output = graph.graph.output[0].name
    for node in graph.graph.node:
        node.output[:] = [o + "_raw" if o == output else o for o in node.output]
    graph.graph.initializer.append(numpy_helper.from_array(np.array(1e-3, dtype=np.float32), "offset"))
    graph.graph.node.append(onnx.helper.make_node("Add", [output + "_raw", "offset"], [output]))
    path = tmp_path / "broken.onnx"
    onnx.save(graph, str(path))
    eager = loaded.model
    images = torch.randn(2, 3, 224, 224)
    with pytest.raises(OnnxMismatchError, match="differs from eager PyTorch"):
        check_equal(session(path), eager, images, "efficientvit_m0 (broken)")


def test_attention_and_ffn_are_split_per_block(deit_profile):
    blocks = B.block_shares(deit_profile)
    assert [b["block"] for b in blocks] == [f"blocks.{i}" for i in range(12)]
    assert all(b["attention compute"] > 0 and b["FFN compute"] > 0 for b in blocks)
    assert B.block_of("stages.0.blocks.1.mixer.m") == "stages.0.blocks.1"
    assert B.block_of("layers.2.blocks.5.attn") == "layers.2.blocks.5"
    assert B.block_of("head") == ""


def test_onnx_runtime_profile_and_throughput_engine(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from analysis.throughput import cli as throughput

    monkeypatch.setenv("VITLAB_ONNX_CACHE", str(tmp_path))
    loaded = load_model("efficientvit_m0", random_weights=True)
    b = B.profile_model("efficientvit_m0", batch=1, iters=1, warmup=1, loaded=loaded, engine="onnxruntime")
    assert b.engine == "onnxruntime" and b.model == "efficientvit_m0"  # the variant; the engine once, in its field
    assert B.COMPUTE in b.shares() and sum(b.shares().values()) == pytest.approx(1.0)
    assert {ATTENTION, FFN} <= set(b.shares("component"))  # from the module paths in the exported node names
    assert "max |ORT - eager|" in b.note
    assert B.ort_op_class("MatMul") == B.COMPUTE and B.ort_op_class("Softmax") == B.SOFTMAX
    assert B.ort_component("/stages.0/blocks.0/mixer/m/attn/MatMul") == ATTENTION
    code = throughput.main(["--models", "efficientvit_m0", "--baseline", "efficientvit_m0", "--batch", "1",
                            "--rounds", "1", "--iters", "1", "--warmup", "1", "--random-weights",
                            "--engine", "eager", "onnxruntime"])
    assert code == 0
    out = capsys.readouterr().out
    assert "efficientvit_m0 [onnxruntime]" in out
    assert "speedup efficientvit_m0 [onnxruntime] vs efficientvit_m0:" in out
    assert "(engine over eager)" in out
    from analysis.breakdown.figures import _label
    assert _label(b) == "efficientvit_m0 [onnxruntime] b1"  # the engine named once


def test_dynamicvit_predictors_are_token_reduction_machinery():
    loaded = load_model("dynamicvit_deit_256_patch16_224", random_weights=True)
    reduced = B.profile_model("dynamicvit_deit_256_patch16_224@rho=0.7", batch=1, iters=1, warmup=1, loaded=loaded)
    rows = [r for r in reduced.ops if r.component == REDUCTION]
    assert any(r.op.startswith("linear") for r in rows)  # the predictors' MLPs
    assert any(r.op_class == B.BOOKKEEPING and r.op.startswith("topk") for r in rows)
    # Blocks after a pruning location run on fewer tokens: their attention sees 1 + 137 tokens from block 3 on.
    sdpa_tokens = {s[0][2] for r in reduced.ops if r.op == "scaled_dot_product_attention" for s in r.shapes}
    assert {197, 138, 97, 68} <= sdpa_tokens


def test_cli_prints_no_profiler_log_lines():
    """Kineto (the profiler's C++ side) writes its own lines to fd 2; the CLI's output holds only its results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "analysis.breakdown", "--models", "efficientvit_m0", "--batch", "1",
                           "--iters", "1", "--warmup", "0", "--no-roofline"],
                          cwd=root, env={**env, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "efficientvit_m0" in done.stdout and "profiled/plain" in done.stdout
    for noise in ("USDT", "gpuGetDeviceCount", "DeviceProperties", "SyncActivityProfilerHandler"):
        assert noise not in output
