"""How long each page takes to answer its main interaction, driven as a user would with Streamlit's AppTest.

    python -m analysis.bench.pages [--quick]

Real DeiT-Tiny weights are used from $VITLAB_WEIGHTS_DIR (default ../shared/weights) when present, random
weights otherwise; images are ../shared/images/*.jpg (the bundled samples when absent). Each figure is the
wall time of one ``AppTest.run()`` after the named widget changed, with the page already warm (models loaded,
first result computed), which is what a user waits for after moving a slider. This is the one analysis module
that imports streamlit: it tests the app from outside.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
WARM_TARGET_S = 1.0


def _images() -> list[tuple[str, bytes, str]]:
    photos = sorted((SHARED / "images").glob("*.jpg"))[:5]
    return [(p.name, p.read_bytes(), "image/jpeg") for p in photos]


def _weights_env() -> bool:
    """Point the app at the real weights when they exist; True when they do."""
    folder = os.environ.get("VITLAB_WEIGHTS_DIR") or str(SHARED / "weights")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VITLAB_WEIGHTS_DIR"] = folder
    return (Path(folder) / "deit_tiny_patch16_224.safetensors").is_file()


_CPU: list[float] = []  # CPU seconds of the process during the last timed run (all threads)


def _timed(app, change: Callable[[], None]) -> float:
    change()
    start, cpu = time.perf_counter(), time.process_time()
    app.run()
    elapsed = time.perf_counter() - start
    _CPU[:] = [time.process_time() - cpu]
    if app.exception:
        raise RuntimeError(f"the page raised: {app.exception[0].value}")
    return elapsed


def _page(name: str):
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / "pages" / f"{name}.py"), default_timeout=600)


def _row(figure: str, seconds: float, target: float | None, detail: str) -> dict:
    return {"figure": figure, "value": round(seconds, 3), "unit": "s",
            "target": f"< {target:g} s" if target else "", "passed": None if target is None else seconds < target,
            "detail": detail}


def bench_token_reduction(real: bool, quick: bool) -> list[dict]:
    app = _page("token_reduction")
    if not real:
        app.session_state["tr_random"] = True
    app.run()
    images = _images()
    first = _timed(app, lambda: app.file_uploader(key="tr_images").set_value(images)) if images else 0.0
    what = f"DeiT-Tiny ({'real' if real else 'random'} weights), {len(images) or 2} images"
    rows = [_row(f"Token reduction: first view of new images, {what}", first, None, "cold: 3 forwards")]
    settings = [("tr_rho", 0.6), ("tr_r", 8)] if quick else [("tr_rho", 0.6), ("tr_r", 8), ("tr_rho", 0.5),
                                                              ("tr_r", 16), ("tr_rho", 0.6)]
    for key, value in settings:
        seconds = _timed(app, lambda key=key, value=value: app.slider(key=key).set_value(value))
        label = "keep ratio" if key == "tr_rho" else "ToMe r"
        rows.append(_row(f"Token reduction: {label} -> {value}, {what}", seconds, WARM_TARGET_S,
                         f"slider to updated maps, warm; {_CPU[0]:.2f} s CPU"))
    return rows


def bench_head_redundancy(real: bool, quick: bool) -> list[dict]:
    app = _page("head_redundancy")
    app.session_state["hr_models"] = ["deit_tiny_patch16_224"]
    app.session_state["hr_max_images"] = 2 if quick else 5
    if not real:
        app.session_state["hr_random_models"] = ["deit_tiny_patch16_224"]
    start = time.perf_counter()
    app.run()
    first = time.perf_counter() - start
    block = _timed(app, lambda: app.slider(key="hr_block").set_value(3))
    block_cpu = _CPU[0]
    metric = _timed(app, lambda: app.radio(key="hr_metric").set_value("head outputs (linear CKA)"))
    return [_row("Head redundancy: first analysis, DeiT-Tiny", first, None, "cold: record attention"),
            _row("Head redundancy: block slider", block, None, f"attention maps of one block; {block_cpu:.2f} s CPU"),
            _row("Head redundancy: similarity metric", metric, None,
                 f"charts redrawn from the stored result; {_CPU[0]:.2f} s CPU")]


def bench_channel_importance(real: bool, quick: bool) -> list[dict]:
    app = _page("channel_importance")
    if not real:
        app.session_state["ci_random"] = True
    start = time.perf_counter()
    app.run()
    first = time.perf_counter() - start
    budget = _timed(app, lambda: app.slider(key="ci_budget").set_value(0.3))
    return [_row("Channel importance: first scoring, DeiT-Tiny, 2 sample photos", first, None, "cold"),
            _row("Channel importance: budget slider", budget, None, f"re-ranks the stored scores; {_CPU[0]:.2f} s CPU")]


def bench_vision_language(quick: bool) -> list[dict]:
    app = _page("vision_language")
    app.session_state["vl_random_vilt_b32_vqa"] = True
    start = time.perf_counter()
    app.run()
    first = time.perf_counter() - start
    prune = _timed(app, lambda: app.slider(key="vl_prune_vilt_b32_vqa").set_value(0.2))
    return [_row("Vision-language: first answer, small random ViLT", first, None, "answer, trace and timing"),
            _row("Vision-language: prune ratio slider", prune, None,
                 f"reruns PuMer and its timing; {_CPU[0]:.2f} s CPU")]


def bench_throughput(quick: bool) -> list[dict]:
    app = _page("throughput")
    app.run()
    app.multiselect(key="tp_models").set_value(["efficientvit_m0"])
    app.number_input(key="tp_batch").set_value(1)
    app.number_input(key="tp_iters").set_value(1)
    app.number_input(key="tp_rounds").set_value(1)
    app.run()
    run = _timed(app, lambda: app.button(key="tp_run").click())
    rerun = _timed(app, lambda: app.checkbox(key="tp_channels_last").check())
    if not app.dataframe:
        raise RuntimeError("the throughput results were lost on a rerun")
    return [_row("Live throughput: one tiny benchmark (efficientvit_m0, batch 1)", run, None, "press Run"),
            _row("Live throughput: another widget after a run", rerun, WARM_TARGET_S, "results stay, nothing reruns")]


def measure(quick: bool = False, progress=None) -> list[dict]:
    real = _weights_env()
    steps = [("token reduction", lambda: bench_token_reduction(real, quick)),
             ("head redundancy", lambda: bench_head_redundancy(real, quick)),
             ("channel importance", lambda: bench_channel_importance(real, quick)),
             ("vision-language", lambda: bench_vision_language(quick)),
             ("throughput", lambda: bench_throughput(quick))]
    rows: list[dict] = []
    for index, (name, step) in enumerate(steps):
        if progress:
            progress(index / len(steps), f"page {index + 1}/{len(steps)}: {name}")
        rows += step()
    if progress:
        progress(1.0, "done")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Seconds each page takes to answer its main interaction.")
    parser.add_argument("--quick", action="store_true", help="fewer interactions and images")
    parser.add_argument("--page", choices=["token_reduction", "head_redundancy", "channel_importance",
                                           "vision_language", "throughput"], help="only this page")
    args = parser.parse_args(argv)
    real = _weights_env()
    if args.page:
        bench = {"token_reduction": lambda: bench_token_reduction(real, args.quick),
                 "head_redundancy": lambda: bench_head_redundancy(real, args.quick),
                 "channel_importance": lambda: bench_channel_importance(real, args.quick),
                 "vision_language": lambda: bench_vision_language(args.quick),
                 "throughput": lambda: bench_throughput(args.quick)}[args.page]
        rows = bench()
    else:
        rows = measure(args.quick)
    for row in rows:
        verdict = "" if row["passed"] is None else ("  ok" if row["passed"] else "  SLOW")
        print(f"{row['value']:7.2f} s  {row['figure']}  [{row['detail']}]{' target ' + row['target'] if row['target'] else ''}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
