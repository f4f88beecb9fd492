"""Where the time goes: per-operator runtime by operator class and component, against this machine's roofline.

EfficientViT's first finding is that vision transformers lose their time in memory-bound operators (reshapes,
element-wise functions, normalisation, softmax) more than in FLOPs. ``profile_model`` measures that for a
registry model or variant (``NAME@...``): ``torch.profiler`` over several forwards after warm-up, interleaved
with forwards timed without the profiler; every operator's self time goes to

- an **operator class** (``op_class``): compute, data movement, element-wise, normalisation, softmax,
  token-reduction bookkeeping, other (Python and framework time between operators counts as other);
- a **component** (``models.scopes``): patch embedding, attention, FFN, token reduction, head, or the rest
  (norms and residual adds between them, downsampling, pooling).

A dispatch-level pass counts each operator's FLOPs (``torch.utils.flop_counter``'s formulas) and the bytes its
tensors occupy (inputs + outputs; views move nothing), attributed to the same class and component, so every
(class, component) group has an arithmetic intensity to put on the roofline (``analysis.timing.roofline``).

``python -m analysis.breakdown --models ... --batch 8 --device cpu`` prints the same records.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.device import autocast, synchronize
from models.scopes import ATTENTION, COMPONENTS, FFN, MATCHING, PREFIX, component_hooks, open_scopes, scope

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


# ------------------------------------------------------------------------------------ records
@dataclass
class OpRow:
    """One operator in one component: self time per forward, calls per forward, FLOPs and bytes per forward."""
    model: str
    op: str
    op_class: str
    component: str
    ms: float
    calls: float
    flops: float = 0.0
    bytes: float = 0.0
    shapes: list = field(default_factory=list)  # distinct input shapes seen (first few)
    block: str = ""  # the block (module path) for components marked by module hooks


@dataclass
class Breakdown:
    model: str
    batch: int
    device: str
    precision: str
    engine: str
    weights: str
    ops: list[OpRow]
    profiled_ms: list[float]   # wall ms of each profiled forward
    plain_ms: list[float]      # wall ms of each forward timed without the profiler, interleaved with them
    attributed_ms: float = 0.0  # sum of the operators' self times per forward
    forward_scope_ms: float = 0.0  # the profiler's own total of the forward (its ``vitlab::forward`` range)
    note: str = ""
    trace: str | None = field(default=None, repr=False)  # Chrome trace JSON of one profiled forward

    @property
    def profiled_median_ms(self) -> float:
        return statistics.median(self.profiled_ms)

    @property
    def plain_median_ms(self) -> float:
        return statistics.median(self.plain_ms)

    @property
    def overhead(self) -> float:
        """Profiled / plain forward time: the profiler's own cost (1.0 = none)."""
        return self.profiled_median_ms / self.plain_median_ms

    @property
    def attributed_vs_plain(self) -> float:
        """Attributed time / the forward timed without the profiler: the issue's check wants it within 10 %."""
        return self.attributed_ms / self.plain_median_ms

    def shares(self, by: str = "op_class") -> dict[str, float]:
        """Fraction of the attributed time per operator class (``op_class``) or per ``component``."""
        order = OP_CLASSES if by == "op_class" else COMPONENT_ORDER
        totals = defaultdict(float)
        for row in self.ops:
            totals[getattr(row, by)] += row.ms
        total = sum(totals.values()) or 1.0
        return {k: totals[k] / total for k in order if k in totals} | {
            k: v / total for k, v in totals.items() if k not in order}

    def memory_bound_share(self) -> float:
        """Share of time in EfficientViT's memory-inefficient classes (data movement, element-wise, norm, softmax,
        bookkeeping)."""
        shares = self.shares()
        return sum(shares.get(k, 0.0) for k in MEMORY_CLASSES)

    def groups(self, by: Sequence[str] = ("op_class",)) -> list[dict]:
        """Time, FLOPs and bytes per forward summed over rows with the same ``by`` fields."""
        out: dict[tuple, dict] = {}
        for row in self.ops:
            key = tuple(getattr(row, b) for b in by)
            g = out.setdefault(key, dict(zip(by, key), ms=0.0, calls=0.0, flops=0.0, bytes=0.0))
            g["ms"] += row.ms
            g["calls"] += row.calls
            g["flops"] += row.flops
            g["bytes"] += row.bytes
        return list(out.values())

    def summary(self) -> dict:
        return dict(model=self.model, batch=self.batch, device=self.device, precision=self.precision,
                    engine=self.engine, weights=self.weights, plain_ms=self.plain_median_ms,
                    profiled_ms=self.profiled_median_ms, attributed_ms=self.attributed_ms,
                    profiler_overhead=self.overhead, attributed_vs_plain=self.attributed_vs_plain,
                    memory_bound_share=self.memory_bound_share(), note=self.note)


