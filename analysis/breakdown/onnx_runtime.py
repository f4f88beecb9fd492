"""Profiling in ONNX Runtime: its own per-node profile of the exported graph, by operator class and component."""
from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from analysis.breakdown.operators import ort_component, ort_op_class
from analysis.breakdown.records import Breakdown, OpRow
from analysis.timing.onnx_engine import onnx_runner, session
from analysis.timing.runners import make_runner


def profile_onnx(text: str, loaded, *, batch: int, device: str = "cpu", iters: int = 5, warmup: int = 2,
                 progress: Callable[[float, str], None] | None = None):
    """``analysis.breakdown.Breakdown`` of the exported graph in ONNX Runtime: its own per-node profile (kernel
    time per node) by operator class and component, interleaved with unprofiled runs of the same session."""
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
    # onnxruntime is optional and heavy: imported only when an ONNX Runtime profile is made.
    import onnxruntime as ort

    return ort.__version__
