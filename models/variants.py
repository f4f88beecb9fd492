"""Names for models with token-reduction settings, as the throughput CLI and pages use them.

A variant is ``NAME`` or ``NAME@key=value[,key=value]``: the registry model NAME run through the forward of the
method (``models.methods``) whose settings it uses. The settings are forward-call arguments; the model itself is
never changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .methods import method_of, plain_method
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


def _value(text: str) -> Any:
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
        settings[key.strip()] = _value(value.strip()) if eq else True
    return Variant(name, settings)


def forward_for(model: nn.Module, model_name: str, variant: Variant) -> Callable:
    """The function of an input batch that runs ``variant`` on ``model`` (the registry model ``model_name``)."""
    spec = get_spec(model_name)
    try:
        method = method_of(variant.settings, spec)
    except ValueError as exc:
        raise ValueError(f"{variant.label}: {exc}") from None
    if method is None:
        plain = plain_method(spec)
        return model if plain is None else plain.bind_neutral(model)
    if not method.applies_to(spec):
        setting = next(iter(variant.settings))
        raise ValueError(f"{setting}= needs a {method.label} model (family {', '.join(sorted(method.families))}), "
                         f"not {model_name} (family {spec.family}).")
    return method.bind(model, variant.settings)

