"""Train DynamicViT score predictors on a folder of images, distilling from the frozen backbone.

    python -m analysis.train_dynamicvit --backbone deit_small_patch16_224 --data FOLDER \
        [--backbone-weights FILE.safetensors] [--keep-ratio 0.7] [--epochs N] [--steps N] [--batch N] \
        [--lr LR] [--finetune-backbone] [--device cpu|cuda] --out ckpt.pth

Labels come from class sub-folders named by an ImageNet synset id (n01440764) or a class index (0-999);
images anywhere else are labelled with the teacher's top-1. The checkpoint is written in the official
format, ``{'model': state_dict}``, plus a ``'vitlab'`` metadata entry that the loader ignores.

Backbones: a timm DeiT/ViT (DynamicViT), ConvNeXt (DynamicCNN) or Swin (DynamicSwin) from the registry. The
hierarchical ones train the official two-stream forward with its loss (ratio weight 10, feature-map MSE) and
their new fast paths along with the predictors; their checkpoints use the official key names.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from analysis.data.folders import NO_LABEL, FolderImages, collate_readable, list_image_files
from analysis.data.images import ACCEPTED_TYPES, folder_class_labels
from models import dynamic_convnext, dynamic_swin
from models.checkpoints import CheckpointError
from models.dynamic_zoo import hierarchical_loss
from models.dynamicvit import (dynamicvit_from_backbone, dynamicvit_loss, dynamicvit_train_forward,
                               mean_keep_per_stage, teacher_outputs)
from models.loading import load_model

TEACHER_LABEL = NO_LABEL  # marks an image whose label is the teacher's top-1
BACKBONE_LR_SCALE = 0.01  # official recipe: the backbone learns 100x slower than the predictors
NEW_MODULES = ("score_predictor", "fast_path", "fastmlp")  # parameters DynamicViT adds to a backbone


class Recipe(NamedTuple):
    """How one family trains: forward, the teacher's targets, loss, checkpoint layout, backbone learning-rate scale."""

    train_forward: Callable
    teacher_outputs: Callable
    loss: Callable
    state_dict: Callable
    backbone_lr_scale: float


