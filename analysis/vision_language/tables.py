"""Tables and the JSON record of a PuMer run: tokens per layer, reduce steps, answers, corrections."""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from analysis.vision_language.compute import FULL, image_cls_fates
from analysis.vision_language.records import PUMER, PuMerProtocol, PuMerResult
from models.vilt_pumer import PuMerTrace


# ----------------------------------------------------------------------------------------------- tables and records
def _column(layer_word: str) -> str:
    return layer_word.replace(" ", "_")


def counts_frame(trace: PuMerTrace, sample: int = 0, layer_word: str = "layer"):
    """Tokens entering each layer (fusion block) per modality (image CLS counted), and what leaves the last.
    The first column is named by ``layer_word``."""
    import pandas as pd

    layers = trace.text_counts.shape[1] - 1
    reduce_layers = {s.layer for s in trace.steps}
    return pd.DataFrame({
        _column(layer_word): [str(i) for i in range(layers)] + ["output"],
        "text_tokens": trace.text_counts[sample], "image_tokens": trace.image_counts[sample],
        "total_tokens": trace.text_counts[sample] + trace.image_counts[sample],
        "reduces_here": [i in reduce_layers for i in range(layers)] + [False],
    })


def steps_frame(trace: PuMerTrace, sample: int = 0, layer_word: str = "layer"):
    """One row per reduce layer: what came in, what was pruned and merged, which grid cells were pruned."""
    import pandas as pd

    return pd.DataFrame([{
        _column(layer_word): s.layer,
        "image_tokens_in": int(trace.image_counts[sample, s.layer]),
        "image_pruned": int(s.image_pruned[sample]), "image_merged": int(s.image_merged[sample]),
        "text_tokens_in": int(trace.text_counts[sample, s.layer]), "text_merged": int(s.text_merged[sample]),
        "pruned_cells": " ".join(map(str, s.pruned_cells[sample].tolist())),
    } for s in trace.steps])


def answers_frame(result: PuMerResult):
    import pandas as pd

    full, pumer = result.full_name, result.pumer_name
    return pd.DataFrame([{"rank": i + 1, f"{full} answer": fa, f"{full} score": round(fs, 4),
                          f"{pumer} answer": pa, f"{pumer} score": round(ps, 4)}
                         for i, ((fa, fs), (pa, ps)) in enumerate(zip(result.full_answers, result.pumer_answers))])


def corrections_frame(result: PuMerResult):
    """The run as set and each correction flipped: top answer, logit change, where the image CLS went at each
    reduce step, image tokens out, grid cells kept differently."""
    import pandas as pd

    def row(what, value, answers, change, fates, tokens_out, cells):
        answer, score = answers[0]
        return {"run": what, "value": str(value), "top answer": answer, "score": round(score, 4),
                "max |logit change|": round(change, 4),
                f"image CLS after each reduce {result.layer_word}": ", ".join(fates) or "-",
                "image tokens out": tokens_out, "cells kept differently": cells}

    rows = [row("as set", "", result.pumer_answers, 0.0, image_cls_fates(result.trace),
                int(result.trace.image_counts[0, -1]), 0)]
    rows += [row(e.label, e.value, e.answers, e.max_logit_change, e.image_cls, e.image_tokens_out,
                 e.cells_kept_differently) for e in result.corrections]
    return pd.DataFrame(rows)


def _finite_or_none(values: np.ndarray) -> list:
    return [None if not math.isfinite(v) else round(float(v), 6) for v in values]


def records_to_json(result: PuMerResult, sample: int = 0) -> dict:
    """Everything the page shows, as plain JSON types."""
    trace, column = result.trace, _column(result.layer_word)
    return {
        "question": result.question, "text_tokens": result.text_tokens, "layers_are": result.layer_word + "s",
        "input_pixels": list(result.input_shape),
        "settings": asdict(result.settings), "grid_shape": list(trace.grid_shape), "patch_size": result.patch_size,
        "answers": {"full": result.full_answers, "reduced": result.pumer_answers}, "method": PUMER,
        "speed": asdict(result.speed),
        "corrections": [asdict(e) for e in result.corrections],
        "image_cls": image_cls_fates(trace, sample),
        "tokens_per_layer": counts_frame(trace, sample, result.layer_word).to_dict(orient="records"),
        "reduce_steps": [{
            column: s.layer,
            "image_pruned": int(s.image_pruned[sample]), "image_merged": int(s.image_merged[sample]),
            "text_merged": int(s.text_merged[sample]),
            "pruned_cells": s.pruned_cells[sample].tolist(),
            "image_groups": s.image_groups[sample].tolist(),
            "text_groups": s.text_groups[sample][: len(result.text_tokens)].tolist(),
            "patch_scores": _finite_or_none(s.patch_scores[sample]),
        } for s in trace.steps],
    }


def protocol_frame(protocol: PuMerProtocol, full_name: str = "full", pumer_name: str = PUMER):
    """Every batch of the paper's protocol, both sides: samples/s (median and interquartile range over the rounds),
    speed-up, one forward's peak memory and its reduction, whether it is the reported batch."""
    import pandas as pd

    names = {FULL: full_name, PUMER: pumer_name}
    return pd.DataFrame([{
        "batch": r.batch, "model": names.get(r.model, r.model), "samples_per_s": round(r.img_per_s, 3),
        "samples_per_s_q1": round(r.img_per_s_q1, 3), "samples_per_s_q3": round(r.img_per_s_q3, 3),
        "speedup": None if r.speedup is None else round(r.speedup, 4),
        "peak_memory_mib": None if r.forward_peak_mib is None else round(r.forward_peak_mib, 2),
        "memory_reduction_pct": None if r.memory_reduction is None else round(100 * r.memory_reduction, 2),
        "reported": r.batch == protocol.best_batch, "note": r.note} for r in protocol.rows])


def protocol_to_json(protocol: PuMerProtocol) -> dict:
    """The protocol's settings, the reported batch's speed and memory, every row and the notes, as JSON types."""
    return {"protocol": {"start": protocol.start, "step": protocol.step, "time_limit_s": protocol.time_limit},
            "best_batch": protocol.best_batch, "speed": None if protocol.speed is None else asdict(protocol.speed),
            "rows": [asdict(r) for r in protocol.rows], "notes": list(protocol.notes)}
