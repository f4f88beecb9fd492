"""The engine table: one record per way of running a model's forward, built like the method table
(``models.methods``). An engine says

- how it wraps a model: a function of the eager ``Runner``, the batch and the device that returns a runner of the
  same forward in that engine (``wrap``, a ``"module:function"`` resolved when used);
- how it proves it computes the same: its output on the same input equals eager PyTorch's within ``tolerance``
  (``prove_same``), else it is refused in one sentence (``EngineMismatch``); an engine that cannot run a model at all
  (no export, no compile) is refused in one sentence too (``EngineRefused``);
- how it is timed: its runners go to ``analysis.timing.harness`` with the eager ones, interleaved in the same rounds;
- how it is profiled: ``profile``, a ``"module:function(text, loaded, *, batch, device, iters, warmup, progress)"``
  resolved lazily (the profilers live in ``analysis.breakdown``, above this package).

Each engine also runs in its deployment form, BatchNorm folded into the convolutions (``ModelOptions.fuse_bn``, as
``--fuse-bn`` does), which applies to the eager model before any engine wraps it. Nothing outside this table names
an engine: callers loop over ``ENGINES`` or look one up by its key (``engine``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from analysis.timing.harness import Runner, count_flops, is_out_of_memory, quartiles
from models.registry import import_target


class EngineRefused(ValueError):
    """An engine cannot run a model here (it does not export or compile), in one sentence."""


class EngineMismatch(EngineRefused):
    """An engine's output differs from eager PyTorch's on the same input: it is not timed."""


@dataclass(frozen=True)
class Engine:
    key: str  # what --engine and the pages take
    label: str  # in words
    wrap: str | None  # "module:function(eager runner, batch, device) -> runner"; None: the eager runner itself
    profile: str  # "module:function(text, loaded, *, batch, device, iters, warmup, progress[, precision])"
    tolerance: float = 0.0  # max |engine - eager| on the same input, relative to max(1, max |eager|)
    one_batch: bool = False  # runs a graph made for one batch size: no batch sweep
    fp32_only: bool = False  # runs the fp32 model only (no autocast precision)
    warmup_note: str = ""  # what its first calls do, shown while it warms up
    help: str = ""  # one line for pages and --help

    @property
    def is_reference(self) -> bool:
        """Eager PyTorch: what every other engine is checked and compared against."""
        return self.wrap is None

    def tag(self, name: str) -> str:
        """A row's name: the variant, and the engine once (eager rows keep the bare variant name)."""
        return name if self.is_reference else f"{name} [{self.key}]"

    def profiler(self) -> Callable[..., Any]:
        return import_target(self.profile)

    def runner(self, eager: Runner, batch: int, device: str = "cpu") -> Runner:
        """The eager runner in this engine at ``batch``, proved equal to eager first; ``EngineRefused`` (one sentence)
        where the engine cannot run it or computes something else."""
        if self.is_reference:
            return eager
        try:
            wrapped = import_target(self.wrap)(eager, batch, device)
            wrapped = dataclasses.replace(wrapped, name=self.tag(eager.name), engine=self.key,
                                          warmup_note=self.warmup_note, reference=eager)
            wrapped.max_abs_diff = self.prove_same(wrapped, eager, batch)
        except EngineRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - a compiler's or exporter's failure of any kind becomes one sentence
            if is_out_of_memory(exc):
                raise
            raise EngineRefused(f"{eager.name} does not run under {self.label}: {_first_line(exc)}.") from exc
        return wrapped

    def prove_same(self, runner: Runner, eager: Runner, batch: int) -> float:
        """Max |engine - eager| on the same input (fp32, no autocast); ``EngineMismatch`` above the tolerance."""
        with torch.inference_mode():
            expected = _output(eager.forward(eager.make_inputs(batch)))
            got = _output(runner.forward(runner.make_inputs(batch)))
        if got.shape != expected.shape:
            raise EngineMismatch(f"{runner.name}: {self.label} returns shape {tuple(got.shape)}, eager PyTorch "
                                 f"{tuple(expected.shape)}; not timed.")
        diff = float((got - expected).abs().max()) if got.numel() else 0.0
        allowed = self.tolerance * max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
        if not diff <= allowed:
            raise EngineMismatch(f"{runner.name}: {self.label}'s output differs from eager PyTorch's by up to "
                                 f"{diff:.2g} on the same input (more than the {allowed:.2g} allowed); not timed.")
        return diff


def _output(out: Any) -> torch.Tensor:
    """The logits of a forward's output (a tensor, the first of a tuple or list, ``.logits``, a NumPy array)."""
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    return out.detach().float().cpu()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


EAGER = Engine(
    key="eager", label="eager PyTorch", wrap=None, profile="analysis.breakdown.eager:profile_eager",
    help="the model's forward as written, operator by operator; the reference every engine is checked against")
ENGINES: dict[str, Engine] = {e.key: e for e in (
    EAGER,
    Engine(key="compile", label="torch.compile (inductor)", wrap="analysis.timing.compile_engine:compiled_runner",
           profile="analysis.breakdown.compiled:profile_compiled", tolerance=1e-4, warmup_note="compiling",
           help="torch.compile with inductor on a private copy (fused C++/Triton kernels, static shapes: compiled "
                "once per batch size); refused unless it equals eager within 1e-4"),
    Engine(key="onnxruntime", label="ONNX Runtime", wrap="analysis.timing.onnx_engine:onnx_runner",
           profile="analysis.breakdown.onnx_runtime:profile_onnx", tolerance=1e-4, one_batch=True, fp32_only=True,
           warmup_note="exported to ONNX",
           help="the forward exported to ONNX at one batch size and run by ONNX Runtime (fp32); refused unless it "
                "equals eager within 1e-4"),
)}

