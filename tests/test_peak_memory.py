"""Issue 32 items 3 and 4: the peak memory of one forward on the CPU (the allocator's live bytes through
torch.profiler, net of what was allocated before), PuMer's reduction of it, and the paper's throughput protocol
(the batch grown by 8 from the family's start until out of memory or a time limit, the best batch kept)."""
from __future__ import annotations

import torch

from analysis.throughput import cli
from analysis.timing import harness as T
from analysis.timing.memory import forward_peak_bytes, kept_activations_peak_bytes, memory_reduction
from models.registry import METER, VILT, batch_growth

MIB = 2**20


def test_the_cpu_peak_of_a_forward_with_known_allocations_is_measured_net_of_what_was_there_before():
    weights = torch.ones(4 * MIB // 4)  # allocated before: not counted

    def forward():
        a = torch.ones(MIB // 4)  # 1 MiB
        b = a * 2  # 2 MiB alive together: the peak
        del a
        c = b + weights[: MIB // 4]  # 2 MiB again, never 3
        return float(c.sum())

    with torch.inference_mode():
        forward()
        peak = forward_peak_bytes(forward, "cpu")
    assert 2 * MIB <= peak <= 2 * MIB + 64 * 1024, peak  # reductions allocate a few scalars besides
    assert memory_reduction(peak, peak / 2) == 0.5 and memory_reduction(None, 1.0) is None


def _peaks(tiny, method_key: str) -> tuple[list[int], list[int]]:
    """(inference peaks, autograd-on peaks) of the tiny model's forward unreduced and with PuMer's paper setting."""
    from PIL import Image

    from analysis.vision_language.compute import _inputs
    from models.methods import METHODS

    model, processor = tiny(0)
    method = METHODS[method_key]
    inputs = _inputs(model, processor, Image.new("RGB", (96, 64), (120, 40, 200)), "what colour is it?")
    inference, kept = [], []
    for arguments in (method.neutral_arguments, {}):  # {}: the forward's defaults, the paper's setting
        def forward(x, arguments=arguments):
            return method.forward_function()(model, x, **arguments)

        with torch.inference_mode():
            forward(inputs)  # warm: one-time allocations do not count
            inference.append(forward_peak_bytes(lambda: forward(inputs), "cpu"))
        kept.append(kept_activations_peak_bytes(forward, inputs, "cpu"))
    return inference, kept


def test_pumer_lowers_the_cpu_peak_of_a_tiny_vilt_and_meter_forward():
    """With autograd on, every layer keeps its activations: the tokens PuMer removes count in every later layer and
    the peak falls. Under inference only one layer's activations are alive at a time, and these tiny models reach
    their peak in the embeddings, before the first reduce layer: PuMer never raises it."""
    from models.meter import tiny_meter
    from models.vilt_pumer import tiny_vilt

    for tiny, key in ((tiny_vilt, "pumer"), (tiny_meter, "pumer-meter")):
        (full, reduced), (full_kept, reduced_kept) = _peaks(tiny, key)
        assert 0 < reduced <= full < full_kept, key
        assert 0 < reduced_kept < 0.9 * full_kept, key


def _oom_above(limit: int) -> T.Runner:
    def forward(x):
        if x.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x * 2

    return T.Runner("full", forward, lambda b: torch.zeros(b, 4))


def test_the_paper_protocol_grows_by_8_from_the_family_start_until_out_of_memory():
    assert batch_growth(VILT) == (32, 8) and batch_growth(METER) == (16, 8) and batch_growth("cnn") is None
    settings = T.BenchSettings(iters=1, rounds=1, warmup=1, peak_memory=True)
    rows, notes = T.growing_sweep([_oom_above(55)], settings, *batch_growth(VILT), baseline="full")
    assert [r.batch for r in rows] == [32, 40, 48]  # 56 ran out of memory: the sweep stopped there
    assert any("stopped the sweep at batch 56" in n for n in notes)
    assert T.best_batch(rows, "full") in (32, 40, 48)
    assert all(r.forward_peak_mib is not None and r.memory_reduction == 0.0 for r in rows)

    rows, notes = T.growing_sweep([_oom_above(10**6)], settings, *batch_growth(METER), time_limit=0.0)
    assert [r.batch for r in rows] == [16]  # the first batch always runs; then the time is up
    assert notes[-1] == "stopped the sweep before batch 24: the time limit of 0 s was reached after batch 16."


def test_the_best_batch_is_where_the_baseline_is_fastest_and_every_model_is_reported_there():
    def row(model, batch, img_s):
        return T.ThroughputRow(model=model, batch=batch, device="cpu", precision="fp32", img_per_s=img_s,
                               ms_per_batch=1.0, params_m=0.0, gflops=None, peak_mem_mib=None, weights="random")

    rows = [row("full", 32, 10.0), row("PuMer", 32, 30.0), row("full", 40, 12.0), row("PuMer", 40, 15.0),
            row("full", 48, 11.0), row("PuMer", 48, 40.0)]
    assert T.best_batch(rows, "full") == 40 and T.best_batch(rows) == 40 and T.best_batch(rows, "PuMer") == 48
    assert T.best_batch([], "full") is None


def test_the_cli_refuses_the_paper_protocol_for_a_family_the_paper_gives_none(capsys):
    assert cli.main(["--models", "deit_tiny_patch16_224", "--paper-protocol", "--random-weights"]) == 2
    assert "gives no batch protocol for deit_tiny_patch16_224" in capsys.readouterr().err


def test_the_cli_prints_and_exports_each_models_peak_memory_and_its_reduction(tmp_path, capsys):
    import json

    out = tmp_path / "rows.json"
    assert cli.main(["--models", "deit_tiny_patch16_224@tome=8", "--baseline", "deit_tiny_patch16_224", "--batch", "1",
                     "--iters", "1", "--rounds", "1", "--warmup", "1", "--random-weights", "--peak-memory",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "peak memory deit_tiny_patch16_224 at batch 1: " in printed
    assert "% less than deit_tiny_patch16_224)" in printed and "torch.profiler memory events" in printed
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    tome = rows["deit_tiny_patch16_224@tome=8"]
    # ToMe computes attention itself (no fused kernel) and can need more at batch 1: the reduction may be negative
    assert tome["forward_peak_mib"] > 0 and rows["deit_tiny_patch16_224"]["forward_peak_mib"] > 0
    assert tome["memory_reduction"] == 1 - tome["forward_peak_mib"] / rows["deit_tiny_patch16_224"]["forward_peak_mib"]


def test_the_batches_the_cpu_estimate_leaves_out_are_one_note(monkeypatch):
    """On a CPU the growth stops one step past the estimate; where the available memory moved between the two
    estimates, the batches left out read as one sentence, not one each."""
    monkeypatch.setattr(T, "largest_batch_that_fits", lambda runners: 48)
    monkeypatch.setattr(T, "batches_that_fit", lambda runners, batches: (
        [b for b in batches if b <= 32], [f"batch {b} left out: it would not fit." for b in batches if b > 32]))
    rows, notes = T.growing_sweep([_oom_above(10**6)], T.BenchSettings(iters=1, rounds=1, warmup=1), 32, 8)
    assert [r.batch for r in rows] == [32]
    assert notes == ["batch 40 left out: it would not fit; 2 larger batches likewise."]
