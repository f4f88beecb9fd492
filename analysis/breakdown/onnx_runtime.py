"""Profiling in ONNX Runtime: its own per-node profile of the exported graph, by operator class and component,
with each node's FLOPs and bytes (``analysis.breakdown.onnx_costs``) for the roofline."""
from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from analysis.breakdown.onnx_costs import GraphNode, profile_tensors, node_bytes, node_flops, optimised_graph
from analysis.breakdown.operators import (ORT_OP_TYPES, OTHER, OVERHEAD_OP, REST, UNKNOWN, block_of, ort_component,
                                          ort_module_path, ort_op_class)
from analysis.breakdown.records import Breakdown, OpRow
from analysis.timing.engines import ONNX_RUNTIME
from analysis.timing.onnx_engine import onnx_runner, session
from analysis.timing.runners import make_runner

KERNEL = "_kernel_time"


def profile_onnx(text: str, loaded, *, batch: int, device: str = "cpu", iters: int = 5, warmup: int = 2,
                 progress: Callable[[float, str], None] | None = None):
    """``analysis.breakdown.Breakdown`` of the exported graph in ONNX Runtime: its own per-node profile (kernel
    time per node) by operator class and component, interleaved with unprofiled runs of the same session."""
    runner = onnx_runner(make_runner(text, device=device, loaded=loaded), batch, device)
    return profile_onnx_file(Path(runner.onnx_file), runner.make_inputs(batch), name=runner.name, batch=batch,
                             device=device, iters=iters, warmup=warmup, weights=runner.weights, progress=progress,
                             checked=f"max |ORT - eager| = {runner.max_abs_diff:.1e}")


def profile_onnx_file(path: Path, images: np.ndarray, *, name: str, batch: int, device: str = "cpu",
                      iters: int = 5, warmup: int = 2, weights: str = "", checked: str = "",
                      progress: Callable[[float, str], None] | None = None) -> Breakdown:
    """Profile an ONNX file on ``images``: ``warmup`` runs, then ``iters`` rounds of one plain timed run and one
    run of a second session with ONNX Runtime's profiler on."""
    plain_sess = session(path, device)
    prof_sess = session(path, device, profile=True)
    feed = {plain_sess.get_inputs()[0].name: images}
    for _ in range(warmup):
        plain_sess.run(None, feed)
        prof_sess.run(None, feed)
    plain, profiled = [], []
    for i in range(iters):
        for sess, times in ((plain_sess, plain), (prof_sess, profiled)):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(1000 * (time.perf_counter() - start))
        if progress:
            progress((i + 1) / iters, f"{name}: run {i + 1}/{iters}")
    trace_file = prof_sess.end_profiling()
    events = json.loads(Path(trace_file).read_text())
    Path(trace_file).unlink(missing_ok=True)
    graph = optimised_graph(path, prof_sess.get_providers())
    rows, found = attribute_nodes(events, iters, graph, model=name)
    note = [f"ONNX Runtime {_ort_version()}", checked,
            (f"nodes {found['nodes_ms']:.2f} ms + session between nodes {found['between_ms']:.2f} ms = its run "
             f"{found['run_ms']:.2f} ms per forward")]
    if found["unclassed"]:
        note.append("op types not classed: " + ", ".join(sorted(found["unclassed"])))
    if found["uncounted"]:
        note.append("FLOPs not counted for: " + ", ".join(sorted(found["uncounted"])))
    if not graph:
        note.append("ONNX Runtime could not save its optimised graph: pre-packed weights' bytes not counted")
    unknown = sum(r.ms for r in rows if r.component == UNKNOWN)
    if unknown:
        note.append(f"{unknown:.2f} ms in nodes ORT's fusions left without a module name (component unknown)")
    return Breakdown(model=name, batch=batch, device=device, precision="fp32", engine=ONNX_RUNTIME.key,
                     weights=weights, ops=rows, profiled_ms=profiled, plain_ms=plain,
                     attributed_ms=sum(r.ms for r in rows), forward_scope_ms=found["run_ms"],
                     note="; ".join(n for n in note if n), trace=json.dumps(events))


def attribute_nodes(events: list[dict], iters: int, graph: dict[str, GraphNode] | None = None, *,
                    model: str = "") -> tuple[list[OpRow], dict]:
    """The last ``iters`` runs of ONNX Runtime's profile -> per forward, one row per (op type, class, component,
    block) with its kernel time, calls, FLOPs and bytes, plus one row for the session's own time between nodes
    (its run minus its nodes: the counterpart of eager's Python between operators). Also returns the op types
    not in the class table, those whose FLOPs could not be counted, and the totals (ms per forward)."""
    graph = graph or {}
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-iters:]
    start_us = runs[0]["ts"] if runs else 0
    groups: dict[tuple, list] = defaultdict(lambda: [0.0, 0, 0.0, 0.0, []])
    unclassed, uncounted = set(), set()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(KERNEL) or e["ts"] < start_us:
            continue
        args = e.get("args", {})
        op_type, node = args.get("op_name", ""), e["name"][: -len(KERNEL)]
        kind, known = ort_op_class(op_type), op_type in ORT_OP_TYPES
        if not known:
            unclassed.add(op_type)
        inputs, outputs = profile_tensors(args.get("input_type_shape")), profile_tensors(args.get("output_type_shape"))
        flops = node_flops(op_type, kind, inputs, outputs, graph.get(node)) if known else None
        if flops is None:
            uncounted.add(op_type)
        g = groups[(op_type, kind, ort_component(node), block_of(ort_module_path(node)))]
        g[0] += e["dur"]
        g[1] += 1
        g[2] += flops or 0.0
        g[3] += node_bytes(op_type, inputs, outputs, graph.get(node))
        shapes = [dims for dims, _ in inputs]
        if len(g[4]) < 4 and shapes not in g[4]:
            g[4].append(shapes)
    rows = [OpRow(model=model, op=op, op_class=kind, component=component, ms=us / 1000 / iters, calls=calls / iters,
                  flops=flops / iters, bytes=moved / iters, shapes=shapes, block=block)
            for (op, kind, component, block), (us, calls, flops, moved, shapes) in groups.items()]
    nodes_ms = sum(r.ms for r in rows)
    run_ms = statistics.mean(r["dur"] / 1000 for r in runs) if runs else nodes_ms
    between = max(run_ms - nodes_ms, 0.0)
    if between > 0:
        rows.append(OpRow(model=model, op=OVERHEAD_OP, op_class=OTHER, component=REST, ms=between, calls=1.0))
    rows.sort(key=lambda r: -r.ms)
    return rows, dict(unclassed=unclassed, uncounted=uncounted, nodes_ms=nodes_ms, between_ms=between,
                      run_ms=run_ms)


def _ort_version() -> str:
    # onnxruntime is optional and heavy: imported only when an ONNX Runtime profile is made.
    import onnxruntime as ort

    return ort.__version__
