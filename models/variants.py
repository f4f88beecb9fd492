"""Names for models with token-reduction settings, as the throughput CLI and pages use them.

A variant is ``NAME`` or ``NAME@key=value[,key=value]``: the registry model NAME run through the
forward its settings select. The settings are forward-call arguments; the model itself is never changed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .loading import LoadedModel, load_model
from .registry import get_spec


@dataclass(frozen=True)
class Variant:
    model: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.settings:
            return self.model
        return self.model + "@" + ",".join(k if v is True else f"{k}={v}" for k, v in self.settings.items())


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false", "on", "off"):
        return text.lower() in ("true", "on")
    return text


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("@")
    get_spec(name)  # raises a KeyError listing the known names
    settings: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        settings[key.strip()] = _number(value.strip()) if eq else True
    return Variant(name, settings)


# key -> (forward builder, allowed keys). A forward builder takes the loaded model and the settings and
# returns a function of an input batch. Builders import their method's module lazily.
def _plain(loaded: LoadedModel, settings: dict) -> Callable:
    return loaded.model


def _tome(loaded: LoadedModel, settings: dict) -> Callable:
    from .tome import tome_forward

    r = settings["tome"]
    proportional = settings.get("prop_attn", True)
    return functools.partial(tome_forward, loaded.model, r=r if isinstance(r, int) else str(r),
                             proportional_attention=proportional)


def _dynamicvit(loaded: LoadedModel, settings: dict) -> Callable:
    from .dynamicvit import DynamicViT, dynamicvit_forward

    if not isinstance(loaded.model, DynamicViT):
        raise ValueError(f"rho= needs a DynamicViT model (dynamicvit_*), not {loaded.name}.")
    return functools.partial(dynamicvit_forward, loaded.model, keep_ratio=float(settings["rho"]))


PUMER_KEYS = {"pumer": None, "prune": "prune_ratio", "image_merge": "image_merge_ratio",
              "text_merge": "text_merge_ratio"}


def _vilt(loaded: LoadedModel, settings: dict) -> Callable:
    """ViLT through the explicit PuMer forward; without settings every ratio is 0, which equals model(**inputs),
    so a ViLT vs ViLT+PuMer ratio measures the token reduction alone."""
    from .vilt_pumer import pumer_forward

    if settings:
        kwargs = {PUMER_KEYS[k]: float(v) for k, v in settings.items() if PUMER_KEYS[k]}
    else:
        kwargs = dict(prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0)
    forward = functools.partial(pumer_forward, loaded.model, **kwargs)
    forward.make_inputs = vilt_inputs(loaded)
    return forward


def vilt_inputs(loaded: LoadedModel, text_len: int = 11) -> Callable[[int], dict]:
    """A CLS + 9 words + SEP question and a square image at the model's size, as the processor would give."""
    config = loaded.model.config
    size = loaded.data_config["input_size"][-1]

    def make(batch: int) -> dict:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, min(config.vocab_size, 2000), (batch, text_len), generator=generator)
        ids[:, 0], ids[:, -1] = 101 % config.vocab_size, 102 % config.vocab_size
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                      pixel_values=torch.randn(batch, 3, size, size, generator=generator),
                      pixel_mask=torch.ones(batch, size, size, dtype=torch.long))
        return {k: v.to(loaded.device) for k, v in inputs.items()}

    return make


FORWARDS: dict[str, tuple[Callable[[LoadedModel, dict], Callable], set[str]]] = {
    "plain": (_plain, set()),
    "vilt": (_vilt, set(PUMER_KEYS)),
    "tome": (_tome, {"tome", "prop_attn"}),
    "dynamicvit": (_dynamicvit, {"rho"}),
}


def register_forward(method: str, builder: Callable[[LoadedModel, dict], Callable], keys: set[str]) -> None:
    FORWARDS[method] = (builder, keys)


def method_of(variant: Variant) -> str:
    """The forward that a variant's settings select: the method whose keys its settings use."""
    if not variant.settings:
        return "plain"
    for method, (_, keys) in FORWARDS.items():
        if keys and set(variant.settings) <= keys:
            return method
    allowed = "; ".join(f"{m}: {', '.join(sorted(k))}" for m, (_, k) in FORWARDS.items() if k)
    raise ValueError(f"Settings {sorted(variant.settings)} of {variant.label} match no method. Known settings: {allowed}")


def forward_for(loaded: LoadedModel, variant: Variant) -> Callable:
    from .registry import VILT

    if loaded.spec.family == VILT:
        if set(variant.settings) - set(PUMER_KEYS):
            raise ValueError(f"ViLT takes the settings {sorted(PUMER_KEYS)}, not {sorted(variant.settings)}.")
        return _vilt(loaded, variant.settings)
    builder, _ = FORWARDS[method_of(variant)]
    return builder(loaded, variant.settings)


def _is_channels_last(model: torch.nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def image_inputs(loaded: LoadedModel) -> Callable[[int], torch.Tensor]:
    channels, height, width = loaded.data_config["input_size"]

    memory_format = torch.channels_last if _is_channels_last(loaded.model) else torch.contiguous_format

    def make(batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, channels, height, width, generator=generator).to(loaded.device)
        return x.contiguous(memory_format=memory_format)

    return make


@dataclass(frozen=True)
class ModelOptions:
    """Deployment-style changes applied to a private copy of the model before timing."""
    channels_last: bool = False
    fuse_bn: bool = False  # fold BatchNorm into convolutions (EfficientViT, MobileNetV3)
    compile: bool = False  # torch.compile

    @property
    def any(self) -> bool:
        return self.channels_last or self.fuse_bn or self.compile


def prepared(loaded: LoadedModel, options: ModelOptions) -> LoadedModel:
    """A LoadedModel whose model is a transformed deep copy; the shared cached model is never touched."""
    if not options.any:
        return loaded
    import copy
    import dataclasses

    model = copy.deepcopy(loaded.model)
    if options.fuse_bn:
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model, inplace=True)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if options.compile:
        model = torch.compile(model)
    return dataclasses.replace(loaded, model=model)


def make_runner(text: str, device: str = "cpu", random_weights: bool = False,
                loaded: LoadedModel | None = None, options: ModelOptions = ModelOptions()):
    """A throughput Runner for a variant name; loads the model unless one is given."""
    from analysis.throughput import Runner

    variant = parse_variant(text)
    loaded = prepared(loaded or load_model(variant.model, device=device, random_weights=random_weights), options)
    forward = forward_for(loaded, variant)
    make_inputs = getattr(forward, "make_inputs", None) or image_inputs(loaded)
    return Runner(name=variant.label, forward=forward, make_inputs=make_inputs, params=loaded.num_params,
                  weights=loaded.weights.description)
