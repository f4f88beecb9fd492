"""Inputs for the page and the CLI: a labelled image folder, batches, the digest a cached score is keyed by."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from analysis.data.images import folder_class_labels, load_folder


def labelled_folder(folder, limit: int | None = None):
    """Images under ``folder/<class>/...`` with the ImageNet index of their class sub-folder.

    Returns (images, labels, messages); files directly in ``folder`` and unreadable files are skipped
    with a message; a sub-folder that names no ImageNet class raises ValueError.
    """
    from pathlib import Path


    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    found, messages = load_folder(root)
    images, labels = [], []
    for image, label in zip(found, folder_class_labels([image.name for image in found])):
        if label is None:
            messages.append(f"{image.name}: not inside a class sub-folder, skipped.")
            continue
        images.append(image)
        labels.append(label)
    if limit is not None and len(images) > limit:
        messages.append(f"Using {limit} of {len(images)} images.")
        images, labels = images[:limit], labels[:limit]
    return images, labels, messages


def split_batches(x: torch.Tensor, labels: Sequence[int] | torch.Tensor | None, batch_size: int) -> list[tuple]:
    """(x, y) chunks of at most ``batch_size`` images, y a tensor of class indices, None when there are no labels."""
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return [(x[i:i + batch_size], None if y is None else y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def inputs_digest(x: torch.Tensor, labels: Sequence[int] | None = None) -> str:
    """A SHA-256 of the images' pixels and the labels: what a cached score is keyed by."""
    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(repr([int(label) for label in labels]).encode())
    return digest.hexdigest()