# ------------------------------------------------------------------------------- profiling
def _event_time_us(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", 0.0) or 0.0)
    return float(event.self_cpu_time_total)


def attribute_events(events, cuda: bool = False) -> tuple[dict[tuple[str, str, str, str], list], float, float]:
    """Self time of every CPU-side event inside ``vitlab::forward`` -> {(op, class, component, block): [us, calls,
    input shapes]}.

    An operator's class is that of the outermost aten operator it runs in (``aten::linear`` and the ``addmm``
    under it are compute; the ``copy_`` under a ``reshape`` is data movement); its component that of the
    innermost component scope; inside a matching scope every operator is bookkeeping. A scope's own self time
    (Python between operators) is ``other``. Returns the groups, the forward's total and the attributed sum (us).
    """
    groups: dict[tuple[str, str, str, str], list] = defaultdict(lambda: [0.0, 0, []])
    forward_total = attributed = 0.0
    for event in events:
        if getattr(event, "device_type", None) is not None and "CPU" not in str(event.device_type):
            continue
        chain, outer_op, node = [], None, event
        while node is not None:
            if node.name.startswith(PREFIX):
                chain.append(node.name[len(PREFIX):])
            elif not chain and node.name.startswith("aten::"):
                outer_op = node.name  # the last aten op met before the first scope is the outermost one
            node = node.cpu_parent
        if FORWARD_SCOPE not in chain:
            continue
        chain.reverse()  # outermost first
        if event.name == PREFIX + FORWARD_SCOPE:
            forward_total += float(event.cpu_time_total if not cuda else event.device_time_total)
        component, matching, block = _component(chain)
        if event.name.startswith(PREFIX):
            op, kind = OVERHEAD_OP, OTHER
        else:
            op = base_name(outer_op or event.name)
            kind = BOOKKEEPING if matching else op_class(outer_op or event.name)
            if outer_op is not None and event.name != outer_op:
                op = f"{op} > {base_name(event.name)}"
        us = _event_time_us(event, cuda)
        attributed += us
        group = groups[(op, kind, component, block)]
        group[0] += us
        if event.name == (outer_op or event.name):
            group[1] += 1
            shapes = getattr(event, "input_shapes", None)
            if shapes and len(group[2]) < 4 and shapes not in group[2]:
                group[2].append(shapes)
    return groups, forward_total, attributed


class _CostMode(TorchDispatchMode):
    """FLOPs (torch.utils.flop_counter's formulas) and bytes (tensor inputs + outputs; views move nothing) of every
    dispatched aten operator, per (class, component) from the open scopes."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import FlopCounterMode

        from analysis.timing.flops import extra_flop_formulas

        self.registry = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()).flop_registry
        self.costs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.outer: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        component, matching, _ = _component(open_scopes())
        # Like the profiler's attribution: a composite operator's class (linear, matmul, reshape) holds for the
        # operators it decomposes into, which are the ones the FLOP formulas know.
        kind = BOOKKEEPING if matching else (self.outer or op_class(str(packet)))
        if packet not in self.registry:
            previous, self.outer = self.outer, kind
            try:
                with self:
                    result = func.decompose(*args, **kwargs)
            finally:
                self.outer = previous
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        flops = 0.0
        if packet in self.registry:
            flops = float(self.registry[packet](*args, **kwargs, out_val=out))
        elif kind in (ELEMENTWISE, NORM, SOFTMAX):  # one operation per output element (norm and softmax: five)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            flops = float(sum(t.numel() for t in outs[:1])) * (1 if kind == ELEMENTWISE else 5)
        moved = 0.0
        if not getattr(func, "is_view", False):
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            moved = float(sum(t.numel() * t.element_size() for t in tensors))
        cost = self.costs[(kind, component)]
        cost[0] += flops
        cost[1] += moved
        return out


def count_costs(forward: Callable[[Any], Any], inputs: Any) -> dict[tuple[str, str], list[float]]:
    """{(class, component): [FLOPs, bytes]} of one forward."""
    mode = _CostMode()
    with torch.inference_mode(), scope(FORWARD_SCOPE), mode:
        forward(inputs)
    return dict(mode.costs)


def quiet_profiler_logs() -> None:
    """Kineto, the profiler's C++ side, writes its own lines to stderr ("USDT: ... profiler_start", and on a machine
    without a GPU "gpuGetDeviceCount failed") below level 6 (its highest, USDT, is 5). It reads the level when the
    process first starts a profiler, so this runs before that; a level the user set is kept."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def profile_runner(name: str, forward: Callable[[Any], Any], inputs: Any, *, device: str = "cpu",
                   precision: str = "fp32", iters: int = 5, warmup: int = 2, weights: str = "",
                   batch: int | None = None, hooked: torch.nn.Module | None = None,
                   keep_trace: bool = True, progress: Callable[[float, str], None] | None = None) -> Breakdown:
    """Profile ``forward(inputs)``: ``warmup`` forwards, then ``iters`` rounds of one plain timed forward and one
    profiled forward. ``hooked`` (a private model copy) gets component scopes from module hooks while profiled."""
    from analysis.timing.harness import PRECISIONS

    dtype = PRECISIONS[precision]
    cuda = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    def run() -> None:
        with torch.inference_mode(), autocast(device, enabled=dtype is not None, dtype=dtype), scope(FORWARD_SCOPE):
            forward(inputs)

    quiet_profiler_logs()
    plain, profiled = [], []
    groups: dict[tuple[str, str, str, str], list] = defaultdict(lambda: [0.0, 0, []])
    attributed_total, scope_total, trace = 0.0, 0.0, None
    # The hooks stay on for the plain forwards too: they are the same forward, so profiled/plain is the
    # profiler's own cost (a scope costs about a microsecond when no profiler listens).
    with component_hooks(hooked) if hooked is not None else _nothing():
        for _ in range(warmup):
            run()
        for i in range(iters):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            plain.append(1000 * (time.perf_counter() - start))
            with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                profiled.append(1000 * (time.perf_counter() - start))
            found, forward_us, attributed = attribute_events(prof.events(), cuda=cuda)
            scope_total += forward_us
            for key, (us, calls, shapes) in found.items():
                g = groups[key]
                g[0] += us
                g[1] += calls
                g[2].extend(s for s in shapes if s not in g[2] and len(g[2]) < 4)
            attributed_total += attributed
            if keep_trace and i == iters - 1:
                trace = _chrome_trace(prof)
            if progress:
                progress((i + 1) / iters, f"{name}: profiled forward {i + 1}/{iters}")
        costs = count_costs(forward, inputs)
    rows = []
    spread = _spread_costs(groups, costs)
    for (op, kind, component, block), (us, calls, shapes) in groups.items():
        flops, moved = spread.get((op, kind, component, block), (0.0, 0.0))
        rows.append(OpRow(model=name, op=op, op_class=kind, component=component, ms=us / 1000 / iters,
                          calls=calls / iters, flops=flops, bytes=moved, shapes=shapes, block=block))
    rows.sort(key=lambda r: -r.ms)
    return Breakdown(model=name, batch=batch or _batch_of(inputs), device=device, precision=precision,
                     engine="eager", weights=weights, ops=rows, profiled_ms=profiled, plain_ms=plain,
                     attributed_ms=attributed_total / 1000 / iters, forward_scope_ms=scope_total / 1000 / iters,
                     trace=trace)


