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
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from analysis.data.images import load_folder, sample_images, to_batch
from analysis.token_reduction.metrics import AgreementRow, count_gflops, rows_to_frame, top1_agreement, top5_overlap
from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.loading import load_model
from models.tome import merge_schedule, tome_forward
from models.vit_forward import token_count


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
