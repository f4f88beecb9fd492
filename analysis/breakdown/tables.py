"""Tables and comparisons of breakdown records: per-operator and per-class shares, component savings of a
token-reduction variant against its unreduced model, attention vs FFN per block, memory-bound time per engine, the
JSON export."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from typing import Sequence

import pandas as pd

from analysis.breakdown.operators import COMPONENT_ORDER, COMPUTE, MEMORY_CLASSES, OP_CLASSES
from analysis.breakdown.records import Breakdown
from analysis.timing.engines import engine as engine_named
from analysis.timing.roofline import Roofline, below_roof_share
from models.device import hardware_info
from models.scopes import ATTENTION, FFN


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
    rows = []
    for b in results:
        for row in b.ops:
            record = asdict(row)
            record["shapes"] = json.dumps(record["shapes"])
            record.update(batch=b.batch, device=b.device, precision=b.precision, engine=b.engine, weights=b.weights)
            rows.append(record)
    return pd.DataFrame(rows)


def share_table(results: Sequence[Breakdown], by: str = "op_class"):
    return pd.DataFrame([dict(model=b.model, batch=b.batch, engine=b.engine, **{k: v for k, v in b.shares(by).items()})
                         for b in results]).fillna(0.0)


def to_json(results: Sequence[Breakdown], roof=None) -> dict:
    return {"hardware": hardware_info(), "roofline": None if roof is None else asdict(roof),
            "models": [dict(b.summary(), shares=b.shares(), components=b.shares("component"),
                            ops=[asdict(r) for r in b.ops]) for b in results],
            "engines": engine_comparison(results)}


ENGINE_NOTE = ("Per model and batch, under each engine: the plain forward's median time split by the profile's "
               "shares of operator classes; memory-bound = data movement, element-wise, normalisation, softmax and "
               "bookkeeping. Speed-up and memory-bound time removed are against eager PyTorch's profile of the same "
               "model and batch; each engine's plain forwards were timed in its own profiling run, not interleaved "
               "with the other engines' (python -m analysis.throughput --engine ... interleaves them).")


def engine_comparison(results: Sequence[Breakdown]) -> list[dict]:
    """Per model, batch and engine: ms per forward (the plain median) by operator class, the memory-bound share and
    time, and against eager PyTorch (where it was profiled too) the speed-up and the memory-bound ms removed."""
    eager = {(b.model, b.batch): b for b in results if engine_named(b.engine).is_reference}
    rows = []
    for b in results:
        shares, ms = b.shares(), b.plain_median_ms
        memory = b.memory_bound_share() * ms
        row = dict(model=b.model, batch=b.batch, engine=engine_named(b.engine).label, plain_ms=ms,
                   memory_bound_share=b.memory_bound_share(), memory_bound_ms=memory,
                   **{f"{kind} ms": shares.get(kind, 0.0) * ms for kind in OP_CLASSES},
                   speedup_over_eager=None, memory_bound_ms_removed=None, memory_bound_removed_share=None)
        base = eager.get((b.model, b.batch))
        if base is not None:
            base_memory = base.memory_bound_share() * base.plain_median_ms
            row.update(speedup_over_eager=base.plain_median_ms / ms, memory_bound_ms_removed=base_memory - memory,
                       memory_bound_removed_share=(base_memory - memory) / base_memory if base_memory else None)
        rows.append(row)
    return rows


def component_table(results: Sequence[Breakdown]) -> pd.DataFrame:
    """ms per forward per component and model, with each component's memory-bound share (time outside compute);
    GFLOPs only where FLOPs were counted (None otherwise: nothing was measured)."""
    rows = []
    for b in results:
        for g in b.groups(("component",)):
            memory = sum(r.ms for r in b.ops if r.component == g["component"] and r.op_class not in ("compute", "other"))
            rows.append(dict(model=b.model, batch=b.batch, engine=b.engine, component=g["component"],
                             ms=g["ms"], share=g["ms"] / max(b.attributed_ms, 1e-12),
                             memory_bound=memory / g["ms"] if g["ms"] else None,
                             gflops=g["flops"] / 1e9 if b.costs_counted else None))
    return pd.DataFrame(rows)


def summary_table(results: Sequence[Breakdown], roof: Roofline | None = None) -> pd.DataFrame:
    """One row per profile; the time below the bandwidth roof only where FLOPs and bytes were counted."""
    rows = []
    for b in results:
        row = b.summary()
        if roof is not None:
            row["below_bandwidth_roof"] = below_roof_share(b, roof)  # None (n/a, not 0) where nothing was counted
        rows.append(row)
    return pd.DataFrame(rows)


def attribution_table(results: Sequence[Breakdown]) -> pd.DataFrame:
    """Does each attribution add up: the plain and the profiled forward (medians), the profiler's overhead, its
    calibrated cost per event and the events per forward, the attributed time after taking that cost out, its
    ratio to the plain forward and whether that is within ``TOLERANCE``, and the load while it ran."""
    return pd.DataFrame([dict(model=b.model, batch=b.batch, engine=b.engine, plain_ms=b.plain_median_ms,
                              profiled_ms=b.profiled_median_ms, profiled_vs_plain=b.overhead,
                              per_event_us=b.per_event_us, events=b.events_per_forward or None,
                              attributed_ms=b.attributed_ms, attributed_vs_plain=b.attributed_vs_plain,
                              within_10pct="yes" if b.adds_up else "no", load_1min=b.load_1min)
                         for b in results])
