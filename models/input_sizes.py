"""A vision-language model at a smaller input size (PuMer's "smaller input resolution" baseline), as a forward.

The size itself is chosen where the model and its processor are loaded (``NAME@size=320``: ``models.variants``
loads the entry at that size; METER's position embedding is resized as METER's own code resizes it, ViLT
interpolates its own to any patch grid). This forward runs the family's unreduced forward and refuses inputs that
are not at the size it is asked for, so that a variant never silently runs at another size.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def input_side(inputs: Mapping[str, torch.Tensor]) -> int:
    """The input size of a processed batch: the shorter side of its pixels (ViLT's processor resizes the shorter
    side; METER's crops a square)."""
    return int(min(inputs["pixel_values"].shape[-2:]))


def sized_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], input_size: int | None = None):
    """The unreduced forward (ViLT: the explicit encoder walk its other variants are timed against; METER: its own
    order) on ``inputs`` at ``input_size`` px. ValueError when the inputs or the model are at another size."""
    from models.meter_pumer import meter_pumer_forward
    from models.vilt_pumer import pumer_forward

    model_size = getattr(model.config, "image_size", None) if not hasattr(model, "vilt") else None
    if input_size is not None and input_side(inputs) != input_size or (
            input_size is not None and model_size is not None and model_size != input_size):
        raise ValueError(f"This variant runs at {input_size} px, but the inputs are {input_side(inputs)} px"
                         + (f" and the model is built for {model_size} px" if model_size else "")
                         + ": load the model and its processor at that size (NAME@size=...).")
    if hasattr(model, "vilt"):
        return pumer_forward(model, inputs, prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0)
    return meter_pumer_forward(model, inputs, prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0,
                               image_context="block_input")
