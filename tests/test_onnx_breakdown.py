"""ONNX Runtime on the same breakdown as eager: every op type of an exported ViT and conv net classed, FLOPs and bytes
per node from the profile's shapes, roofline points, and "n/a" where nothing was counted."""
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from torch import nn

from analysis import breakdown as B
from analysis.breakdown.figures import _label, roofline_figure
from analysis.breakdown.onnx_costs import GraphNode
from analysis.breakdown.onnx_runtime import attribute_nodes, profile_onnx_file
from analysis.breakdown.operators import ORT_OP_TYPES, UNKNOWN
from analysis.timing.roofline import Roofline, points
from models.scopes import ATTENTION, FFN

# Looked up, not imported: importing onnx at collection cost every parallel worker 0.7 s, used or not.
pytestmark = pytest.mark.skipif(find_spec("onnxruntime") is None or find_spec("onnx") is None,
                                reason="onnx and onnxruntime are not installed")

ROOF = Roofline(device="cpu", dtype="float32", hardware="test", threads=1, peak_gflops=100.0, bandwidth_gbs=10.0,
                matmul_sizes=[], copy_mib=0)


def _profile(model: nn.Module, example: torch.Tensor, path, name: str) -> B.Breakdown:
    from analysis.timing.onnx_engine import export

    model.eval()
    export(model, model, example, path, name)
    return profile_onnx_file(path, example.numpy(), name=name, batch=example.shape[0], iters=1,
                             warmup=1)


@pytest.fixture(scope="module")
def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=10)


def _classed(b: B.Breakdown) -> None:
    node_ops = {r.op for r in b.ops if r.op != B.OVERHEAD_OP}
    assert node_ops and node_ops <= ORT_OP_TYPES, node_ops - ORT_OP_TYPES
    assert "not classed" not in b.note
    assert all(r.op_class != B.OTHER for r in b.ops if r.op in {"MatMul", "Gemm", "FusedMatMul", "Conv"})


def test_every_op_type_of_an_exported_vit_is_classed_and_its_products_counted_as_eager_counts_them(
        tiny_vit, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    b = _profile(tiny_vit, x, tmp_path / "vit.onnx", "tiny_vit")
    _classed(b)
    assert {B.COMPUTE, B.NORM, B.SOFTMAX} <= set(b.shares())
    assert "FLOPs not counted" not in b.note
    # The dense products' FLOPs (Gemm, MatMul, the patch Conv) equal the eager count of the same forward.
    eager = sum(f for (kind, _), (f, _) in B.count_costs(tiny_vit, x).items() if kind == B.COMPUTE)
    ort = sum(r.flops for r in b.ops if r.op_class == B.COMPUTE)
    assert ort == pytest.approx(eager, rel=1e-9)
    assert all(r.bytes > 0 for r in b.ops if r.op_class in (B.COMPUTE, B.NORM, B.SOFTMAX))
    # Components from the module paths in the node names, blocks for the per-block figure.
    assert {ATTENTION, FFN} <= set(b.shares("component"))
    assert {r.block for r in b.ops if r.component == ATTENTION} == {"blocks.0", "blocks.1"}
    # The session's own time between nodes is attributed like eager's framework time; the total is its run.
    assert sum(r.ms for r in b.ops) == pytest.approx(b.attributed_ms) == pytest.approx(b.forward_scope_ms)
    # On the roofline: compute and memory-bound points, each labelled with the engine once.
    pts = {p["op_class"]: p for p in points(b, ROOF)}
    assert pts[B.COMPUTE]["intensity"] > pts[B.NORM]["intensity"] > 0
    fig = roofline_figure([b], ROOF)
    markers = [t for t in fig.data if t.mode == "markers" and t.text is not None]  # not the legend's shape keys
    assert markers and all(text == "tiny_vit [onnxruntime] b2" for t in markers for text in t.text)
    assert [t.name for t in fig.data if t.legendgroup == "profiles"] == ["tiny_vit [onnxruntime] b2"]
    assert _label(b) == "tiny_vit [onnxruntime] b2"


def test_a_linear_layers_flops_are_2_b_in_out_and_a_conv_bn_net_is_classed(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    b = _profile(linear, torch.randn(3, 16), tmp_path / "linear.onnx", "linear")
    products = [r for r in b.ops if r.op_class == B.COMPUTE]
    assert len(products) == 1 and products[0].flops == 2 * 3 * 16 * 24
    # Input, weight (pre-packed by ONNX Runtime, counted from its optimised graph), bias and output, in fp32.
    assert products[0].bytes == 4 * (3 * 16 + 16 * 24 + 24 + 3 * 24)

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    conv = _profile(net, torch.randn(1, 3, 16, 16), tmp_path / "convnet.onnx", "convnet")
    _classed(conv)
    eager = sum(f for (kind, _), (f, _) in B.count_costs(net, torch.randn(1, 3, 16, 16)).items() if kind == B.COMPUTE)
    # ONNX Runtime folds each BatchNorm into its conv and fuses the activations: the products' count is eager's
    # plus one FLOP per output element of each fused activation (eager counts those as element-wise).
    fused = sum(r.flops for r in conv.ops if r.op_class == B.COMPUTE)
    assert eager <= fused <= eager + 2 * 8 * 16 * 16


def test_an_unknown_op_type_is_other_and_named(tmp_path):
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 30},
              {"cat": "Node", "name": "/model/blocks/blocks.0/attn/qkv/Gemm_kernel_time", "ts": 1, "dur": 10,
               "args": {"op_name": "Gemm", "input_type_shape": [{"float": [4, 8]}, {"float": [12]}],
                        "output_type_shape": [{"float": [4, 12]}]}},
              {"cat": "Node", "name": "Fancy_token_1_kernel_time", "ts": 12, "dur": 5,
               "args": {"op_name": "NoSuchOp", "input_type_shape": [{"float": [4, 12]}],
                        "output_type_shape": [{"float": [4, 12]}]}}]
    graph = {"/model/blocks/blocks.0/attn/qkv/Gemm": GraphNode(
        "Gemm", {"transA": 0}, initializers=[([8, 12], 4), ([12], 4)], inputs=3)}
    rows, found = attribute_nodes(events, 1, graph, model="m")
    by = {r.op: r for r in rows}
    assert found["unclassed"] == {"NoSuchOp"} and found["uncounted"] == {"NoSuchOp"}
    assert by["NoSuchOp"].op_class == B.OTHER and by["NoSuchOp"].component == UNKNOWN
    assert by["Gemm"].flops == 2 * 4 * 8 * 12 and by["Gemm"].component == ATTENTION
    assert by["Gemm"].bytes == 4 * (4 * 8 + 8 * 12 + 12 + 4 * 12)
    assert by[B.OVERHEAD_OP].ms == pytest.approx(0.015) and found["run_ms"] == pytest.approx(0.030)


