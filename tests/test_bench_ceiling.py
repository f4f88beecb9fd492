"""The ceiling benchmark's figures from known interleaved rounds (no timing here)."""
from __future__ import annotations

import pytest

from analysis.bench.ceiling import figures_for_batch
from analysis.timing.harness import ThroughputRow, add_speedups


def _row(name: str, rounds: list[float]) -> ThroughputRow:
    return ThroughputRow(model=name, batch=16, device="cpu", precision="fp32", img_per_s=sorted(rounds)[1],
                         ms_per_batch=0.0, params_m=0.0, gflops=1.0, peak_mem_mib=None, weights="random",
                         rounds=rounds)


def test_fraction_is_the_median_per_round_ratio_and_only_dynamicvit_has_a_target():
    rounds = {"deit": [10.0, 10.0, 10.0], "dyn": [15.0, 15.0, 16.0], "dyn_sched": [16.0, 15.0, 20.0],
              "tome": [14.0, 14.0, 14.0], "tome_sched": [16.0, 16.0, 16.0]}
    rows = [_row(name, r) for name, r in rounds.items()]
    add_speedups(rows, "deit", rounds)
    figures = figures_for_batch(rows, 16)
    assert len(figures) == 6 and all(f["figure"].endswith("batch 16") for f in figures)
    dyn_speedup, dyn_ceiling, dyn_fraction, _, _, tome_fraction = figures
    assert dyn_speedup["value"] == pytest.approx(1.5) and dyn_ceiling["value"] == pytest.approx(1.6)
    assert dyn_fraction["value"] == pytest.approx(0.9375, abs=1e-3)  # ratios 0.9375, 1.0, 0.8
    assert dyn_fraction["passed"] is False and dyn_fraction["target"] == ">= 0.95"
    assert tome_fraction["value"] == pytest.approx(0.875, abs=1e-3) and tome_fraction["passed"] is None
    assert {f["unit"] for f in figures} == {"x", "ratio"}
