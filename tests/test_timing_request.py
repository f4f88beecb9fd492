"""The throughput page's runs are timed in a fresh worker process (analysis.timing.request); no timing asserted."""
import os

import pytest

from analysis.timing.preload import rerun_command
from analysis.timing.harness import BenchSettings, LatencyRow, ThroughputRow
from analysis.timing.runners import ModelOptions
from analysis.timing.env import control_allocator
from analysis.timing.request import (LATENCY, TimingRefused, TimingRequest, registering_modules,
                                     run_in_fresh_process, run_request, rows_from_records)


DEIT = "deit_tiny_patch16_224"


def tiny(mode: str = "throughput", **kw) -> TimingRequest:
    settings = BenchSettings(batch=1 if mode == LATENCY else 2, iters=1, rounds=2, warmup=1, device="cpu")
    return TimingRequest((DEIT, DEIT + "@tome=4"), settings, ModelOptions(channels_last=False),
                         baseline=DEIT, mode=mode, threads=1, **kw)


def test_a_request_survives_its_trip_as_json():
    request = tiny(batches=(1, 2), model_modules=(("my_models", "/somewhere/my_models.py"),))
    assert TimingRequest.from_spec(request.to_spec()) == request
    # timm's own models and the registry's need no import in the worker (a model registered by a module of one's
    # own does: tests/test_any_timm_vit.py times one through the page)
    assert registering_modules([DEIT, "dynamicvit_deit_small_patch16_224@rho=0.7", "no_such_model"]) == ()


def test_the_worker_times_in_a_fresh_process_and_streams_every_round():
    progress, rounds = [], []
    result = run_in_fresh_process(tiny(), progress=lambda f, m: progress.append((f, m)),
                                  on_measure=lambda *m: rounds.append(m))
    assert [type(r) for r in result.rows] == [ThroughputRow, ThroughputRow]
    assert [r.model for r in result.rows] == [DEIT, DEIT + "@tome=4"]
    assert all(r.img_per_s > 0 and len(r.rounds) == 2 for r in result.rows)
    assert result.rows[0].speedup == 1.0 and result.rows[1].speedup is not None
    assert len(rounds) == 4 and {m[0] for m in rounds} == {DEIT, DEIT + "@tome=4"}
    assert progress and progress[0][1].startswith("loading 1/2")
    env = result.rows[0].environment
    assert env["intra_op_threads"] == "1"  # the request's threads, in the worker; this process is untouched
    cli = rerun_command(["python", "-m", "analysis.timing.request"], os.environ)
    assert env["allocator"] == ("tcmalloc (preloaded)" if cli else control_allocator())


def test_latency_rows_come_back_as_latency_rows():
    result = run_in_fresh_process(tiny(LATENCY))
    assert [type(r) for r in result.rows] == [LatencyRow, LatencyRow] and result.rows[0].median_ms > 0
    assert rows_from_records([{**vars(result.rows[0])}]) == [result.rows[0]]


def test_a_model_that_does_not_load_is_refused_in_one_sentence():
    request = TimingRequest(("no_such_model_anywhere",), BenchSettings(batch=1, iters=1, rounds=1, warmup=0))
    with pytest.raises(TimingRefused) as refused:
        run_in_fresh_process(request)
    assert "no_such_model_anywhere" in str(refused.value) and not refused.value.out_of_memory
    with pytest.raises(TimingRefused):  # the same answer in this process
        run_request(request)


def test_a_worker_that_outlives_its_timeout_is_stopped():
    from analysis.timing import fresh_process

    with pytest.raises(RuntimeError, match="stopped after 0.05 s"):
        fresh_process.run_in_fresh_process("analysis.timing.request", tiny().to_spec(), timeout=0.05)


def test_the_worker_says_what_it_does_between_loading_and_the_first_round():
    """Issue 30: the stage line sat on the last 'loading' message for 26 s of FLOP counting and warm-up."""
    progress = []
    run_request(tiny(), progress=lambda f, m: progress.append(m))
    last_load = max(i for i, m in enumerate(progress) if m.startswith("loading"))
    first_round = min(i for i, m in enumerate(progress) if m.startswith("round"))
    between = progress[last_load + 1: first_round]
    assert between == [f"{step} {i}/2: {model}" for i, model in ((1, DEIT), (2, DEIT + "@tome=4"))
                       for step in ("counting FLOPs", "warming up")]