def test_the_report_says_n_a_where_nothing_was_counted():
    rows = [B.OpRow(model="m", op="Gemm", op_class=B.COMPUTE, component=ATTENTION, ms=1.0, calls=1.0)]
    b = B.Breakdown(model="m [onnxruntime]", batch=1, device="cpu", precision="fp32", engine="onnxruntime",
                    weights="random", ops=rows, profiled_ms=[1.2], plain_ms=[1.1], attributed_ms=1.0)
    report = B.format_report(b, ROOF)
    assert "below the bandwidth roof" in report and "n/a" in report and "0.0%" not in report.split("roof")[-1]
    assert B.summary_table([b], ROOF)["below_bandwidth_roof"].isna().all()
    assert B.component_table([b])["gflops"].isna().all()
    assert points(b, ROOF)[0]["intensity"] is None


def test_an_export_with_external_data_is_saved_as_one_file(tmp_path):
    """The dynamo exporter can write the weights beside the graph (``tmp.onnx.data``); the cached file must carry
    them (a DeiT-S ToMe export was refused with 'External data path does not exist' once its temp files went)."""
    import onnx
    import onnxruntime as ort

    from analysis.timing.onnx_engine import _save_self_contained

    model = torch.nn.Linear(64, 8).eval()
    x = torch.randn(2, 64)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(model, (x,), str(plain), input_names=["images"], output_names=["logits"], dynamo=False,
                      opset_version=17)
    tmp = tmp_path / "linear.tmp1.onnx"
    onnx.save_model(onnx.load(str(plain)), str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=tmp.name + ".data", size_threshold=0)
    assert (tmp_path / (tmp.name + ".data")).is_file()
    final = tmp_path / "linear.onnx"
    _save_self_contained(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.onnx", "plain.onnx"]
    got = ort.InferenceSession(str(final)).run(None, {"images": x.numpy()})[0]
    assert np.allclose(got, model(x).detach().numpy(), atol=1e-5)