def _spread_costs(groups: dict, costs: dict[tuple[str, str], list[float]]) -> dict[tuple[str, str, str, str], tuple]:
    """Share each (class, component)'s FLOPs and bytes among its operators in proportion to their time (the
    dispatch-level counter does not see the profiler's operator names, only the same class and component)."""
    time_of: dict[tuple[str, str], float] = defaultdict(float)
    for (op, kind, component, _), (us, _, _) in groups.items():
        if op != OVERHEAD_OP:
            time_of[(kind, component)] += us
    out = {}
    for (op, kind, component, block), (us, _, _) in groups.items():
        total = time_of.get((kind, component), 0.0)
        if op == OVERHEAD_OP or total <= 0:
            continue
        flops, moved = costs.get((kind, component), (0.0, 0.0))
        out[(op, kind, component, block)] = (flops * us / total, moved * us / total)
    return out


class _nothing:
    def __enter__(self):
        return 0

    def __exit__(self, *exc):
        return False


def _batch_of(inputs: Any) -> int:
    tensors = [t for t in tree_flatten(inputs)[0] if hasattr(t, "shape")]
    return int(tensors[0].shape[0]) if tensors else 1


def _chrome_trace(prof) -> str:
    import tempfile

    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        return Path(path).read_text()
    finally:
        os.unlink(path)


