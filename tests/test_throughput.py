import time

import pytest
import torch

from analysis.throughput import cli
from analysis.timing import harness as T
from models.variants import parse_variant


def _sleep_runner(name: str, seconds_per_batch: float) -> T.Runner:
    def forward(x):
        time.sleep(seconds_per_batch)
        return x

    return T.Runner(name=name, forward=forward, make_inputs=lambda b: torch.zeros(b, 1), params=10)


def test_known_sleep_gives_expected_throughput_and_speedup():
    settings = T.BenchSettings(batch=4, iters=5, rounds=3, warmup=1)
    rows = T.benchmark([_sleep_runner("slow", 0.02), _sleep_runner("fast", 0.01)], settings, baseline="slow")
    by_name = {r.model: r for r in rows}
    assert by_name["slow"].img_per_s == pytest.approx(4 / 0.02, rel=0.2)
    assert by_name["fast"].img_per_s == pytest.approx(4 / 0.01, rel=0.2)
    assert by_name["fast"].speedup == pytest.approx(2.0, rel=0.2)
    assert by_name["slow"].speedup == pytest.approx(1.0)
    assert len(by_name["fast"].rounds) == 3


def test_progress_is_fraction_then_message_like_every_analysis():
    seen = []
    T.latency([_sleep_runner("a", 0.0), _sleep_runner("b", 0.0)], T.BenchSettings(iters=1, rounds=2, warmup=1),
              progress=lambda fraction, message: seen.append((fraction, message)))
    assert [f for f, m in seen if m.startswith("round")] == [0.25, 0.5, 0.75, 1.0]
    assert all(f == 0.0 for f, m in seen if not m.startswith("round"))  # FLOP counting and warm-up come first
    assert seen[-1][1] == "round 2/2: b"


def test_timing_waits_for_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(T, "synchronize", lambda device: calls.append(device))
    T.benchmark([_sleep_runner("a", 0.0)], T.BenchSettings(batch=1, iters=1, rounds=2, warmup=1))
    # warm-up, one call that finds the allocator steady, and every round read the clock after a sync, before
    # and after the loop
    assert len(calls) == 2 * (1 + 1 + 2)


def _oom_above(limit: int):
    def forward(x):
        if x.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x

    return T.Runner("big", forward, lambda b: torch.zeros(b, 1))


def test_sweep_backs_off_on_out_of_memory():
    settings = T.BenchSettings(iters=1, rounds=1, warmup=1)
    rows, notes = T.sweep([_oom_above(16)], settings, batches=[4, 8, 32, 64])
    assert [r.batch for r in rows] == [4, 8, 16]
    assert rows[-1].note == "asked for batch 32"
    assert notes == ["batch 32: out of memory; backed off to batch 16.",
                     "stopped the sweep at batch 32: it does not fit; batch 16 was measured instead."]


def test_sweep_never_backs_off_below_a_measured_batch():
    rows, notes = T.sweep([_oom_above(8)], T.BenchSettings(iters=1, rounds=1, warmup=1), batches=[4, 8, 32])
    assert [r.batch for r in rows] == [4, 8]
    assert notes[-1] == "stopped the sweep at batch 32: it does not fit."


