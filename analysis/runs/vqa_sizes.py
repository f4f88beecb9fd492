"""The models a vision-language frontier's variants run on, by input size: the one place a variant is mapped to its
model and to the inputs at its size.

A variant at another input size (``NAME@size=320``, ``NAME@pumer,size=320``) runs on the model and processor loaded
at that size (``models/``' loaders: METER's position embedding resized from the checkpoint, ViLT's processor
resizing to that side), loaded once per size; every other variant runs on the model at the entry's default size,
the reference (key None) that agreement and drops refer to. The questions' images are processed at every size as
each batch is built (``QuestionImages.with_processors``), so no size's pixels are kept beyond the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from analysis.data.questions import QuestionImages
from analysis.runs.vqa_points import VQAVariant
from models.variants import forward_for, parse_variant

# size (None: the default) -> (model, processor): a loader of models/ at that input size
Loader = Callable[[int | None], tuple[torch.nn.Module, Callable]]


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def variant_forward(model: torch.nn.Module, model_name: str, variant: VQAVariant) -> Callable[[dict], torch.Tensor]:
    """The logits of ``variant`` for a dict of the processor's inputs; the model itself is never changed."""
    forward = forward_for(model, model_name, parse_variant(variant.name))
    if forward is model:  # no explicit forward for the family: the model's own call, which takes keywords
        return lambda inputs: _logits(model(**inputs))
    return lambda inputs: _logits(forward(inputs))


def input_size(variant: VQAVariant) -> int | None:
    """The input size the variant asks for (``size=``); None: the model's default."""
    return parse_variant(variant.name).input_size


@dataclass(frozen=True)
class SizedVariant:
    """A variant bound to the model at its size: ``forward`` takes the inputs at ``size`` (None: the default)."""

    variant: VQAVariant
    size: int | None
    model: torch.nn.Module
    forward: Callable[[dict], torch.Tensor]

    def __call__(self, inputs_by_size: Mapping[int | None, dict]) -> torch.Tensor:
        """The logits for a batch's inputs by size (``QuestionImages.collate``)."""
        return self.forward(inputs_by_size[self.size])


@dataclass(frozen=True)
class ModelsAtSizes:
    """The model and its processor at each input size the variants ask for; None: the default size (reference)."""

    models: dict[int | None, torch.nn.Module]
    processors: dict[int | None, Callable]
    default_size: int | None = None  # the size the reference is at, where known: a variant at it shares the reference

    @classmethod
    def single(cls, model: torch.nn.Module, processor: Callable) -> "ModelsAtSizes":
        """One model and processor at their default size (variants without ``size=``)."""
        return cls({None: model}, {None: processor})

    @classmethod
    def load(cls, variants: Sequence[VQAVariant], load: Loader, device: str | torch.device | None = None,
             default_size: int | None = None) -> "ModelsAtSizes":
        """``load(None)``: the reference at the default size (``default_size`` px, where known); ``load(size)`` once
        per other size the variants ask for; each model moved to ``device`` (a no-op where it is there)."""
        models, processors = {}, {}
        sizes = dict.fromkeys(s if s != default_size else None for s in map(input_size, variants))
        for size in (None, *(s for s in sizes if s is not None)):
            model, processor = load(size)
            models[size], processors[size] = (model.to(device) if device is not None else model), processor
        return cls(models, processors, default_size)

    @property
    def reference(self) -> torch.nn.Module:
        return self.models[None]

    def key(self, variant: VQAVariant) -> int | None:
        size = input_size(variant)
        key = None if size == self.default_size else size
        if key not in self.models:
            raise ValueError(f"{variant.name} runs at {size} px, and no model was loaded at that size: "
                             "load the frontier's models with ModelsAtSizes.load over its variants.")
        return key

    def bind(self, variant: VQAVariant, model_name: str) -> SizedVariant:
        key = self.key(variant)
        model = self.models[key]
        return SizedVariant(variant, key, model, variant_forward(model, model_name, variant))

    def questions(self, dataset: QuestionImages) -> QuestionImages:
        """``dataset`` processed at every size here."""
        return dataset.with_processors(self.processors)