def profile_model(text: str, *, batch: int = 8, device: str = "cpu", precision: str = "fp32", iters: int = 5,
                  warmup: int = 2, random_weights: bool = True, loaded=None, engine: str = "eager",
                  progress: Callable[[float, str], None] | None = None) -> Breakdown:
    """Profile a registry model or variant (``NAME@key=value``) on random images at ``batch``.

    The model is deep-copied before hooks go on it, so a cached model is never touched. ``engine='onnxruntime'``
    profiles the exported ONNX graph in ONNX Runtime instead (``analysis.timing.onnx_engine``)."""
    from analysis.timing.runners import make_runner
    from models.loading import load_model
    from models.variants import parse_variant

    variant = parse_variant(text)
    loaded = loaded or load_model(variant.model, device=device, random_weights=random_weights)
    if engine == "onnxruntime":
        return profile_onnx(text, loaded, batch=batch, device=device, iters=iters, warmup=warmup, progress=progress)
    if engine != "eager":
        raise ValueError(f"Unknown engine {engine!r}: use eager or onnxruntime.")
    private = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    runner = make_runner(text, device=device, loaded=private)
    inputs = runner.make_inputs(batch)
    return profile_runner(runner.name, runner.forward, inputs, device=device, precision=precision, iters=iters,
                          warmup=warmup, weights=runner.weights, batch=batch, hooked=private.model,
                          progress=progress)


def profile_models(texts: Sequence[str], progress: Callable[[float, str], None] | None = None, **kwargs
                   ) -> list[Breakdown]:
    """``profile_model`` for each name, with one progress bar over all of them."""
    results = []
    for index, text in enumerate(texts):
        def step(fraction: float, message: str, index=index) -> None:
            if progress:
                progress((index + fraction) / len(texts), message)
        results.append(profile_model(text, progress=step, **kwargs))
    return results


# --------------------------------------------------------------------------- comparisons
def reduction_savings(reduced: Breakdown, base: Breakdown) -> list[dict]:
    """Per component: ms per forward in the unreduced model and in the token-reduction variant, and the saving
    (negative = the variant spends more there; its own machinery is all cost)."""
    def per_component(b: Breakdown) -> dict[str, float]:
        totals = defaultdict(float)
        for row in b.ops:
            totals[row.component] += row.ms
        return totals

    a, r = per_component(base), per_component(reduced)
    return [dict(variant=reduced.model, baseline=base.model, batch=reduced.batch, component=c,
                 baseline_ms=a.get(c, 0.0), variant_ms=r.get(c, 0.0), saved_ms=a.get(c, 0.0) - r.get(c, 0.0))
            for c in COMPONENT_ORDER if c in a or c in r]


