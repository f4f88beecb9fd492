"""Names for models with token-reduction settings, as the throughput CLI and pages use them.

A variant is ``NAME`` or ``NAME@key=value[,key=value]``: the registry model NAME run through the forward of the
method (``models.methods``) whose settings it uses. The settings are forward-call arguments; the model itself is
never changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from .methods import METHODS, SIZE_KEY, Method, Setting, method_of, plain_method
from .registry import get_spec


@dataclass(frozen=True)
class Variant:
    model: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.model + "@" + settings_text(self.settings) if self.settings else self.model

    @property
    def input_size(self) -> int | None:
        """The input size the variant loads its model at (``NAME@size=320``); None: the entry's default."""
        size = self.settings.get(SIZE_KEY)
        return None if size is None else int(size)


def settings_text(settings: dict[str, Any]) -> str:
    """Settings as a variant writes them after its ``@``: ``tome=8,prop_attn=False`` (a switch that is on: bare)."""
    return ",".join(k if v is True else f"{k}={v}" for k, v in settings.items())


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false", "on", "off"):
        return text.lower() in ("true", "on")
    return text


def parse_settings(text: str) -> dict[str, Any]:
    """``key=value[,key=value]`` (a variant's part after ``@``; a bare key is a switch turned on) by key."""
    settings: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        settings[key.strip()] = _value(value.strip()) if eq else True
    return settings


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("@")
    get_spec(name)  # raises a KeyError listing the known names
    return Variant(name, parse_settings(rest))


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



# ------------------------------------------------------------------ which variants a page offers for some models
TRAINED = "trained"  # a value option: each release at the value it was trained for


@dataclass(frozen=True)
class VariantGroup:
    """Methods of the table sharing a label and main setting (DynamicViT on DeiT and LV-ViT, PuMer on ViLT and
    METER) with the picked models each applies to: one value picker and, where a method has one, one paper-setting
    switch on a page."""

    label: str
    setting: Setting
    targets: tuple[tuple[str, Method], ...]  # (model, method)

    @property
    def key(self) -> str:
        return f"{self.label}_{self.setting.key}"

    @property
    def trained(self) -> dict[str, Any]:
        """Each target release's trained value of the setting."""
        return {m: v for m, method in self.targets if (v := method.trained_value(get_spec(m))) is not None}

    @property
    def options(self) -> list:
        """Every target's choices (ToMe's r, an input size: they differ by family), the trained value first."""
        choices = dict.fromkeys(c for _, method in self.targets for c in method.main_setting.choices)
        return ([TRAINED] if self.trained else []) + list(choices)

    @property
    def default(self) -> list:
        return [TRAINED] if self.trained else []

    def option_text(self, value: Any) -> str:
        if value != TRAINED:
            return str(value)
        values = ", ".join(map(str, sorted(set(self.trained.values()))))
        return f"each release's trained {self.setting.symbol} ({values})"

    @property
    def help(self) -> str:
        return (f"{'; '.join(dict.fromkeys(m.reference for _, m in self.targets))}. Applied to "
                f"{', '.join(dict.fromkeys(m for m, _ in self.targets))}.")

    @property
    def paper_targets(self) -> list[tuple[str, Method]]:
        return [(m, method) for m, method in self.targets if method.paper_flag]

    @property
    def paper_text(self) -> str:
        return "; ".join(dict.fromkeys(
            f"{method.reference}: " + ", ".join(f"{k.removesuffix('_ratio').replace('_', ' ')} {v}"
                                                for k, v in method.paper_arguments.items())
            for _, method in self.paper_targets))

    def variants(self, picked: Sequence[Any], paper: bool = False) -> list[str]:
        """The variant names for the picked values (``TRAINED``: each release's own) and the paper's setting."""
        names = []
        for model, method in self.targets:
            offered = method.main_setting.choices  # a value another family's record offers is not this one's
            values = [self.trained.get(model) if v == TRAINED else v for v in picked
                      if v == TRAINED or not offered or v in offered]
            names += [method.variant(model, v) for v in dict.fromkeys(values) if v is not None]
        if paper:
            names += [f"{m}@{method.paper_flag}" for m, method in self.paper_targets]
        return names


def variant_groups(models: Sequence[str]) -> list[VariantGroup]:
    """The method table's groups for ``models``, in table order: every method that applies to one of them."""
    groups: dict[tuple[str, str], list[tuple[str, Method]]] = {}
    for method in METHODS.values():
        for model in models:
            if method.applies_to(get_spec(model)):
                groups.setdefault((method.label, method.main_setting.key), []).append((model, method))
    return [VariantGroup(label, targets[0][1].main_setting, tuple(targets))
            for (label, _), targets in groups.items()]