def test_other_errors_are_not_swallowed():
    def forward(x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        T.sweep([T.Runner("bad", forward, lambda b: torch.zeros(b))], T.BenchSettings(iters=1, rounds=1), [2])


def test_flops_of_a_linear_layer():
    layer = torch.nn.Linear(10, 20, bias=False)
    runner = T.Runner("lin", layer, lambda b: torch.zeros(b, 10))
    assert T.count_flops(runner) == 2 * 10 * 20


def test_cli_prints_table_and_speedup(capsys, tmp_path):
    out = tmp_path / "r.json"
    code = cli.main(["--models", "efficientvit_m0", "--baseline", "mobilenetv3_large_100", "--random-weights",
                   "--device", "cpu", "--batch", "2", "--iters", "1", "--rounds", "2", "--warmup", "1",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "efficientvit_m0" in printed and "GFLOPs" in printed
    assert printed.strip().splitlines()[-2].startswith("speedup efficientvit_m0 vs mobilenetv3_large_100: ")
    assert '"img_per_s"' in out.read_text()


def test_cli_refuses_unknown_names_clearly(capsys):
    assert cli.main(["--models", "deit_gigantic", "--random-weights"]) == 2
    assert "Unknown model 'deit_gigantic'" in capsys.readouterr().err


def test_variant_names():
    v = parse_variant("deit_small_patch16_224@tome=13,prop_attn=off")
    assert v.model == "deit_small_patch16_224" and v.settings == {"tome": 13, "prop_attn": False}
    assert v.label == "deit_small_patch16_224@tome=13,prop_attn=False"


def test_vilt_variants_run_the_reduced_forward():
    from analysis.timing.runners import make_runner
    from models.loading import load_model

    loaded = load_model("vilt_b32_vqa", random_weights=True)
    plain = make_runner("vilt_b32_vqa", loaded=loaded)
    pumer = make_runner("vilt_b32_vqa@pumer", loaded=loaded)
    assert pumer.name == "vilt_b32_vqa@pumer"
    inputs = plain.make_inputs(1)
    with torch.inference_mode():
        torch.testing.assert_close(plain.forward(inputs), loaded.model(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert T.count_flops(pumer) < 0.6 * T.count_flops(plain)


def test_settings_of_another_method_are_refused():
    from analysis.timing.runners import make_runner
    from models.loading import load_model

    loaded = load_model("deit_tiny_patch16_224", random_weights=True)
    with pytest.raises(ValueError, match="rho= needs a DynamicViT model"):
        make_runner("deit_tiny_patch16_224@rho=0.7", loaded=loaded)
    with pytest.raises(ValueError, match="match no method"):
        make_runner("deit_tiny_patch16_224@speed=11", loaded=loaded)


def test_meter_variants_run_pumer_in_the_fusion_layers():
    from analysis.timing.runners import make_runner
    from models.loading import LoadedModel
    from models.meter import tiny_meter
    from models.registry import get_spec
    from models.weights import RANDOM, WeightsSource

    model, processor = tiny_meter()
    spec = get_spec("meter_clip16_288_vqa")
    size = model.config.image_size
    loaded = LoadedModel(name=spec.name, spec=spec, model=model, weights=WeightsSource(RANDOM), device="cpu",
                         data_config={"input_size": (3, size, size)}, transform=processor)
    plain = make_runner(spec.name, loaded=loaded)
    pumer = make_runner(f"{spec.name}@pumer", loaded=loaded)
    inputs = plain.make_inputs(2)
    with torch.inference_mode():
        torch.testing.assert_close(plain.forward(inputs), model(**inputs), atol=1e-5, rtol=1e-5)
    assert T.count_flops(pumer) < T.count_flops(plain)


def test_latency_reads_interleaved_rounds_as_ms_per_image():
    settings = T.BenchSettings(batch=16, iters=1, rounds=5, warmup=1)
    rows = T.latency([_sleep_runner("slow", 0.02), _sleep_runner("fast", 0.01)], settings, baseline="slow")
    by_name = {r.model: r for r in rows}
    assert by_name["slow"].median_ms == pytest.approx(20.0, rel=0.25)
    assert by_name["fast"].median_ms == pytest.approx(10.0, rel=0.25)
    for row in rows:
        assert len(row.rounds_ms) == 5 and row.p90_ms >= row.median_ms
        assert row.median_ms == pytest.approx(sorted(row.rounds_ms)[2])
    assert by_name["fast"].speedup == pytest.approx(2.0, rel=0.25) and by_name["fast"].baseline == "slow"
    assert settings.batch == 16  # the caller's settings are not changed


def test_latency_runs_at_batch_one():
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return x

    T.latency([T.Runner("a", forward, lambda b: torch.zeros(b, 1))], T.BenchSettings(batch=32, iters=1, rounds=2))
    assert set(seen) == {1}


def test_cli_latency_prints_ms_and_batch_one_speedup(capsys, tmp_path):
    out = tmp_path / "latency.csv"
    code = cli.main(["--models", "deit_tiny_patch16_224@tome=4", "--baseline", "deit_tiny_patch16_224",
                   "--random-weights", "--device", "cpu", "--latency", "--rounds", "2", "--iters", "1",
                   "--warmup", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "median ms" in printed and "p90 ms" in printed
    assert "speedup deit_tiny_patch16_224@tome=4 vs deit_tiny_patch16_224 at batch 1: " in printed
    header = out.read_text().splitlines()[0].split(",")
    assert {"median_ms", "p90_ms", "speedup"} <= set(header) and "rounds_ms" not in header


def test_cli_latency_refuses_a_batch_sweep():
    with pytest.raises(SystemExit):
        cli.main(["--models", "deit_tiny_patch16_224", "--latency", "--batches", "1", "2"])


def test_img_per_s_and_speedup_agree_by_construction_and_carry_spread_and_environment():
    settings = T.BenchSettings(batch=2, iters=2, rounds=4, warmup=1)
    rows = T.benchmark([_sleep_runner("slow", 0.01), _sleep_runner("fast", 0.005)], settings, baseline="slow")
    slow, fast = rows
    assert fast.speedup == pytest.approx(fast.img_per_s / slow.img_per_s, rel=1e-12)
    assert fast.img_per_s_q1 <= fast.img_per_s <= fast.img_per_s_q3
    ratios = sorted(a / b for a, b in zip(fast.rounds, slow.rounds))
    assert ratios[0] <= fast.speedup_q1 <= fast.speedup_q3 <= ratios[-1]
    assert fast.environment["allocator"] and fast.environment["batch"] == "2"
    frame = T.rows_to_dataframe(rows)
    assert {"env_allocator", "env_hardware", "img_per_s_q1", "speedup_q3"} <= set(frame.columns)
    assert "environment" not in frame.columns and "rounds" not in frame.columns


def _row(name, rounds, baseline=None, speedup=None, q=(None, None)):
    import statistics

    return T.ThroughputRow(model=name, batch=8, device="cpu", precision="fp32", img_per_s=statistics.median(rounds),
                           ms_per_batch=1.0, params_m=1.0, gflops=None, peak_mem_mib=None, weights="random",
                           rounds=list(rounds), speedup=speedup, baseline=baseline, speedup_q1=q[0], speedup_q3=q[1])


def test_spread_warnings_say_how_wide_and_what_to_do():
    steady = _row("base", [46.0, 46.2, 46.5, 46.1], baseline="base", speedup=1.0, q=(1.0, 1.0))
    noisy = _row("tome", [6.0, 11.1, 40.0, 63.0], baseline="base", speedup=11.1 / 46.2, q=(0.5, 1.3))
    assert T.spread_warnings([steady]) == []
    (warning,) = T.spread_warnings([steady, noisy])
    assert warning.startswith("tome: its rounds range from 6.0 to 63.0 img/s")
    assert "more rounds" in warning and "fewer threads" in warning
    assert "quieter machine" in warning


def test_quartiles_of_one_round_are_that_round():
    assert T.quartiles([5.0]) == (5.0, 5.0)
    assert T.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)


def test_spread_warnings_say_what_the_spread_is_in_plain_words():
    """Issue 30: 'an interquartile range of 95% of the median (more than 10% is too wide ...)' was jargon, and
    'speed-ups span Q1-Q3' called the middle half of the rounds their whole span."""
    steady = _row("base", [46.0, 46.2, 46.5, 46.1], baseline="base", speedup=1.0, q=(1.0, 1.0))
    noisy = _row("tome", [6.0, 11.1, 40.0, 63.0], baseline="base", speedup=11.1 / 46.2, q=(0.5, 1.3))
    (warning,) = T.spread_warnings([steady, noisy])
    q1, q3 = T.quartiles(noisy.rounds)
    assert "interquartile" not in warning and "span" not in warning
    assert f"the middle half of them between {q1:.1f} and {q3:.1f} img/s" in warning
    assert "the middle half of its per-round speed-ups lies between 0.50x and 1.30x" in warning
    assert "Since the middle half spreads wider than 10% of the median, its speed-up of 0.24x is not reliable." \
        in warning
