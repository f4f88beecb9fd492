"""What the token-reduction comparison asks of any method's trace, answered once for every trace type.

A trace type (``ToMeTrace``, ``EViTTrace``, ``DynamicViTTrace``, ``DynamicStageTrace``) derives from
``ReductionTrace`` and overrides only the fact it answers differently: ToMe counts merged tokens, a structured
DynamicViT trace (ConvNeXt, Swin) keeps its feature map whole.
"""
from __future__ import annotations

from typing import Sequence


class ReductionTrace:
    """The facts of a trace. By default a trace records ``tokens_per_block`` (what enters each block) and drops
    or fuses tokens (not ``structured``)."""

    structured = False  # whether the feature map stays whole (a position takes a block's full or fast path)

    def counts_per_block(self, unreduced: Sequence[int]) -> list[int]:
        """Per block: tokens entering it (CLS included) or, for a structured trace, the positions that take its
        full path. ``unreduced`` is what enters each block without reduction."""
        return list(self.tokens_per_block)
