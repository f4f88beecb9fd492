"""Names for models with token-reduction settings, as the throughput CLI and pages use them.

A variant is ``NAME`` or ``NAME@key=value[,key=value]``: the registry model NAME run through the
forward its settings select. The settings are forward-call arguments; the model itself is never changed.
"""
from __future__ import annotations

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
        return self.model + "@" + ",".join(f"{k}={v}" for k, v in self.settings.items())


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


FORWARDS: dict[str, tuple[Callable[[LoadedModel, dict], Callable], set[str]]] = {
    "plain": (_plain, set()),
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
    builder, _ = FORWARDS[method_of(variant)]
    return builder(loaded, variant.settings)


def image_inputs(loaded: LoadedModel) -> Callable[[int], torch.Tensor]:
    channels, height, width = loaded.data_config["input_size"]

    def make(batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(batch, channels, height, width, generator=generator).to(loaded.device)

    return make


def make_runner(text: str, device: str = "cpu", random_weights: bool = False,
                loaded: LoadedModel | None = None):
    """A throughput Runner for a variant name; loads the model unless one is given."""
    from analysis.throughput import Runner

    variant = parse_variant(text)
    method = method_of(variant)
    loaded = loaded or load_model(variant.model, device=device, random_weights=random_weights)
    forward = forward_for(loaded, variant)
    make_inputs = getattr(forward, "make_inputs", None) or image_inputs(loaded)
    return Runner(name=variant.label, forward=forward, make_inputs=make_inputs, params=loaded.num_params,
                  weights=loaded.weights.description if method else "")