COMPILED, ONNX_RUNTIME = ENGINES["compile"], ENGINES["onnxruntime"]  # for the code of the engines themselves


def engine(key: str) -> Engine:
    """The engine named ``key``; a ValueError listing the table's keys otherwise."""
    try:
        return ENGINES[key]
    except KeyError:
        raise ValueError(f"Unknown engine {key!r}: choose from {', '.join(ENGINES)}.") from None


def engines(keys: Sequence[str]) -> list[Engine]:
    """The engines named ``keys``, in table order, each once."""
    wanted = {engine(k).key for k in keys}
    return [e for e in ENGINES.values() if e.key in wanted]


def refuse_batches(keys: Sequence[str], several_batches: bool) -> str | None:
    """One sentence when an engine that runs one batch size is asked for a sweep of several; else None."""
    fixed = [e.label for e in engines(keys) if e.one_batch]
    if several_batches and fixed:
        return (f"{', '.join(fixed)} runs a graph made for one batch size: time one batch (or batch-1 latency), "
                "not a sweep of several.")
    return None


def engine_runners(keys: Sequence[str], eager_runners: Sequence[Runner], batch: int, device: str = "cpu",
                   progress: Callable[[float, str], None] | None = None) -> tuple[list[Runner], list[str]]:
    """Every eager runner under every engine in ``keys`` (table order, eager ones unchanged), to time interleaved in
    the same rounds, and one sentence per (model, engine) refused (it does not export, compile, or equal eager).

    The engine runners carry the eager runner's FLOPs (the same math; the counter cannot see inside a compiled
    graph or ONNX Runtime)."""
    chosen = engines(keys)
    out: list[Runner] = []
    notes: list[str] = []
    if any(not e.is_reference for e in chosen):
        for r in eager_runners:
            if r.flops_per_image is None:
                r.flops_per_image = count_flops(r)
    for e in chosen:
        for r in eager_runners:
            if e.is_reference:
                out.append(r)
                continue
            if progress:
                progress(0.0, f"{r.name}: {e.warmup_note or 'wrapping'} for {e.label}, checking it against eager")
            try:
                out.append(e.runner(r, batch, device))
            except EngineRefused as exc:
                notes.append(str(exc))
    return out, notes


def engine_of_row(row: Any) -> Engine:
    """The engine a timed row ran in (from its environment, ``analysis.timing.env.timing_environment``)."""
    return engine(getattr(row, "environment", {}).get("engine", EAGER.key))


# ------------------------------------------------------------------ speed-ups across engines
def _speed(row: Any) -> tuple[float, list[float]]:
    """(img/s of the median round, img/s of each round) of a throughput or latency row."""
    if hasattr(row, "img_per_s"):
        return row.img_per_s, list(row.rounds)
    return 1000.0 / row.median_ms, [1000.0 / ms for ms in row.rounds_ms]


def _against(row: Any, base: Any) -> Any:
    """A copy of ``row`` with its speed-up over ``base``: the ratio of the median rounds, and the interquartile
    range of the per-round ratios where the rounds pair up (they ran interleaved)."""
    (speed, rounds), (base_speed, base_rounds) = _speed(row), _speed(base)
    q1 = q3 = None
    if len(rounds) == len(base_rounds) and rounds:
        q1, q3 = quartiles([a / b for a, b in zip(rounds, base_rounds)])
    return dataclasses.replace(row, speedup=speed / base_speed, baseline=base.model, speedup_q1=q1, speedup_q3=q3)


def variant_of(row: Any) -> str:
    """The variant a timed row ran, without its engine."""
    tag = engine_of_row(row).tag("")
    return row.model[: len(row.model) - len(tag)] if tag and row.model.endswith(tag) else row.model


def _key(row: Any, model: str | None = None) -> tuple[str, int]:
    return (row.model if model is None else model), getattr(row, "batch", 1)


def over_eager(rows: Sequence[Any]) -> list[Any]:
    """Each row of another engine, with its speed-up over the same variant at the same batch in eager PyTorch
    (where eager ran)."""
    eager_rows = {_key(r): r for r in rows if engine_of_row(r).is_reference}
    return [_against(r, eager_rows[_key(r, variant_of(r))]) for r in rows
            if not engine_of_row(r).is_reference and _key(r, variant_of(r)) in eager_rows]


def within_engines(rows: Sequence[Any], baseline: str, include_reference: bool = False) -> list[Any]:
    """Each row of another engine (and eager's with ``include_reference``), with its speed-up over ``baseline`` (a
    variant) at the same batch in the same engine: whether a token-reduction variant keeps its speed-up there."""
    out = []
    for e in ENGINES.values():
        if e.is_reference and not include_reference:
            continue
        mine = [r for r in rows if engine_of_row(r).key == e.key]
        bases = {_key(r): r for r in mine if r.model == e.tag(baseline)}
        out += [_against(r, bases[_key(r, e.tag(baseline))]) for r in mine
                if r.model != e.tag(baseline) and _key(r, e.tag(baseline)) in bases]
    return out
