"""Operator classes: which class (compute, data movement, element-wise, normalisation, softmax,
token-reduction bookkeeping, other) and which component a profiled operator belongs to, for aten operators
(``op_class``) and for ONNX Runtime's nodes (``ort_op_class``, ``ort_component``)."""
from __future__ import annotations

from typing import Sequence

import torch

from models.scopes import ATTENTION, COMPONENTS, EMBEDDING, FFN, HEAD, MATCHING

COMPUTE, DATA, ELEMENTWISE, NORM, SOFTMAX, BOOKKEEPING, OTHER = (
    "compute", "data movement", "element-wise", "normalisation", "softmax", "token-reduction bookkeeping", "other")
OP_CLASSES = (COMPUTE, DATA, ELEMENTWISE, NORM, SOFTMAX, BOOKKEEPING, OTHER)
# EfficientViT's memory-inefficient operators: everything but the dense products (and the rest, "other").
MEMORY_CLASSES = (DATA, ELEMENTWISE, NORM, SOFTMAX, BOOKKEEPING)
REST = "rest (norms, residuals, pooling)"
UNKNOWN = "unknown"  # the component of an ONNX Runtime node whose name carries no module path
COMPONENT_ORDER = COMPONENTS + (REST, UNKNOWN)
FORWARD_SCOPE = "forward"
OVERHEAD_OP = "(Python / framework between operators)"

_COMPUTE = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "conv1d", "conv2d", "conv3d", "convolution",
            "_convolution", "mkldnn_convolution", "conv_depthwise2d", "_conv_depthwise2d", "einsum", "addbmm",
            "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_cudnn_attention", "cudnn_convolution", "mkldnn_linear", "_addmm_activation"}
_DATA = {"reshape", "view", "_unsafe_view", "clone", "copy_", "contiguous", "permute", "transpose", "t", "cat",
         "stack", "index", "index_select", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
         "scatter_reduce", "index_put", "index_put_", "index_add", "index_copy", "expand", "flatten", "unflatten",
         "roll", "pad", "constant_pad_nd", "slice", "select", "split", "split_with_sizes", "chunk", "unbind",
         "narrow", "to", "_to_copy", "repeat", "unfold", "as_strided", "squeeze", "unsqueeze", "empty",
         "empty_like", "zeros", "zeros_like", "ones", "ones_like", "new_zeros", "new_ones", "new_empty", "new_full",
         "full", "fill_", "zero_", "masked_select", "masked_fill", "masked_fill_", "movedim", "swapaxes",
         "alias", "detach", "lift_fresh", "repeat_interleave", "resize_", "pixel_shuffle", "flip", "tile",
         "diagonal", "expand_as", "view_as", "reshape_as", "type_as", "arange", "eye", "col2im", "im2col",
         "channel_shuffle", "_reshape_alias", "unsafe_split", "tensor_split", "hsplit", "vsplit"}
_ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "gelu", "relu", "relu_", "hardswish",
                "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_", "silu", "silu_", "tanh", "exp",
                "exp_", "log", "clamp", "clamp_", "clamp_min", "where", "neg", "rsub", "pow", "sqrt", "rsqrt",
                "erf", "abs", "reciprocal", "log_sigmoid_forward", "logsigmoid", "_log_softmax_backward_data",
                "maximum", "minimum", "hardtanh", "hardtanh_", "leaky_relu", "elu", "softplus", "mish", "addcmul",
                "lerp", "eq", "ne", "gt", "lt", "ge", "le", "logical_and", "logical_or", "logical_not", "floor",
                "ceil", "round", "sign", "dropout", "square"}
_NORM = {"layer_norm", "native_layer_norm", "batch_norm", "_batch_norm_impl_index", "native_batch_norm",
         "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "group_norm", "native_group_norm",
         "instance_norm", "rms_norm", "_fused_rms_norm", "normalize"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_BOOKKEEPING = {"topk", "sort", "argsort", "argmax", "argmin", "max", "min", "kthvalue", "msort", "unique",
                "cumsum", "nonzero", "searchsorted", "multinomial"}


def base_name(op: str) -> str:
    """``aten::addmm`` / ``aten.addmm.default`` -> ``addmm``."""
    name = op.split("::", 1)[-1]
    if name.startswith("aten."):
        name = name[5:]
    return name.split(".", 1)[0]


# Operators that do no arithmetic and move no data though torch does not mark them as views: a fresh
# uninitialised buffer, a view under another name.
_NO_WORK = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "resolve_neg"}


