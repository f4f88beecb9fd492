"""Profiling in eager PyTorch: ``torch.profiler`` over several forwards, interleaved with forwards timed without
it, every operator's self time attributed to its class and component; a dispatch-level pass counts FLOPs and
bytes. ``profile_model`` is the entry for every engine of ``analysis.timing.engines`` (each record names its
profiler: ``profile_eager`` here, ``analysis.breakdown.compiled``, ``analysis.breakdown.onnx_runtime``)."""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from analysis.breakdown.attribution import Calibration, deduct_per_event_cost, load_average
from analysis.breakdown.operators import (BOOKKEEPING, DATA, ELEMENTWISE, FORWARD_SCOPE, NORM, OTHER, OVERHEAD_OP,
                                          SOFTMAX, _component, base_name, does_no_work, op_class)
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


def attribute_events(events, cuda: bool = False, per_event_us: float = 0.0
                     ) -> tuple[dict[tuple[str, str, str, str], list], float, float]:
    """Self time of every CPU-side event inside ``vitlab::forward`` -> {(op, class, component, block): [us, calls,
    input shapes, us as recorded]}.

    An operator's class is that of the outermost aten operator it runs in (``aten::linear`` and the ``addmm``
    under it are compute; the ``copy_`` under a ``reshape`` is data movement); its component that of the
    innermost component scope; inside a matching scope every operator is bookkeeping. A scope's own self time
    (Python between operators) is ``other``. Every event counts as a call of its row (``linear > addmm`` too).
    ``per_event_us``: the profiler's cost per recorded event, taken out of the enclosing events' self times
    (``analysis.breakdown.attribution``). Returns the groups, the forward's total as recorded and the attributed
    sum after the correction (us).
    """
    groups: dict[tuple[str, str, str, str], list] = defaultdict(lambda: [0.0, 0, [], 0.0])
    forward_total = 0.0
    inside: list[tuple[Any, tuple[str, str, str, str]]] = []
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
        inside.append((event, (op, kind, component, block)))
    recorded = {id(event): _event_time_us(event, cuda) for event, _ in inside}
    corrected, _ = deduct_per_event_cost((e for e, _ in inside), recorded, 0.0 if cuda else per_event_us)
    for event, key in inside:
        group = groups[key]
        group[0] += corrected[id(event)]
        group[1] += 1
        group[3] += recorded[id(event)]
        shapes = getattr(event, "input_shapes", None)
        if shapes and len(group[2]) < 4 and shapes not in group[2]:
            group[2].append(shapes)
    return groups, forward_total, sum(corrected.values())


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
    """Profile ``forward(inputs)`` (any forward: eager, compiled): ``warmup`` forwards, then ``iters`` rounds of one
    plain timed forward, one profiled forward (no shapes recorded: that costs more) and samples of the profiler's
    cost per event (``attribution.Calibration``); then one forward recording input shapes (and the Chrome trace)
    and one counting FLOPs and bytes. Each operator's time is its median over the rounds, less the profiler's
    calibrated cost (``analysis.breakdown.attribution``), so ``attributed_vs_plain`` checks that the operators add
    up to the plain forward. ``hooked`` (a private model copy) gets component scopes from module hooks."""
    dtype = PRECISIONS[precision]
    cuda = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    report = progress or (lambda fraction, message: None)

    def run() -> None:
        with torch.inference_mode(), autocast(device, enabled=dtype is not None, dtype=dtype), scope(FORWARD_SCOPE):
            forward(inputs)

    quiet_profiler_logs()
    plain, profiled, rounds, trace = [], [], [], None
    calibration = None if cuda else Calibration()
    # The hooks stay on for the plain forwards too: they are the same forward, so profiled/plain is the
    # profiler's own cost (a scope costs about a microsecond when no profiler listens).
    with component_hooks(hooked) if hooked is not None else _nothing():
        for _ in range(warmup):
            run()
        if calibration is not None:
            calibration.warm_up()
        for i in range(iters):
            plain.append(_timed(run, device))
            with torch.profiler.profile(activities=activities) as prof:
                profiled.append(_timed(run, device))
            rounds.append(prof.events())
            if calibration is not None:
                calibration.sample(CALIBRATION_PAIRS)
            report(0.8 * (i + 1) / iters, f"{name}: profiled forward {i + 1}/{iters}")
        report(0.82, f"{name}: one more forward recording input shapes" + (" and the trace" if keep_trace else ""))
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            run()
        shapes = {key: g[2] for key, g in attribute_events(prof.events(), cuda=cuda)[0].items()}
        if keep_trace:
            report(0.86, f"{name}: exporting the Chrome trace")
            trace = _chrome_trace(prof)
        report(0.9, f"{name}: counting FLOPs and bytes (one forward under a dispatch mode)")
        costs = count_costs(forward, inputs)
    report(0.95, f"{name}: attributing operator time (less the profiler's cost per event)")
    per_event = calibration.per_event_us if calibration is not None else None
    b = _median_breakdown(name, [attribute_events(events, cuda, per_event or 0.0) for events in rounds], costs,
                          shapes, device=device, precision=precision, weights=weights,
                          batch=batch or _batch_of(inputs), plain=plain, profiled=profiled, trace=trace,
                          per_event_us=per_event)
    report(1.0, f"{name}: done")
    return b