RECIPES = {
    "deit": Recipe(dynamicvit_train_forward, teacher_outputs, dynamicvit_loss, lambda m: m.state_dict(),
                   BACKBONE_LR_SCALE),
    "convnext": Recipe(dynamic_convnext.convnext_train_forward, dynamic_convnext.convnext_features_for_distillation,
                       hierarchical_loss, dynamic_convnext.official_state_dict, 0.2),
    "swin": Recipe(dynamic_swin.swin_train_forward, dynamic_swin.swin_features_for_distillation, hierarchical_loss,
                   dynamic_swin.official_state_dict, 0.2),
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def teacher_fallback_labels(files: Sequence[Path], num_classes: int) -> list[int]:
    """Each file's class sub-folder label (ImageNet index, WordNet id or class name); TEACHER_LABEL where it
    has no sub-folder, the sub-folder names no class, or the model has fewer classes."""
    return [TEACHER_LABEL if label is None or label >= num_classes else label
            for label in folder_class_labels(files, strict=False)]


def label_of_folder(name: str | None, num_classes: int) -> int:
    """The label of one class sub-folder name; TEACHER_LABEL when there is none."""
    return teacher_fallback_labels([Path(name or "", "image")], num_classes)[0]


def folder_dataset(folder: str | Path, transform: Callable, num_classes: int) -> FolderImages:
    """Every image under ``folder`` with its label from its class sub-folder, or TEACHER_LABEL."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder.")
    files = list_image_files(root)
    return FolderImages(root, files, transform, teacher_fallback_labels(files, num_classes))


# ---------------------------------------------------------------------------------------------
# Models and one training step
# ---------------------------------------------------------------------------------------------
def load_backbone(name: str, weights: str | Path | None) -> nn.Module:
    """A registry ViT with pretrained weights through the one resolver: ``weights`` if given, else
    $VITLAB_WEIGHTS_DIR, the Hugging Face cache or hub (WeightsNotFoundError says where to put the file)."""
    return load_model(name, user_file=weights).model


def frozen_teacher(backbone: nn.Module) -> nn.Module:
    """A deep copy of the backbone in eval mode with gradients off: the distillation target."""
    teacher = copy.deepcopy(backbone).eval()
    teacher.requires_grad_(False)
    return teacher


def family_of(model: nn.Module) -> str:
    if isinstance(model, dynamic_convnext.ConvNeXt):
        return "convnext"
    if isinstance(model, dynamic_swin.SwinTransformer):
        return "swin"
    return "deit"


def student_for(backbone: nn.Module) -> nn.Module:
    """The DynamicViT model of the backbone's family: a copy of its weights plus fresh predictors (and fast paths)."""
    family = family_of(backbone)
    if family == "convnext":
        depth = len(backbone.stages[dynamic_convnext.PRUNED_STAGE].blocks)
        return dynamic_convnext.dynamic_convnext_from_backbone(
            backbone, dynamic_convnext.official_pruning_locations(depth))
    if family == "swin":
        depth = len(backbone.layers[dynamic_swin.PRUNED_STAGE].blocks)
        return dynamic_swin.dynamic_swin_from_backbone(backbone, dynamic_swin.official_pruning_locations(depth))
    return dynamicvit_from_backbone(backbone)


def trainable_parameter_groups(model: nn.Module, finetune_backbone: bool, lr: float) -> list[dict]:
    """Added modules (predictors, fast paths) at ``lr``; the backbone frozen, or at lr * the family's scale."""
    new = [p for name, p in model.named_parameters() if any(part in name for part in NEW_MODULES)]
    new_ids = {id(p) for p in new}
    backbone = [p for p in model.parameters() if id(p) not in new_ids]
    for p in backbone:
        p.requires_grad_(finetune_backbone)
    groups = [{"params": new, "lr": lr}]
    if finetune_backbone:
        groups.append({"params": backbone, "lr": lr * RECIPES[family_of(model)].backbone_lr_scale})
    return groups


def train_step(model: nn.Module, teacher: nn.Module, batch: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, keep_ratio: float, tau: float = 1.0) -> dict[str, float]:
    """One optimisation step of the family's DynamicViT loss; TEACHER_LABEL entries take the teacher's top-1.

    Returns the loss parts as floats and the mean kept fraction per stage (``keep_0``, ``keep_1``, ...).
    """
    recipe = RECIPES[family_of(model)]
    with torch.no_grad():
        teacher_logits, teacher_targets = recipe.teacher_outputs(teacher, batch)
    labels = torch.where(labels == TEACHER_LABEL, teacher_logits.argmax(dim=-1), labels)
    output = recipe.train_forward(model, batch, tau=tau, keep_ratio=keep_ratio)
    total, parts = recipe.loss(output, labels, teacher_logits, teacher_targets)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    stats = {"loss": float(total.detach()), **{k: float(v) for k, v in parts.items()}}
    stats.update({f"keep_{s}": v for s, v in enumerate(mean_keep_per_stage(output))})
    return stats


def format_step(step: int, total_steps: int | None, stats: dict[str, float]) -> str:
    """One progress line: loss, its parts and the mean keep ratio per stage."""
    keeps = "/".join(f"{v:.3f}" for k, v in stats.items() if k.startswith("keep_"))
    of = f"/{total_steps}" if total_steps else ""
    return (f"step {step}{of}  loss {stats['loss']:.4f}  (ce {stats['ce']:.4f}  ratio {stats['ratio']:.4f}  "
            f"kl {stats['kl']:.4f}  token {stats['token_mse']:.4f})  keep {keeps}")


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict) -> Path:
    """Write ``{'model': state_dict, 'vitlab': metadata}`` (official layout; plain types, so weights_only loads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in RECIPES[family_of(model)].state_dict(model).items()}
    torch.save({"model": state, "vitlab": metadata}, path)
    return path


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.train_dynamicvit", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="deit_small_patch16_224",
                        help="registry name of a timm DeiT/ViT, ConvNeXt (convnext_tiny ...) or Swin (swin_tiny_patch4_window7_224 ...)")
    parser.add_argument("--data", required=True, help="folder of images (recursive; class sub-folders optional)")
    parser.add_argument("--backbone-weights", default=None, help="local .safetensors/.pth weights of the backbone")
    parser.add_argument("--keep-ratio", type=float, default=0.7, help="rho: DeiT stages keep rho, rho^2, rho^3; ConvNeXt/Swin rho, rho-0.2, rho-0.4")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps in total")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="predictor learning rate (backbone: lr * 0.01)")
    parser.add_argument("--tau", type=float, default=1.0, help="Gumbel-softmax temperature")
    parser.add_argument("--finetune-backbone", action="store_true", help="also train the backbone")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint to write (.pth)")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Train as ``args`` say and write the checkpoint; returns its path."""
    import timm.data

    torch.manual_seed(args.seed)
    if not 0.0 < args.keep_ratio <= 1.0:
        raise ValueError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}.")
    device = torch.device(args.device)
    backbone = load_backbone(args.backbone, args.backbone_weights)
    teacher = frozen_teacher(backbone).to(device)
    model = student_for(backbone).to(device).train()
    optimizer = torch.optim.AdamW(trainable_parameter_groups(model, args.finetune_backbone, args.lr), weight_decay=0.05)

    # The model's own input size wins over its pretrained config (a backbone built at another img_size).
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    overrides = {"input_size": (3, *img_size)} if img_size else {}
    data_config = timm.data.resolve_data_config(overrides, model=backbone)
    dataset = folder_dataset(args.data, timm.data.create_transform(**data_config, is_training=True), model.num_classes)
    if not len(dataset):
        raise FileNotFoundError(f"No images ({', '.join(ACCEPTED_TYPES)}) under {args.data}.")
    labelled = sum(label != TEACHER_LABEL for label in dataset.labels)
    print(f"{len(dataset)} images: {labelled} labelled by class folder, {len(dataset) - labelled} by the teacher's top-1")
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        collate_fn=collate_readable, drop_last=False)

    step, skipped = 0, 0
    for _ in range(args.epochs):
        for batch in loader:
            skipped += len(batch.corrupt)
            if batch.images.numel() == 0:
                continue
            stats = train_step(model, teacher, batch.images.to(device), batch.labels.to(device), optimizer,
                               args.keep_ratio, tau=args.tau)
            step += 1
            print(format_step(step, args.steps, stats), flush=True)
            if args.steps is not None and step >= args.steps:
                break
        if args.steps is not None and step >= args.steps:
            break
    if skipped:
        print(f"skipped {skipped} unreadable image(s)")
    metadata = {"backbone": args.backbone, "keep_ratio": float(args.keep_ratio), "steps": step,
                "pruning_locations": list(model.pruning_locations), "finetune_backbone": bool(args.finetune_backbone)}
    path = save_checkpoint(model, args.out, metadata)
    print(f"wrote {path} after {step} steps")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, RuntimeError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