def does_no_work(op: str) -> bool:
    """Whether an aten operator computes nothing and moves nothing: a view (any overload torch marks ``is_view``:
    ``view``, ``t``, ``transpose``, ``as_strided``, ``expand``, ...) or an allocation without a fill. A composite
    such as ``reshape`` that copies when it must does so in a child operator (``clone``, ``copy_``)."""
    name = base_name(op)
    if name in _NO_WORK:
        return True
    packet = getattr(torch.ops.aten, name, None)
    try:
        return packet is not None and any(getattr(packet, o).is_view for o in packet.overloads())
    except (AttributeError, RuntimeError):
        return False


def op_class(op: str) -> str:
    """The operator class of an aten operator name (any spelling)."""
    name = base_name(op)
    for members, kind in ((_COMPUTE, COMPUTE), (_SOFTMAX, SOFTMAX), (_NORM, NORM), (_BOOKKEEPING, BOOKKEEPING),
                          (_DATA, DATA), (_ELEMENTWISE, ELEMENTWISE)):
        if name in members:
            return kind
    return OTHER


def _component(scopes: Sequence[str]) -> tuple[str, bool, str]:
    """(component, inside a matching scope, block) of the innermost component scope. Scopes opened by module
    hooks carry the module's path (``attention/blocks.3.attn``), from which the block is read."""
    for name in reversed(scopes):
        if name != FORWARD_SCOPE:
            component, _, detail = name.partition("/")
            block = "" if name == MATCHING else block_of(detail)
            return component, any(s == MATCHING for s in scopes), block
    return REST, False, ""


def block_of(path: str) -> str:
    """The block a module path lies in: ``stages.0.blocks.1.mixer.m`` -> ``stages.0.blocks.1``."""
    parts = path.split(".")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ("blocks", "layers", "transformer") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ""


# ------------------------------------------------------------------ ONNX Runtime's nodes
# Each ONNX / ONNX Runtime op type (standard ONNX, ORT's contrib fusions in com.microsoft, its NCHWc layout ops)
# is classed as the aten operator it computes, so both engines share one set of classes by construction: a
# fused node by its principal operator (FusedMatMul and Gemm compute, BiasGelu element-wise,
# SkipLayerNormalization a norm). Reductions and pooling stay "other", as aten's mean and pooling do.
_ORT_AS_ATEN = {
    # compute
    "MatMul": "matmul", "FusedMatMul": "matmul", "MatMulNBits": "matmul", "MatMulInteger": "matmul",
    "QLinearMatMul": "matmul", "MatMulIntegerToFloat": "matmul", "DynamicQuantizeMatMul": "matmul",
    "Gemm": "addmm", "FusedGemm": "addmm", "Conv": "convolution", "FusedConv": "convolution",
    "NhwcConv": "convolution", "QLinearConv": "convolution", "ConvInteger": "convolution",
    "ConvTranspose": "convolution", "Einsum": "einsum", "Attention": "scaled_dot_product_attention",
    "MultiHeadAttention": "scaled_dot_product_attention", "GroupQueryAttention": "scaled_dot_product_attention",
    # data movement
    "Reshape": "reshape", "Transpose": "permute", "Concat": "cat", "Gather": "index_select",
    "GatherElements": "gather", "GatherND": "index", "Slice": "slice", "Split": "split", "Squeeze": "squeeze",
    "Unsqueeze": "unsqueeze", "Expand": "expand", "Flatten": "flatten", "Pad": "constant_pad_nd", "Tile": "tile",
    "ScatterND": "index_put", "ScatterElements": "scatter", "Identity": "alias", "Cast": "_to_copy",
    "ConstantOfShape": "full", "Constant": "lift_fresh", "Range": "arange", "DepthToSpace": "pixel_shuffle",
    "ReorderInput": "contiguous", "ReorderOutput": "contiguous",  # NCHWc layout changes: copies
    "Shape": "alias", "Size": "alias",  # read a tensor's metadata, like a view
    # element-wise
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Relu": "relu", "Gelu": "gelu", "FastGelu": "gelu",
    "BiasGelu": "gelu", "QuickGelu": "gelu", "BiasAdd": "add", "HardSwish": "hardswish",
    "HardSigmoid": "hardsigmoid", "Sigmoid": "sigmoid", "Erf": "erf", "Tanh": "tanh", "Exp": "exp",
    "Sqrt": "sqrt", "Pow": "pow", "Clip": "clamp", "Where": "where", "Neg": "neg", "Equal": "eq", "Less": "lt",
    "Greater": "gt", "LessOrEqual": "le", "GreaterOrEqual": "ge", "Not": "logical_not", "And": "logical_and",
    "Or": "logical_or", "Max": "maximum", "Min": "minimum", "Mish": "mish", "Abs": "abs", "Log": "log",
    "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil", "Round": "round", "Sign": "sign",
    "LeakyRelu": "leaky_relu", "Elu": "elu", "Softplus": "softplus", "Dropout": "dropout", "Sum": "add",
    # normalisation
    "LayerNormalization": "layer_norm", "SkipLayerNormalization": "layer_norm",
    "SimplifiedLayerNormalization": "rms_norm", "SkipSimplifiedLayerNormalization": "rms_norm",
    "BatchNormalization": "batch_norm", "InstanceNormalization": "instance_norm",
    "GroupNormalization": "group_norm", "GroupNorm": "group_norm", "LpNormalization": "normalize",
    # softmax
    "Softmax": "softmax", "LogSoftmax": "log_softmax", "BiasSoftmax": "softmax",
    # bookkeeping
    "TopK": "topk", "ArgMax": "argmax", "ArgMin": "argmin", "CumSum": "cumsum", "NonZero": "nonzero",
    "Unique": "unique",
    # the rest: reductions, pooling, resizing, remainders (aten's counterparts are "other" too)
    "ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax", "ReduceMin": "amin",
    "GlobalAveragePool": "adaptive_avg_pool2d", "AveragePool": "avg_pool2d", "MaxPool": "max_pool2d",
    "GlobalMaxPool": "adaptive_max_pool2d", "Resize": "upsample_bilinear2d", "Mod": "remainder",
}
ORT_OP_TYPES = frozenset(_ORT_AS_ATEN)


