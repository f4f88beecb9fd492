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
COMPONENT_ORDER = COMPONENTS + (REST,)
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
_ORT_CLASSES = {
    "compute": {"MatMul", "Gemm", "Conv", "FusedConv", "FusedMatMul", "MatMulNBits", "QLinearConv", "ConvTranspose",
                "Attention", "MultiHeadAttention", "NhwcConv", "FusedGemm", "QuickGelu_FusedMatMul"},
    "data movement": {"Reshape", "Transpose", "Concat", "Gather", "GatherElements", "GatherND", "Slice", "Split",
                      "Squeeze", "Unsqueeze", "Expand", "Flatten", "Pad", "Tile", "ScatterND", "ScatterElements",
                      "Identity", "Cast", "Shape", "ConstantOfShape", "Range", "ReorderInput", "ReorderOutput",
                      "DepthToSpace", "SpaceToDepth", "Trilu"},
    "element-wise": {"Add", "Sub", "Mul", "Div", "Relu", "Gelu", "FastGelu", "BiasGelu", "HardSwish", "HardSigmoid",
                     "Sigmoid", "Erf", "Tanh", "Exp", "Sqrt", "Pow", "Clip", "Where", "Neg", "Equal", "Less",
                     "Greater", "Not", "And", "Max", "Min", "QuickGelu", "Silu", "Mish", "Abs", "Log", "Reciprocal"},
    "normalisation": {"LayerNormalization", "SkipLayerNormalization", "BatchNormalization", "SimplifiedLayerNormalization",
                      "GroupNorm", "InstanceNormalization", "SkipSimplifiedLayerNormalization"},
    "softmax": {"Softmax", "LogSoftmax"},
    "token-reduction bookkeeping": {"TopK", "ArgMax", "ArgMin", "CumSum", "NonZero"},
}


def ort_op_class(op_type: str) -> str:
    for kind, members in _ORT_CLASSES.items():
        if op_type in members:
            return kind
    return "other"


def ort_component(node_name: str) -> str:
    """The component of an exported node from the module path in its name (``/blocks.0/attn/qkv/MatMul``)."""
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
