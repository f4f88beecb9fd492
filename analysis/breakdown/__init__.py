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

The profiler's own cost per recorded event is calibrated on this machine and taken out of the operators' self
times (``attribution``), so the attributed time adds up to the forward timed without the profiler:
``Breakdown.attributed_vs_plain`` within 10 % (``adds_up``) on a quiet machine, and a warning where it is not.

``python -m analysis.breakdown --models ... --batch 8 --device cpu`` prints the same records.

The package: ``operators`` (the classes and components of operators), ``records`` (``OpRow``, ``Breakdown``),
``attribution`` (the profiler's cost per event, calibrated and taken out),
``eager`` (the torch profiler, ``profile_model`` for every engine of ``analysis.timing.engines``), ``compiled``
(the torch.compile'd forward, fused kernels classed by name), ``onnx_runtime`` (ONNX Runtime's own profile) and
``onnx_costs`` (FLOPs and bytes of its nodes), ``tables`` (shares, savings, per-operator and per-component
tables, memory-bound time per engine), ``figures`` (plotly), ``cli``.
"""
from analysis.breakdown.attribution import Calibration, attribution_warning, deduct_per_event_cost
from analysis.breakdown.cli import build_parser, format_report, main
from analysis.breakdown.compiled import fused_kernel_class, fused_kernel_ops, profile_compiled
from analysis.breakdown.eager import (attribute_events, count_costs, profile_eager, profile_model, profile_models,
                                      profile_runner, quiet_profiler_logs)
from analysis.breakdown.onnx_runtime import profile_onnx
from analysis.breakdown.operators import (BOOKKEEPING, COMPONENT_ORDER, COMPUTE, DATA, ELEMENTWISE, FORWARD_SCOPE,
                                          MEMORY_CLASSES, NORM, OP_CLASSES, OTHER, OVERHEAD_OP, REST, SOFTMAX,
                                          base_name, block_of, does_no_work, op_class, ort_component, ort_op_class)
from analysis.breakdown.records import TOLERANCE, Breakdown, OpRow
from analysis.breakdown.tables import (attribution_table, baseline_of, block_shares, component_table,
                                       engine_comparison, ops_table, reduction_savings, share_table, summary_table,
                                       to_json)

__all__ = ["BOOKKEEPING", "COMPONENT_ORDER", "COMPUTE", "DATA", "ELEMENTWISE", "FORWARD_SCOPE", "MEMORY_CLASSES",
           "NORM", "OP_CLASSES", "OTHER", "OVERHEAD_OP", "REST", "SOFTMAX", "TOLERANCE", "Breakdown", "Calibration",
           "OpRow", "attribute_events", "attribution_table", "attribution_warning", "base_name", "baseline_of",
           "block_of", "block_shares", "build_parser", "component_table", "count_costs", "deduct_per_event_cost",
           "does_no_work", "engine_comparison", "format_report", "fused_kernel_class", "fused_kernel_ops", "main",
           "op_class", "ops_table", "ort_component", "ort_op_class", "profile_compiled", "profile_eager",
           "profile_model", "profile_models", "profile_onnx", "profile_runner", "quiet_profiler_logs",
           "reduction_savings", "share_table", "summary_table", "to_json"]
