"""FLOPs and bytes of the nodes ONNX Runtime ran, from the shapes in its own profile and its optimised graph.

ONNX Runtime's profile gives, per node it ran, the element types and shapes of its inputs and outputs
(``input_type_shape``, ``output_type_shape``) in the *optimised* graph (fused ``Gemm``, ``FusedMatMul``, NCHWc
``Conv``, ``SkipLayerNormalization``, ...). Weights it pre-packs at session start are missing from those inputs,
and attributes (``transA``, ``group``, a fused ``activation``) are not there at all; both come from the optimised
graph ORT saves (``SessionOptions.optimized_model_filepath``), matched by node name.

The counts follow the eager breakdown's (``analysis.breakdown.eager._CostMode``, ``torch.utils.flop_counter``):
a matrix product 2*M*N*K (bias not counted, as ``addmm``'s formula does not), a convolution 2 * output elements *
Cin/groups * kernel, one FLOP per output element for element-wise operators, five for norms and softmax, none
for data movement, bookkeeping and the rest; what ORT fused into a node (a bias GELU, a skip add before a norm,
a convolution's activation or summed input) adds the eager count of the fused operator. Bytes are the node's
input and output tensors (weights included; none for the reshapes ORT runs in place, as views move nothing in
eager). No library counts FLOPs of an ONNX Runtime graph (onnx has no cost model, and ``onnx.shape_inference``
does not know ORT's contrib and NCHWc operators), so this is written here.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from analysis.breakdown.operators import COMPUTE, ELEMENTWISE, NORM, SOFTMAX

_ITEMSIZE = {"float": 4, "double": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
             "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1}
_MATMULS = {"MatMul", "FusedMatMul", "MatMulNBits", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul"}
_GEMMS = {"Gemm", "FusedGemm"}
_CONVS = {"Conv", "FusedConv", "NhwcConv", "QLinearConv", "ConvInteger"}
# Element-wise nodes that fuse two of the eager operators (a bias add and the activation).
_TWO_OPS = {"BiasGelu", "BiasAdd"}
# ONNX Runtime runs these on the input's buffer (the output aliases it) or reads only the shape: like aten's views,
# they move nothing.
VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size"}


@dataclass
class GraphNode:
    """A node of the optimised graph: its attributes and the shapes and item sizes of its initializer inputs."""
    op_type: str
    attrs: dict = field(default_factory=dict)
    initializers: list = field(default_factory=list)  # [(dims, itemsize)] of inputs that are weights
    inputs: int = 0


def optimised_graph(path: Path, providers: list[str]) -> dict[str, GraphNode]:
    """{node name: GraphNode} of the graph ONNX Runtime runs for ``path`` on ``providers`` (saved by ORT itself
    with the default, full optimisation level the timed sessions use); empty when ORT cannot save it."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "optimised.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(saved)
        try:
            ort.InferenceSession(str(path), options, providers=providers)
            model = onnx.load(str(saved))
        except Exception:  # noqa: BLE001 - without the saved graph the profile's own shapes still count
            return {}
    weights = {t.name: (list(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
               for t in model.graph.initializer}
    return {node.name: GraphNode(op_type=node.op_type,
                                 attrs={a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
                                 initializers=[weights[i] for i in node.input if i in weights],
                                 inputs=len([i for i in node.input if i]))
            for node in model.graph.node}


def profile_tensors(type_shapes) -> list[tuple[list[int], int]]:
    """[(dims, itemsize)] of a profile's ``input_type_shape`` / ``output_type_shape`` list."""
    out = []
    for entry in type_shapes or []:
        for dtype, dims in entry.items():
            out.append((list(dims), _ITEMSIZE.get(dtype, 0)))
    return out


def _numel(dims) -> int:
    return math.prod(int(d) for d in dims)


def node_bytes(op_type: str, inputs, outputs, node: GraphNode | None) -> float:
    """Bytes of the node's tensors: inputs and outputs as profiled, plus weights ORT pre-packed (absent there);
    none for a view."""
    if op_type in VIEWS:
        return 0.0
    listed = [tuple(dims) for dims, _ in inputs]
    total = sum(_numel(dims) * size for dims, size in inputs + outputs)
    for dims, size in (node.initializers if node else []):
        if tuple(dims) in listed:
            listed.remove(tuple(dims))
        else:
            total += _numel(dims) * size
    return float(total)


def _contraction(inputs, node: GraphNode | None) -> int | None:
    """K of a matrix product: the first input's last dimension (second to last when transposed)."""
    if not inputs or not inputs[0][0]:
        return None
    a = inputs[0][0]
    trans = bool((node.attrs if node else {}).get("transA", 0))
    return int(a[-2]) if trans and len(a) >= 2 else int(a[-1])


def _conv_flops(inputs, outputs, node: GraphNode | None) -> float | None:
    """2 * output elements * Cin/groups * kernel, from the weight's shape (profiled, or the graph's)."""
    out = _numel(outputs[0][0])
    weights = [dims for dims, _ in inputs[1:2] if len(dims) >= 3]
    weights = weights or [dims for dims, _ in (node.initializers if node else []) if len(dims) >= 3][:1]
    if not weights:
        return None
    flops = 2.0 * out * _numel(weights[0][1:])
    fused = 0
    if node is not None:
        fused += 1 if node.attrs.get("activation") else 0  # NCHWc Conv / FusedConv with its activation
        fused += 1 if node.op_type in ("Conv", "FusedConv") and node.inputs >= 4 else 0  # ... and a summed input
    return flops + fused * out


def _attention_flops(op_type: str, inputs, outputs) -> float | None:
    """ORT's Attention (input [B, S, H] with packed QKV weights [H, 3H]) or MultiHeadAttention (Q [B, S, D],
    K and V [B, L, D]): the projections and the two products (per-head sizes cancel); the softmax's five FLOPs
    per score need the head count, which is an attribute: not counted."""
    dims = [d for d, _ in inputs]
    if op_type == "Attention" and len(dims) >= 2 and len(dims[0]) == 3 and len(dims[1]) == 2:
        b, s, h = dims[0]
        hidden = dims[1][1] // 3
        return 2.0 * b * s * h * dims[1][1] + 4.0 * b * s * s * hidden
    if op_type == "MultiHeadAttention" and len(dims) >= 3 and all(len(d) == 3 for d in dims[:3]):
        (b, s, d_q), (_, length, _), (_, _, d_v) = dims[:3]
        return 2.0 * b * s * length * (d_q + d_v)
    return None


def node_flops(op_type: str, kind: str, inputs, outputs, node: GraphNode | None) -> float | None:
    """FLOPs of one node by the eager breakdown's conventions; ``None`` where they cannot be counted."""
    if not outputs:
        return None
    out = _numel(outputs[0][0])
    if kind == COMPUTE:
        if op_type in _MATMULS or op_type in _GEMMS:
            k = _contraction(inputs, node)
            return None if k is None else 2.0 * out * k
        if op_type in _CONVS:
            return _conv_flops(inputs, outputs, node)
        if op_type in ("Attention", "MultiHeadAttention"):
            return _attention_flops(op_type, inputs, outputs)
        return None
    if kind == ELEMENTWISE:
        two = op_type in _TWO_OPS or (op_type == "FastGelu" and len(inputs) > 1)
        return float(out) * (2 if two else 1)
    if kind in (NORM, SOFTMAX):
        skip = op_type.startswith("Skip")  # the residual add ORT fused into the norm
        return float(out) * 5 + (out if skip else 0)
    return 0.0  # data movement, bookkeeping and the rest do no FLOPs (eager counts none for them either)
