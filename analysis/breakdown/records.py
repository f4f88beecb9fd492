"""The records of a breakdown: one operator in one component (``OpRow``) and one profiled model (``Breakdown``)."""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence
from analysis.breakdown.operators import COMPONENT_ORDER, MEMORY_CLASSES, OP_CLASSES

TOLERANCE = 0.10  # attributed / plain within 10 % of 1: the attribution adds up


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
    attributed_ms: float = 0.0  # sum of the operators' self times per forward (less the profiler's own cost)
    forward_scope_ms: float = 0.0  # the profiler's own total of the forward (its ``vitlab::forward`` range)
    raw_attributed_ms: float | None = None  # the self times as recorded, before the profiler's cost is taken out
    per_event_us: float | None = None  # the profiler's cost per recorded event, calibrated (None: no correction)
    events_per_forward: float = 0.0  # events the profiler records in one forward
    load_1min: float | None = None  # the 1-minute load average when the profile finished
    threads: int | None = None  # CPU threads torch used
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
        """Attributed time / the forward timed without the profiler: within 10 % when the attribution adds up."""
        return self.attributed_ms / self.plain_median_ms

    @property
    def raw_vs_plain(self) -> float | None:
        """The recorded self times (the profiler's cost still in them) / the plain forward."""
        return None if self.raw_attributed_ms is None else self.raw_attributed_ms / self.plain_median_ms

    @property
    def adds_up(self) -> bool:
        """Whether the attributed time is within ``TOLERANCE`` of the forward timed without the profiler."""
        return abs(self.attributed_vs_plain - 1) <= TOLERANCE

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

    @property
    def costs_counted(self) -> bool:
        """Whether any operator has FLOPs or bytes: without them the roofline has no point and nothing is below it."""
        return any(row.flops > 0 or row.bytes > 0 for row in self.ops)

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
                    profiled_ms=self.profiled_median_ms, profiler_overhead=self.overhead,
                    per_event_us=self.per_event_us, events_per_forward=self.events_per_forward or None,
                    raw_attributed_ms=self.raw_attributed_ms, attributed_ms=self.attributed_ms,
                    attributed_vs_plain=self.attributed_vs_plain, adds_up=self.adds_up,
                    memory_bound_share=self.memory_bound_share(), load_1min=self.load_1min, threads=self.threads,
                    note=self.note)