CALIBRATION_PAIRS = 5  # calibration samples (plain + profiled loop) after each profiled round


def _timed(run: Callable[[], None], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return 1000 * (time.perf_counter() - start)


def _median_breakdown(name: str, rounds: list, costs: dict, shapes: dict, *, plain: list, profiled: list,
                      **fields) -> Breakdown:
    """One Breakdown from the attributed rounds: every operator's time and calls are medians over the rounds (a
    round without it counts 0), the attributed time their sum; the recorded totals are medians of the rounds'."""
    keys = list(dict.fromkeys(k for groups, _, _ in rounds for k in groups))
    spread = _spread_costs({k: (_median([g[k][0] if k in g else 0.0 for g, _, _ in rounds]),) for k in keys}, costs)
    rows = []
    for key in keys:
        op, kind, component, block = key
        us = _median([groups[key][0] if key in groups else 0.0 for groups, _, _ in rounds])
        calls = _median([groups[key][1] if key in groups else 0 for groups, _, _ in rounds])
        flops, moved = spread.get(key, (0.0, 0.0))
        rows.append(OpRow(model=name, op=op, op_class=kind, component=component, ms=us / 1000, calls=calls,
                          flops=flops, bytes=moved, shapes=shapes.get(key, []), block=block))
    rows.sort(key=lambda r: -r.ms)
    recorded = [sum(g[3] for g in groups.values()) for groups, _, _ in rounds]
    events = [sum(g[1] for g in groups.values()) for groups, _, _ in rounds]
    return Breakdown(model=name, engine=EAGER.key, ops=rows, profiled_ms=profiled, plain_ms=plain,
                     attributed_ms=sum(r.ms for r in rows),
                     forward_scope_ms=_median([total for _, total, _ in rounds]) / 1000,
                     raw_attributed_ms=_median(recorded) / 1000, events_per_forward=_median(events),
                     load_1min=load_average(), threads=torch.get_num_threads(), **fields)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _spread_costs(times: dict[tuple[str, str, str, str], tuple], costs: dict[tuple[str, str], list[float]]
                  ) -> dict[tuple[str, str, str, str], tuple]:
    """Share each (class, component)'s FLOPs and bytes among its operators that do them, in proportion to their
    time (the dispatch-level counter does not see the profiler's operator names, only the same class and
    component). Bytes go to the operators that do work: not views and bare allocations
    (``operators.does_no_work``), nor a composite's own row (``linear`` beside its ``linear > addmm``: its self
    time is dispatch, the work is in its children). FLOPs go to those of them that compute (``linear > addmm``,
    not the ``linear > copy_`` beside it). ``times``: {(op, class, component, block): (us, ...)}."""
    parents = {(op.split(" > ")[0], kind, component, block) for (op, kind, component, block) in times if " > " in op}
    working = {key: value[0] for key, value in times.items()
               if key[0] != OVERHEAD_OP and key not in parents and not does_no_work(key[0].split(" > ")[-1])}
    computing = {key for key in working if op_class(key[0].split(" > ")[-1]) != DATA}
    # FLOPs to the computing operators; in a group where none took time (a class of data movement only), to its
    # working ones, so no counted FLOP is lost.
    groups_computing = {key[1:3] for key in computing if working[key] > 0}
    out: dict[tuple[str, str, str, str], list[float]] = {key: [0.0, 0.0] for key in working}
    _share({k: us for k, us in working.items() if k in computing or k[1:3] not in groups_computing}, costs, 0, out)
    _share(working, costs, 1, out)
    return {key: tuple(value) for key, value in out.items()}


def _share(times: dict[tuple[str, str, str, str], float], costs: dict[tuple[str, str], list[float]], index: int,
           out: dict[tuple[str, str, str, str], list[float]]) -> None:
    """``out[key][index]`` = the (class, component)'s ``costs[index]`` x the key's share of its group's time
    (equal shares in a group that took no time)."""
    time_of: dict[tuple[str, str], float] = defaultdict(float)
    count_of: dict[tuple[str, str], int] = defaultdict(int)
    for key, us in times.items():
        time_of[key[1:3]] += us
        count_of[key[1:3]] += 1
    for key, us in times.items():
        group, cost = key[1:3], costs.get(key[1:3], (0.0, 0.0))[index]
        out[key][index] = cost * us / time_of[group] if time_of[group] > 0 else cost / count_of[group]


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
