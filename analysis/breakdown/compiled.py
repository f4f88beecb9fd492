"""Profiling the compiled forward (torch.compile, inductor): ``torch.profiler`` over the compiled forward, interleaved
with plain calls of it, as the eager profile does (``analysis.breakdown.eager.profile_runner``).

Inductor runs a forward as its own fused kernels (``cpp_fused_*`` on CPU, recorded because the engine compiles with
``cpp.enable_kernel_profile``; ``triton_*`` on CUDA) and calls the dense products as extern aten kernels
(``aten::addmm``, ``aten::convolution``, ...), which keep their classes. A fused kernel is classed by the aten
operators its name lists (``cpp_fused__softmax_mul_2`` -> softmax): the most specific class among them wins.
Module hooks do not survive compilation, so every operator's component is unknown ("whole forward"), never guessed.
FLOPs and bytes are counted on the eager forward (the same math) per class and spread over that class's
operators by time; fusion moves fewer bytes than that count.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any, Callable, Sequence

from analysis.breakdown.eager import count_costs, profile_runner
from analysis.breakdown.operators import (BOOKKEEPING, COMPUTE, DATA, ELEMENTWISE, NORM, OTHER, OVERHEAD_OP, SOFTMAX,
                                          op_class)
from analysis.breakdown.records import Breakdown, OpRow
from analysis.timing.engines import COMPILED
from analysis.timing.harness import Runner
from analysis.timing.runners import make_runner

WHOLE_FORWARD = "whole forward (components unknown under torch.compile)"
FUSED_NOTE = ("torch.compile (inductor): fused kernels classed by the ops their names list (softmax > normalisation "
              "> bookkeeping > element-wise > other > data movement; a kernel listing only dense products copies "
              "their operands, which run as extern aten kernels and keep their class); components unknown (module "
              "hooks do not survive compilation): whole forward; FLOPs and bytes counted on the eager forward (same "
              "math) per class, so fused kernels move fewer bytes than counted")

# inductor's kernel names: [graph_N_]cpp_fused_<ops>_<index> (CPU), triton_{poi,red,per,tem}_fused_<ops>_<index>
_FUSED = re.compile(r"^(?:graph_\d+_)?(?P<kind>cpp|triton_[a-z]+)_fused_(?P<ops>.+?)(?:_\d+)?$")
# the most specific class a fused kernel's listed operators have wins; OTHER: an operator no class lists (mean)
_PRECEDENCE = (SOFTMAX, NORM, BOOKKEEPING, ELEMENTWISE, OTHER, DATA)
# the compiled region's own framework events, named with graph ids and hashes: one name each
_FRAMEWORK = ((re.compile(r"^## Call CompiledFxGraph \w+ ##$"), "Call CompiledFxGraph"),
              (re.compile(r"^Torch-Compiled Region: [\d/]+$"), "Torch-Compiled Region"))


def fused_kernel_ops(name: str) -> list[str] | None:
    """The aten operators an inductor kernel's name lists (``graph_0_cpp_fused__softmax_mul_2`` -> ``['_softmax',
    'mul']``), longest known operator name first; None where ``name`` is no fused kernel."""
    match = _FUSED.match(name)
    if not match:
        return None
    parts, ops, i = match.group("ops").split("_"), [], 0
    while i < len(parts):
        for j in range(len(parts), i, -1):  # operator names hold underscores: the longest one known wins
            candidate = "_".join(parts[i:j])
            if op_class(candidate) != OTHER:
                ops.append(candidate)
                i = j
                break
        else:
            if parts[i]:
                ops.append(parts[i])
            i += 1
    return ops


def fused_kernel_class(name: str) -> str | None:
    """The class of an inductor kernel by the operators its name lists; None where ``name`` is no fused kernel.
    Triton templates (``triton_tem_fused_mm_...``) run the product itself: compute."""
    ops = fused_kernel_ops(name)
    if ops is None:
        return None
    if _FUSED.match(name).group("kind") == "triton_tem":
        return COMPUTE
    kinds = {op_class(op) for op in ops} - {COMPUTE}
    return next((k for k in _PRECEDENCE if k in kinds), DATA)


def _renamed(op: str) -> tuple[str, str | None]:
    """(shown name, class or None to keep) of a profiled operator under compile."""
    outer, sep, inner = op.partition(" > ")
    for pattern, name in _FRAMEWORK:
        if pattern.match(outer):
            return name + sep + inner, None
    return op, fused_kernel_class(outer)


def compiled_rows(rows: Sequence[OpRow], costs: dict[tuple[str, str], Sequence[float]]) -> list[OpRow]:
    """The profile's rows with fused kernels classed by name, framework events named without hashes, every
    component the whole forward, and the eager forward's FLOPs and bytes per class spread over each class's
    operators by time. ``costs``: ``count_costs`` of the eager forward ({(class, component): [FLOPs, bytes]})."""
    merged: dict[tuple, OpRow] = {}
    for row in rows:
        op, kind = _renamed(row.op)
        key = (op, kind or row.op_class)
        if key in merged:
            m = merged[key]
            merged[key] = dataclasses.replace(m, ms=m.ms + row.ms, calls=m.calls + row.calls,
                                              shapes=m.shapes + [s for s in row.shapes if s not in m.shapes][:4])
        else:
            merged[key] = dataclasses.replace(row, op=op, op_class=key[1], component=WHOLE_FORWARD, block="",
                                              flops=0.0, bytes=0.0)
    per_class: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (kind, _), (flops, moved) in costs.items():
        per_class[kind][0] += flops
        per_class[kind][1] += moved
    time_of: dict[str, float] = defaultdict(float)
    for row in merged.values():
        if row.op != OVERHEAD_OP:
            time_of[row.op_class] += row.ms
    out = []
    for row in merged.values():
        total = time_of.get(row.op_class, 0.0)
        if row.op != OVERHEAD_OP and total > 0:
            flops, moved = per_class.get(row.op_class, (0.0, 0.0))
            row = dataclasses.replace(row, flops=flops * row.ms / total, bytes=moved * row.ms / total)
        out.append(row)
    return sorted(out, key=lambda r: -r.ms)


def profile_compiled_runner(eager: Runner, batch: int, *, device: str = "cpu", precision: str = "fp32",
                            iters: int = 5, warmup: int = 2, compiled: Runner | None = None,
                            progress: Callable[[float, str], None] | None = None) -> Breakdown:
    """Profile ``eager``'s forward compiled (proved equal to eager first; ``EngineRefused`` otherwise), or the
    ``compiled`` runner the engine already made of it."""
    if progress and compiled is None:
        progress(0.0, f"{eager.name}: compiling and checking against eager")
    runner = compiled or COMPILED.runner(eager, batch, device)
    inputs = eager.make_inputs(batch)
    b = profile_runner(eager.name, runner.forward, inputs, device=device, precision=precision, iters=iters,
                       warmup=max(1, warmup), weights=eager.weights, batch=batch, progress=progress)
    rows = compiled_rows(b.ops, count_costs(eager.forward, inputs))
    note = f"{FUSED_NOTE}; max |compiled - eager| = {runner.max_abs_diff:.1e}"
    return dataclasses.replace(b, ops=rows, engine=COMPILED.key, note="; ".join(filter(None, [b.note, note])))


def profile_compiled(text: str, loaded: Any, *, batch: int, device: str = "cpu", precision: str = "fp32",
                     iters: int = 5, warmup: int = 2,
                     progress: Callable[[float, str], None] | None = None) -> Breakdown:
    """``Breakdown`` of a registry model or variant compiled with torch.compile (a private copy; the loaded model is
    never touched), at ``batch`` on random inputs."""
    return profile_compiled_runner(make_runner(text, device=device, loaded=loaded), batch, device=device,
                                   precision=precision, iters=iters, warmup=warmup, progress=progress)
