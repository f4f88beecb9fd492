"""Profiling in eager PyTorch: ``torch.profiler`` over several forwards, interleaved with forwards timed without
it, every operator's self time attributed to its class and component; a dispatch-level pass counts FLOPs and
bytes. ``profile_model`` is the entry for every engine of ``analysis.timing.engines`` (each record names its
profiler: ``profile_eager`` here, ``analysis.breakdown.compiled``, ``analysis.breakdown.onnx_runtime``)."""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from analysis.breakdown.operators import (BOOKKEEPING, ELEMENTWISE, FORWARD_SCOPE, NORM, OTHER, OVERHEAD_OP, SOFTMAX,
                                          _component, base_name, op_class)
from analysis.breakdown.records import Breakdown, OpRow
from analysis.timing.flops import extra_flop_formulas
from analysis.timing.engines import EAGER, EngineRefused, engine as engine_named
from analysis.timing.harness import PRECISIONS
from analysis.timing.runners import ModelOptions, make_runner, prepared
from models.device import autocast, synchronize
from models.loading import load_model
from models.scopes import PREFIX, component_hooks, open_scopes, scope
from models.variants import parse_variant


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
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        return Path(path).read_text()
    finally:
        os.unlink(path)


def profile_model(text: str, *, batch: int = 8, device: str = "cpu", precision: str = "fp32", iters: int = 5,
                  warmup: int = 2, random_weights: bool = True, loaded=None, engine: str = EAGER.key,
                  options: ModelOptions = ModelOptions(),
                  progress: Callable[[float, str], None] | None = None) -> Breakdown:
    """Profile a registry model or variant (``NAME@key=value``) on random images at ``batch`` in ``engine`` (a key of
    ``analysis.timing.engines.ENGINES``, whose record names the profiler), with ``options`` (BatchNorm folded:
    the deployment form) applied to a private copy first. A cached model is never touched."""
    chosen = engine_named(engine)
    if chosen.fp32_only and precision != "fp32":
        raise EngineRefused(f"{chosen.label} runs the fp32 model here, not {precision}.")
    variant = parse_variant(text)
    loaded = prepared(loaded or load_model(variant.model, device=device, random_weights=random_weights), options)
    extra = {} if chosen.fp32_only else {"precision": precision}
    b = chosen.profiler()(text, loaded, batch=batch, device=device, iters=iters, warmup=warmup, progress=progress,
                          **extra)
    if options.any:
        b.note = "; ".join(filter(None, [options.describe(), b.note]))
    return b


def profile_eager(text: str, loaded, *, batch: int = 8, device: str = "cpu", precision: str = "fp32",
                  iters: int = 5, warmup: int = 2, progress: Callable[[float, str], None] | None = None) -> Breakdown:
    """The eager profile (the ``eager`` record's profiler): the model is deep-copied before hooks go on it."""
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
