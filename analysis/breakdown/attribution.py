"""The profiler's own cost, measured on this machine and taken out of the attribution, so that the operators'
milliseconds add up to the forward timed without the profiler.

The model (``torch.profiler`` on the CPU, without ``record_shapes``, which ``profile_runner`` records in a pass of
its own):

- Recording one event (an aten operator, a child operator it calls, or a ``vitlab::`` scope) costs the profiler
  about the same time ``c`` whatever the event. With the profiler on, a forward of ``N`` events takes about
  ``N * c`` longer, and the self times of its events sum to that longer time (``profiled / plain`` > 1, most for
  models of many small operators).
- That time lands outside the event's own interval: the collector takes an operator's start time at the end of
  its enter callback and its end time at the start of its exit callback, so the callbacks' work falls in the
  self time of the enclosing event: the parent operator (``aten::linear`` holds the cost of recording its
  ``t`` and ``addmm``) or the scope around it, whose self time is *other*.
- ``c`` is calibrated in the same process, on this machine, by a loop of tiny operators shaped like a forward's
  (a scope, a ``linear`` with its nested ``t``/``transpose``/``mm`` calls, a view, an add) timed with and without
  the profiler in alternation (``Calibration``): ``c`` = median over pairs of (profiled - plain) / events. It is
  never fitted to the forward being checked, so ``attributed / plain`` stays a check of this model and not a
  rescaling that forces the sum.
- ``deduct_per_event_cost`` takes ``c`` per event out of its parent's self time (where that is used up, out of
  the grandparent's, up to the forward scope); what remains is each operator's own time.

On CUDA the attributed times are the kernels' device times, which the CPU-side cost does not inflate: no
correction is made there (``per_event_us`` None).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Iterable

import torch
from torch.profiler import ProfilerActivity, profile

from analysis.breakdown.records import TOLERANCE
from models.scopes import scope

CALIBRATION_SCOPE = "profiler calibration"


def deduct_per_event_cost(events: Iterable, self_us: dict[int, float], per_event_us: float
                          ) -> tuple[dict[int, float], float]:
    """``self_us`` (event id -> self time in us, the events inside the forward) less ``per_event_us`` for every
    event, taken from its parent's self time and, where that is used up, from the next enclosing event's.
    Returns the corrected self times and the cost no enclosing event could absorb (the forward scope's own)."""
    remaining = dict(self_us)
    unabsorbed = 0.0
    if per_event_us <= 0:
        return remaining, 0.0
    for event in events:
        if id(event) not in remaining:
            continue
        cost, node = per_event_us, event.cpu_parent
        while cost > 0 and node is not None and id(node) in remaining:
            take = min(remaining[id(node)], cost)
            remaining[id(node)] -= take
            cost -= take
            node = node.cpu_parent
        unabsorbed += cost
    return remaining, unabsorbed


class Calibration:
    """The profiler's cost per recorded event on this machine: ``sample()`` times ``loop`` iterations of tiny
    operators once without and once with the profiler; ``per_event_us`` is the median over the samples of the
    difference per event. ``profile_runner`` samples between its rounds, so the calibration sees the machine
    the forwards see."""

    def __init__(self, iterations: int = 20) -> None:
        self.iterations = iterations
        self.events = 0  # events one profiled loop records (counted once: the loop is the same every time)
        self.plain_ms: list[float] = []
        self.profiled_ms: list[float] = []
        self._a = torch.randn(4, 8)
        self._w = torch.randn(8, 8)

    def _loop(self) -> None:
        a, w = self._a, self._w
        with torch.inference_mode():
            for _ in range(self.iterations):
                with scope(CALIBRATION_SCOPE):
                    y = torch.nn.functional.linear(a, w)  # linear > t > transpose > as_strided, matmul > mm
                    y = y.view(-1)
                    y + 1.0

    def warm_up(self) -> None:
        """One plain and one profiled loop, not kept (first calls allocate and fill caches)."""
        self.sample()
        self.plain_ms.clear()
        self.profiled_ms.clear()

    def sample(self, pairs: int = 1) -> None:
        for _ in range(pairs):
            start = time.perf_counter()
            self._loop()
            self.plain_ms.append(1000 * (time.perf_counter() - start))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                self._loop()
                self.profiled_ms.append(1000 * (time.perf_counter() - start))
            if not self.events:
                self.events = sum(1 for e in prof.events() if _on_cpu(e))

    @property
    def per_event_us(self) -> float:
        """Median over the samples of (profiled - plain) per event, in us (0 before any sample; never negative)."""
        if not self.events or not self.plain_ms:
            return 0.0
        diffs = [p - q for p, q in zip(self.profiled_ms, self.plain_ms)]
        return max(0.0, 1000 * statistics.median(diffs) / self.events)


def _on_cpu(event) -> bool:
    return getattr(event, "device_type", None) is None or "CPU" in str(event.device_type)


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def attribution_warning(b) -> str | None:
    """One sentence when a breakdown's attributed time misses its plain forward by more than ``TOLERANCE``
    (a busy machine, or a profiler cost this model does not describe), else None."""
    if b.adds_up:
        return None
    ratio = b.attributed_vs_plain
    cost = (f", {b.per_event_us:.2f} us per event x {b.events_per_forward:,.0f} events taken out"
            if b.per_event_us is not None else "")
    load = f"; 1-minute load average {b.load_1min:.1f} on {os.cpu_count()} CPUs" if b.load_1min is not None else ""
    return (f"{b.model} batch {b.batch}: the operators' time adds up to {ratio:.2f}x the forward timed without the "
            f"profiler, outside {TOLERANCE:.0%} (profiled / plain {b.overhead:.2f}{cost}{load}). Other work on "
            "the machine disturbs such timings: profile again when it is quiet. The shares are still ratios of the "
            "attributed time.")
