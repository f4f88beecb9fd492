"""Runners from model names: a loaded model, its variant's forward and its inputs, prepared as a timing asks
(channels_last, BN fusion: the deployment form every engine of ``analysis.timing.engines`` wraps).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from analysis.timing.harness import Runner
from models.loading import LoadedModel, load_model
from models.registry import IMAGE_INPUTS, VQA_INPUTS
from models.variants import forward_for, parse_variant


# ------------------------------------------------------------------- runners for variant names
# ``models.variants`` says which forward a name runs; timing adds deployment options applied to a private copy
# and synthetic inputs of the model's input kind.
def _is_channels_last(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def image_inputs(loaded: LoadedModel) -> Callable[[int], torch.Tensor]:
    """Random images at the model's input size (in its memory format)."""
    channels, height, width = loaded.data_config["input_size"]
    memory_format = torch.channels_last if _is_channels_last(loaded.model) else torch.contiguous_format

    def make(batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, channels, height, width, generator=generator).to(loaded.device)
        return x.contiguous(memory_format=memory_format)

    return make


def vqa_inputs(loaded: LoadedModel, text_len: int = 11) -> Callable[[int], dict]:
    """A CLS + 9 words + SEP question (BERT's special ids; the token values do not change the cost) and a square
    image at the model's size, as ViLT's or METER's processor would give."""
    config = loaded.model.config
    size = loaded.data_config["input_size"][-1]

    def make(batch: int) -> dict:
        generator = torch.Generator().manual_seed(0)
        high = min(config.vocab_size, 2000)
        ids = torch.randint(min(1000, high // 2), high, (batch, text_len), generator=generator)
        ids[:, 0], ids[:, -1] = 101 % config.vocab_size, 102 % config.vocab_size
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                      pixel_values=torch.randn(batch, 3, size, size, generator=generator),
                      pixel_mask=torch.ones(batch, size, size, dtype=torch.long))
        return {k: v.to(loaded.device) for k, v in inputs.items()}

    return make


INPUT_BUILDERS: dict[str, Callable[[LoadedModel], Callable[[int], object]]] = {
    IMAGE_INPUTS: image_inputs,
    VQA_INPUTS: vqa_inputs,
}


@dataclass(frozen=True)
class ModelOptions:
    """Deployment-style changes applied to a private copy of the model before timing or profiling, under any engine
    (``analysis.timing.engines`` wraps the model they give)."""
    channels_last: bool = False
    fuse_bn: bool = False  # fold BatchNorm into convolutions (EfficientViT, MobileNetV3): the deployment form

    @property
    def any(self) -> bool:
        return self.channels_last or self.fuse_bn

    def describe(self) -> str:
        """The options in words ('' for none), for notes and captions."""
        return ", ".join(text for on, text in ((self.fuse_bn, "BatchNorm folded into convolutions"),
                                                (self.channels_last, "channels_last")) if on)


def prepared(loaded: LoadedModel, options: ModelOptions) -> LoadedModel:
    """A LoadedModel whose model is a transformed deep copy; the shared cached model is never touched."""
    if not options.any:
        return loaded
    model = copy.deepcopy(loaded.model)
    if options.fuse_bn:
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model, inplace=True)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return dataclasses.replace(loaded, model=model)


def make_runner(text: str, device: str = "cpu", random_weights: bool = False,
                loaded: LoadedModel | None = None, options: ModelOptions = ModelOptions()) -> Runner:
    """An eager throughput Runner for a variant name; loads the model unless one is given. Other engines wrap it
    (``analysis.timing.engines``)."""
    variant = parse_variant(text)
    if loaded is not None and variant.input_size not in (None, loaded.spec.input_size):
        raise ValueError(f"{text} runs at {variant.input_size} px; the model given is loaded at "
                         f"{loaded.spec.input_size} px.")
    loaded = prepared(loaded or load_model(variant.model, device=device, random_weights=random_weights,
                                           input_size=variant.input_size), options)
    forward = forward_for(loaded.model, loaded.name, variant)
    return Runner(name=variant.label, forward=forward, make_inputs=INPUT_BUILDERS[loaded.spec.inputs](loaded),
                  params=loaded.num_params, weights=loaded.weights.description)