def ort_op_class(op_type: str) -> str:
    """The class of an ONNX Runtime node's op type: that of the aten operator it computes; an op type not in the
    table is "other" (``profile_onnx`` names it in its note)."""
    aten = _ORT_AS_ATEN.get(op_type)
    return op_class(aten) if aten else OTHER


def ort_module_path(node_name: str) -> str:
    """The module path in an exported node's name: ``/model/stages/stages.0/blocks/blocks.1/mixer/m/MatMul`` ->
    ``stages.0.blocks.1.mixer.m`` (module names are lower case, op names not; the exporter names a container's child by its dotted path from the container;
    the first level, ``model``, is the exporter's wrapper)."""
    segments = [s for s in node_name.split("/") if s]
    if segments[:1] == ["model"]:
        segments = segments[1:]
    parts, last = [], None
    for segment in segments:
        if segment[:1].isupper():  # the exporter's op name (``MatMul``, ``Conv_output_0_nchwc``): modules end
            break
        if last is not None and segment.startswith(last + "."):
            parts.append(segment[len(last) + 1:])
        else:
            parts.append(segment)
        last = segment
    return ".".join(parts)


def ort_component(node_name: str) -> str:
    """The component of an exported node from the module path in its name (``/blocks.0/attn/qkv/MatMul``);
    ``unknown`` for a node ONNX Runtime made without one (a fusion or layout change named ``Gelu_token_3``)."""
    if "/" not in node_name:
        return UNKNOWN
    parts = [p.split(".")[0] for p in node_name.replace("::", "/").split("/") if p]
    lowered = [p.lower() for p in parts]
    if any(p in ("patch_embed", "stem", "conv_stem") for p in lowered[:3]):
        return EMBEDDING
    if any(p in ("attn", "mixer", "attention", "transformer_attn") for p in lowered):
        return ATTENTION
    if any(p in ("mlp", "ffn", "ffn0", "ffn1") for p in lowered):
        return FFN
    if any(p in ("head", "fc_norm", "conv_head", "classifier", "final_conv") for p in lowered[:3]):
        return HEAD
    return REST
