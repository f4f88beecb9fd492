"""How far ToMe's predictions stay from the unreduced model's as r grows: a sweep, a chart and a CLI.

Agreement is measured against the same model without merging on the same images (no labels are
needed): top-1 agreement is the fraction of images whose top-1 class is unchanged, top-5 overlap
the mean fraction of the unreduced top-5 classes that ToMe's top-5 still contains.

CLI::

    python -m analysis.tome_agreement --weights ../shared/weights/deit_tiny_patch16_224.safetensors \
        --images ../shared/images [--include-samples] [--r-max 16] [--out table.csv]
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analysis.data.images import load_folder, sample_images, to_batch
from analysis.provenance import figure_title
from analysis.timing.flops import measure_flops
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.loading import load_model
from models.tome import merge_schedule, tome_forward
from models.vit_forward import token_count



@dataclass(frozen=True)
class AgreementRow:
    """One r of the sweep: agreement with the unreduced model, tokens left, and cost per image."""

    r: int
    top1_agreement: float
    top5_overlap_mean: float
    tokens_after_last_layer: int
    gflops_per_image: float


def count_gflops(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``run()``'s output and its GFLOPs (2 per multiply-add), fused CPU attention included."""
    output, flops = measure_flops(run)
    return output, flops / 1e9


def top1_agreement(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same in both logit tensors."""
    return (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()


def top5_overlap(reference: torch.Tensor, logits: torch.Tensor, k: int = 5) -> float:
    """Mean fraction of the reference top-k classes that are also in the other top-k."""
    k = min(k, reference.shape[-1])
    ref_top, top = reference.topk(k, dim=-1).indices, logits.topk(k, dim=-1).indices
    shared = (ref_top.unsqueeze(-1) == top.unsqueeze(-2)).any(-1).sum(-1)
    return (shared.float() / k).mean().item()


def agreement_sweep(
    model: torch.nn.Module,
    batch: torch.Tensor,
    r_values: Iterable[int] = range(0, 17),
    proportional_attention: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> list[AgreementRow]:
    """For each r, compare ToMe's predictions on ``batch`` with the unreduced model's.

    ``progress(fraction, message)`` is called after each r (for a progress bar). The model is only read.
    """
    r_values = list(r_values)
    images = batch.shape[0]
    num_tokens = token_count(model)
    rows = []
    with torch.inference_mode():
        reference, _ = count_gflops(lambda: model(batch))
        for done, r in enumerate(r_values, start=1):
            logits, gflops = count_gflops(
                lambda: tome_forward(model, batch, r=r, proportional_attention=proportional_attention)
            )
            schedule = merge_schedule(r, len(model.blocks), num_tokens, model.num_prefix_tokens)
            rows.append(
                AgreementRow(
                    r=int(r),
                    top1_agreement=top1_agreement(reference, logits),
                    top5_overlap_mean=top5_overlap(reference, logits),
                    tokens_after_last_layer=num_tokens - sum(schedule),
                    gflops_per_image=gflops / images,
                )
            )
            if progress is not None:
                progress(done / len(r_values), f"r = {r} ({done}/{len(r_values)})")
    return rows


def rows_to_frame(rows: Sequence[AgreementRow]) -> pd.DataFrame:
    """The sweep as a table (one row per r), for display and CSV download."""
    return pd.DataFrame([asdict(row) for row in rows])


def _round_step(raw: float) -> int:
    """The round number (1, 2, 5, 10, 20, ...) nearest above ``raw``, for axis ticks."""
    magnitude = 10 ** max(0, len(str(int(raw))) - 1)
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def plot_agreement(rows: Sequence[AgreementRow] | pd.DataFrame,
                   title: str = "ToMe: agreement with the unreduced model", x: str = "r",
                   x_title: str = "r (tokens merged per block)", tokens: str = "tokens_after_last_layer",
                   tokens_name: str = "tokens after last block") -> go.Figure:
    """Top-1 agreement and top-5 overlap against the swept setting (``x``: ToMe's r for ``AgreementRow``s; any
    column of a frame), with the tokens left on a second axis."""
    frame = rows if isinstance(rows, pd.DataFrame) else rows_to_frame(rows)
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(go.Scatter(x=frame[x], y=frame.top1_agreement, name="top-1 agreement", mode="lines+markers"))
    figure.add_trace(go.Scatter(x=frame[x], y=frame.top5_overlap_mean, name="top-5 overlap", mode="lines+markers"))
    figure.add_trace(
        go.Scatter(x=frame[x], y=frame[tokens], name=tokens_name, mode="lines", line=dict(dash="dot", color="gray")),
        secondary_y=True,
    )
    text, top = figure_title(title)
    figure.update_layout(title=text, margin=dict(t=top), legend=dict(orientation="h", y=-0.2),
                         hovermode="x unified")
    if pd.api.types.is_integer_dtype(frame[x]):
        step = max(1, _round_step(max(frame[x].max() - frame[x].min(), 1) / 8))
        figure.update_xaxes(title_text=x_title, tick0=0, dtick=step)
    else:  # a keep ratio: the most reduction on the right
        figure.update_xaxes(title_text=x_title, autorange="reversed")
    figure.update_yaxes(title_text="agreement", range=[0, 1.02], dtick=0.2, secondary_y=False)
    # Token counts are whole numbers: ticks at round steps (plotly's own aligned to the left axis gave 203.3).
    most = int(frame[tokens].max())
    figure.update_yaxes(title_text="tokens", range=[0, most * 1.02], tickmode="linear", tick0=0,
                        dtick=max(1, _round_step(most / 5)), tickformat="d", showgrid=False, secondary_y=True)
    return figure


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="registry name of a timm ViT/DeiT")
    parser.add_argument("--weights", type=Path, help="weights file (default: the resolver: $VITLAB_WEIGHTS_DIR, "
                                                     "Hugging Face cache/hub)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--include-samples", action="store_true", help="add scikit-learn's sample photos")
    parser.add_argument("--r-max", type=int, default=16, help="largest r in the sweep (from 0)")
    parser.add_argument("--no-proportional-attention", action="store_true")
    parser.add_argument("--out", type=Path, help="write the table as CSV")
    args = parser.parse_args(argv)


    if not args.images.is_dir():
        parser.error(f"image folder {args.images} not found")
    named, skipped = load_folder(args.images)
    for message in skipped:
        print(f"skipped: {message}")
    named += sample_images() if args.include_samples else []
    if not named:
        parser.error(f"no readable images in {args.images}")
    try:
        loaded = load_model(args.model, user_file=args.weights)
    except (WeightsNotFoundError, CheckpointError, KeyError) as exc:
        parser.error(str(exc.args[0] if exc.args else exc))
    model = loaded.model
    batch = to_batch(named, loaded.transform)
    rows = agreement_sweep(
        model, batch, range(0, args.r_max + 1), proportional_attention=not args.no_proportional_attention
    )
    frame = rows_to_frame(rows)
    print(f"{args.model} ({loaded.weights.description}), {len(named)} images: {', '.join(im.name for im in named)}")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