def block_shares(b: Breakdown) -> list[dict]:
    """Per block: ms per forward of its attention and its FFN, each split into compute and memory-bound time
    (EfficientViT: MHSA is more memory-bound than FFN). Only blocks whose modules ran under hooks have a name."""
    out: dict[str, dict] = {}
    for row in b.ops:
        if not row.block or row.component not in (ATTENTION, FFN):
            continue
        entry = out.setdefault(row.block, {"model": b.model, "batch": b.batch, "block": row.block})
        part = "compute" if row.op_class == COMPUTE else "memory-bound" if row.op_class in MEMORY_CLASSES else "other"
        key = f"{row.component} {part}"
        entry[key] = entry.get(key, 0.0) + row.ms
    natural = lambda name: [int(p) if p.isdigit() else p for p in name.split(".")]  # noqa: E731
    return [out[k] for k in sorted(out, key=natural)]


def baseline_of(text: str) -> str | None:
    """The unreduced model a token-reduction variant is compared with (the same registry model, no settings)."""
    name, _, settings = text.partition("@")
    return name if settings else None


def ops_table(results: Sequence[Breakdown]):
    import pandas as pd

    rows = []
    for b in results:
        for row in b.ops:
            record = asdict(row)
            record["shapes"] = json.dumps(record["shapes"])
            record.update(batch=b.batch, device=b.device, precision=b.precision, engine=b.engine, weights=b.weights)
            rows.append(record)
    return pd.DataFrame(rows)


def share_table(results: Sequence[Breakdown], by: str = "op_class"):
    import pandas as pd

    return pd.DataFrame([dict(model=b.model, batch=b.batch, engine=b.engine, **{k: v for k, v in b.shares(by).items()})
                         for b in results]).fillna(0.0)


def to_json(results: Sequence[Breakdown], roof=None) -> dict:
    from models.device import hardware_info

    return {"hardware": hardware_info(), "roofline": None if roof is None else asdict(roof),
            "models": [dict(b.summary(), shares=b.shares(), components=b.shares("component"),
                            ops=[asdict(r) for r in b.ops]) for b in results]}


# ------------------------------------------------------------------ ONNX Runtime as the engine
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
    from models.scopes import EMBEDDING, HEAD

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


