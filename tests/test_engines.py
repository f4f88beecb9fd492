"""The engine table (analysis.timing.engines): it drives the command lines, each engine's equality check refuses a
wrong engine in one sentence, and torch.compile is timed interleaved with eager and profiled by its fused kernels.

torch.compile costs its compile time on CPU (inductor runs a C++ compiler): one tiny module is compiled once, in one
test, and everything that needs a compiled forward checks it there."""
import dataclasses

import pytest
import torch
from torch import nn

from analysis import breakdown as B
from analysis.breakdown.compiled import WHOLE_FORWARD, compiled_rows, profile_compiled_runner
from analysis.breakdown.records import OpRow
from analysis.timing.engines import (COMPILED, EAGER, ENGINES, EngineMismatch, EngineRefused, engine, engine_runners,
                                     over_eager, refuse_batches, variant_of, within_engines)
from analysis.timing.harness import BenchSettings, Runner, benchmark


class Tiny(nn.Module):
    """A norm, a product, a softmax and a GELU: enough for inductor to fuse kernels of several classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.norm(x))
        return nn.functional.gelu(y.softmax(-1) * 2.0).mean(1)


def tiny_runner(name: str = "tiny") -> Runner:
    def make_inputs(batch: int) -> torch.Tensor:
        return torch.randn(batch, 8, 16, generator=torch.Generator().manual_seed(0))

    return Runner(name=name, forward=Tiny().eval(), make_inputs=make_inputs)


def _off_by_a_hundredth(eager: Runner, batch: int, device: str = "cpu") -> Runner:
    """A deliberately wrong engine: the eager forward plus 1e-2."""
    return dataclasses.replace(eager, forward=lambda x: eager.forward(x) + 1e-2)


def test_the_table_drives_the_command_lines():
    from analysis.breakdown.cli import build_parser as breakdown_parser
    from analysis.throughput.cli import build_parser as throughput_parser

    assert list(ENGINES) == ["eager", "compile", "onnxruntime"] and EAGER.is_reference
    for parser in (throughput_parser(), breakdown_parser()):
        action = next(a for a in parser._actions if a.dest == "engine")
        assert list(action.choices) == list(ENGINES) and action.nargs == "+"
    args = throughput_parser().parse_args(["--models", "m", "--engine", "eager", "compile", "onnxruntime"])
    assert args.engine == ["eager", "compile", "onnxruntime"]
    with pytest.raises(SystemExit):
        throughput_parser().parse_args(["--models", "m", "--compile"])  # one way: the engine
    with pytest.raises(ValueError, match="Unknown engine 'tvm': choose from eager, compile, onnxruntime"):
        engine("tvm")
    assert engine("onnxruntime").tag("deit_tiny_patch16_224") == "deit_tiny_patch16_224 [onnxruntime]"
    assert EAGER.tag("deit_tiny_patch16_224") == "deit_tiny_patch16_224"
    assert refuse_batches(["eager", "onnxruntime"], several_batches=True).startswith("ONNX Runtime runs a graph")
    assert refuse_batches(["eager", "compile"], several_batches=True) is None


@pytest.mark.parametrize("key", [k for k, e in ENGINES.items() if not e.is_reference])
def test_each_engines_check_refuses_a_wrong_engine_in_one_sentence(key):
    wrong = dataclasses.replace(ENGINES[key], wrap=f"{__name__}:_off_by_a_hundredth")
    with pytest.raises(EngineMismatch) as refused:
        wrong.runner(tiny_runner(), batch=2)
    message = str(refused.value)
    assert message.startswith(f"tiny [{key}]: {ENGINES[key].label}'s output differs from eager PyTorch's by up to 0.01")
    assert message.endswith("not timed.") and message.count(". ") == 0
    # The same forward within the tolerance passes.
    same = dataclasses.replace(ENGINES[key], wrap=f"{__name__}:_same")
    assert same.runner(tiny_runner(), batch=2).max_abs_diff == 0.0


def _same(eager: Runner, batch: int, device: str = "cpu") -> Runner:
    return dataclasses.replace(eager)


def test_an_engine_that_cannot_run_a_model_is_refused_and_left_out(monkeypatch):
    broken = dataclasses.replace(COMPILED, wrap=f"{__name__}:_cannot")
    with pytest.raises(EngineRefused, match=r"^tiny does not run under torch.compile \(inductor\): "
                                            r"RuntimeError: no kernel for this\.$"):
        broken.runner(tiny_runner(), batch=1)
    # Through the table: the eager runner stays and is timed; the refused one is one sentence.
    monkeypatch.setitem(ENGINES, COMPILED.key, broken)
    runners, notes = engine_runners(["compile", "eager"], [tiny_runner()], batch=1)
    assert [r.name for r in runners] == ["tiny"] and len(notes) == 1 and "no kernel for this" in notes[0]


def _cannot(eager: Runner, batch: int, device: str = "cpu") -> Runner:
    raise RuntimeError("no kernel for this")


def test_fused_kernels_are_classed_by_the_ops_their_names_list():
    assert B.fused_kernel_ops("graph_0_cpp_fused__softmax_mul_2") == ["_softmax", "mul"]
    assert B.fused_kernel_class("graph_0_cpp_fused__softmax_mul_2") == B.SOFTMAX
    assert B.fused_kernel_class("graph_0_cpp_fused_add_native_layer_norm_view_4") == B.NORM
    assert B.fused_kernel_class("cpp_fused_gelu_view_3") == B.ELEMENTWISE
    assert B.fused_kernel_class("triton_poi_fused_clone_permute_1") == B.DATA
    assert B.fused_kernel_class("triton_red_fused_mean_5") == B.OTHER  # a reduction no class lists
    assert B.fused_kernel_class("cpp_fused_topk_2") == B.BOOKKEEPING
    assert B.fused_kernel_class("triton_tem_fused_mm_0") == B.COMPUTE  # a template runs the product itself
    assert B.fused_kernel_class("graph_0_cpp_fused_convolution_0") == B.DATA  # the operand copy of an extern conv
    assert B.fused_kernel_class("aten::addmm") is None and B.fused_kernel_class("Torch-Compiled Region: 0/0") is None
    rows = [OpRow("m", "graph_0_cpp_fused__softmax_mul_0", B.OTHER, B.REST, ms=2.0, calls=1),
            OpRow("m", "addmm", B.COMPUTE, B.REST, ms=6.0, calls=2),
            OpRow("m", "## Call CompiledFxGraph fabc123 ##", B.OTHER, B.REST, ms=0.5, calls=1),
            OpRow("m", "## Call CompiledFxGraph fdef456 ##", B.OTHER, B.REST, ms=0.5, calls=1),
            OpRow("m", B.OVERHEAD_OP, B.OTHER, B.REST, ms=1.0, calls=0)]
    costs = {(B.COMPUTE, "attention"): [300.0, 30.0], (B.COMPUTE, "FFN"): [100.0, 10.0], (B.SOFTMAX, "attention"): [50.0, 8.0]}
    out = {r.op: r for r in compiled_rows(rows, costs)}
    assert out["graph_0_cpp_fused__softmax_mul_0"].op_class == B.SOFTMAX
    assert out["Call CompiledFxGraph"].ms == 1.0 and out["Call CompiledFxGraph"].calls == 2
    assert {r.component for r in out.values()} == {WHOLE_FORWARD}
    # The eager forward's FLOPs and bytes per class go to that class's operators.
    assert (out["addmm"].flops, out["addmm"].bytes) == (400.0, 40.0)
    assert (out["graph_0_cpp_fused__softmax_mul_0"].flops, out[B.OVERHEAD_OP].flops) == (50.0, 0.0)
    assert sum(r.ms for r in out.values()) == pytest.approx(sum(r.ms for r in rows))


def test_compile_is_checked_timed_interleaved_with_eager_and_profiled_by_its_fused_kernels():
    """The one compile of the suite (a tiny module): equal to eager, wrong -> refused, interleaved rounds, and a
    profile whose fused kernels carry the classes of the operators they fuse."""
    import torch._inductor.config as inductor

    eager = tiny_runner()
    with inductor.patch(compile_threads=1):  # no pool of compile workers to start for one small graph
        runners, notes = engine_runners(["eager", "compile"], [eager], batch=2)
    assert notes == [] and [r.name for r in runners] == ["tiny", "tiny [compile]"]
    compiled = runners[1]
    assert compiled.engine == "compile" and compiled.reference is eager and compiled.max_abs_diff <= 1e-4
    assert compiled.flops_per_image == eager.flops_per_image > 0  # the eager count: the same math
    copy = compiled.forward.compiled._orig_mod  # a private copy was compiled; the eager module is untouched
    assert copy is not eager.forward and next(copy.parameters()) is not next(eager.forward.parameters())

    wrong = dataclasses.replace(compiled, forward=lambda x: compiled.forward(x) + 1e-2)
    with pytest.raises(EngineMismatch, match=r"^tiny \[compile\]: torch.compile \(inductor\)'s output differs"):
        COMPILED.prove_same(wrong, eager, 2)

    order = []
    rows = benchmark(runners, BenchSettings(batch=2, iters=1, rounds=2, warmup=1), baseline="tiny",
                     on_measure=lambda model, batch, round_index, img_s: order.append(model))
    assert order == ["tiny", "tiny [compile]"] * 2  # the same rounds, interleaved
    assert [r.environment["engine"] for r in rows] == ["eager", "compile"]
    [gain] = over_eager(rows)
    assert variant_of(gain) == "tiny" and gain.baseline == "tiny" and gain.speedup > 0 and gain.speedup_q1 is not None
    assert within_engines(rows, "tiny") == []  # only one variant per engine

    b = profile_compiled_runner(eager, 2, iters=1, warmup=1, compiled=compiled)
    fused = [r for r in b.ops if "cpp_fused" in r.op or "triton_" in r.op]
    assert fused and all(r.op_class != B.OTHER or "mean" in r.op for r in fused)
    assert {B.NORM, B.SOFTMAX} & {r.op_class for r in fused}
    assert {r.component for r in b.ops} == {WHOLE_FORWARD} and b.engine == "compile"
    assert "fused kernels classed by the ops their names list" in b.note
    assert sum(r.flops for r in b.ops if r.op_class == B.COMPUTE) == pytest.approx(
        sum(f for (kind, _), (f, _) in B.count_costs(eager.forward, eager.make_inputs(2)).items()
            if kind == B.COMPUTE))