def profile_onnx(text: str, loaded, *, batch: int, device: str = "cpu", iters: int = 5, warmup: int = 2,
                 progress: Callable[[float, str], None] | None = None):
    """``analysis.breakdown.Breakdown`` of the exported graph in ONNX Runtime: its own per-node profile (kernel
    time per node) by operator class and component, interleaved with unprofiled runs of the same session."""
    from analysis.timing.onnx_engine import onnx_runner, session
    from analysis.timing.runners import make_runner

    runner = onnx_runner(make_runner(text, device=device, loaded=loaded), batch, device)
    images = runner.make_inputs(batch)
    path = Path(runner.onnx_file)
    plain_sess = session(path, device)
    prof_sess = session(path, device, profile=True)
    feed_name = plain_sess.get_inputs()[0].name
    for _ in range(warmup):
        plain_sess.run(None, {feed_name: images})
        prof_sess.run(None, {feed_name: images})
    plain, profiled = [], []
    for i in range(iters):
        for sess, times in ((plain_sess, plain), (prof_sess, profiled)):
            start = time.perf_counter()
            sess.run(None, {feed_name: images})
            times.append(1000 * (time.perf_counter() - start))
        if progress:
            progress((i + 1) / iters, f"{runner.name}: run {i + 1}/{iters}")
    trace_file = prof_sess.end_profiling()
    events = json.loads(Path(trace_file).read_text())
    Path(trace_file).unlink(missing_ok=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed_runs = runs[-iters:]
    start_us = timed_runs[0]["ts"] if timed_runs else 0
    groups: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start_us:
            continue
        op_type = e.get("args", {}).get("op_name", "")
        node = e["name"][: -len("_kernel_time")]
        g = groups[(op_type, ort_op_class(op_type), ort_component(node))]
        g[0] += e["dur"]
        g[1] += 1
    rows = [OpRow(model=runner.name, op=op, op_class=kind, component=component, ms=us / 1000 / iters,
                  calls=calls / iters) for (op, kind, component), (us, calls) in groups.items()]
    rows.sort(key=lambda r: -r.ms)
    attributed = sum(r.ms for r in rows)
    run_ms = statistics.mean(r["dur"] / 1000 for r in timed_runs) if timed_runs else attributed
    return Breakdown(model=runner.name, batch=batch, device=device, precision="fp32", engine="onnxruntime",
                     weights=runner.weights, ops=rows, profiled_ms=profiled, plain_ms=plain,
                     attributed_ms=attributed, forward_scope_ms=run_ms,
                     note=f"ONNX Runtime {_ort_version()}, max |ORT - eager| = {runner.max_abs_diff:.1e}; node "
                          "times exclude the session's own work between nodes",
                     trace=json.dumps(events))


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


# --------------------------------------------------------------------------------------- CLI
def format_report(b: Breakdown, roof=None) -> str:
    lines = [f"{b.model}  batch {b.batch}  {b.device} {b.precision}  engine {b.engine}  weights: {b.weights}"]
    lines.append("  operator class      " + "  ".join(f"{k}: {v:5.1%}" for k, v in b.shares().items()))
    lines.append("  component           " + "  ".join(f"{k}: {v:5.1%}" for k, v in b.shares("component").items()))
    lines.append(f"  memory-bound share (data movement, element-wise, norm, softmax, bookkeeping): "
                 f"{b.memory_bound_share():.1%}")
    if roof is not None:
        from analysis.timing.roofline import below_roof_share

        lines.append(f"  time below the bandwidth roof ({roof.ridge:.1f} FLOP/byte): {below_roof_share(b, roof):.1%}")
    lines.append(f"  plain {b.plain_median_ms:.2f} ms, profiled {b.profiled_median_ms:.2f} ms per forward "
                 f"(profiled/plain {b.overhead:.2f}); attributed {b.attributed_ms:.2f} ms = "
                 f"{b.attributed_vs_plain:.2f}x the plain time")
    if b.note:
        lines.append(f"  note: {b.note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.breakdown",
                                description="Where the time goes: runtime per operator class and component.")
    p.add_argument("--models", nargs="+", required=True, help="registry names or variants NAME@key=value")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--engine", choices=["eager", "onnxruntime"], default="eager")
    p.add_argument("--iters", type=int, default=5, help="profiled forwards (each interleaved with a plain one)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads for torch (and ONNX Runtime)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the machine's limits")
    p.add_argument("--out", help="folder for ops.csv, breakdown.json and one Chrome trace per model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from models.checkpoints import CheckpointError, WeightsNotFoundError

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    roof = None
    if not args.no_roofline:
        from analysis.timing.roofline import machine_roofline

        roof = machine_roofline(args.device, args.precision)
        print(f"roofline {roof.device} {roof.dtype}: {roof.peak_gflops:.1f} GFLOP/s, {roof.bandwidth_gbs:.1f} GB/s, "
              f"ridge {roof.ridge:.1f} FLOP/byte ({'cached' if roof.cached else 'measured now'})")
    results = []
    for text in args.models:
        try:
            b = profile_model(text, batch=args.batch, device=args.device, precision=args.precision,
                              iters=args.iters, warmup=args.warmup, engine=args.engine)
        except (KeyError, ValueError, WeightsNotFoundError, CheckpointError, RuntimeError) as exc:
            print(f"error: {text}: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 2
        results.append(b)
        print(format_report(b, roof))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ops_table(results).to_csv(out / "ops.csv", index=False)
        (out / "breakdown.json").write_text(json.dumps(to_json(results, roof), indent=1))
        for b in results:
            if b.trace:
                (out / f"trace_{b.model.replace('@', '_').replace('=', '').replace(',', '_')}.json").write_text(b.trace)
        print(f"wrote {out}/ops.csv, breakdown.json and the traces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
