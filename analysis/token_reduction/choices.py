"""Which models the token-reduction page offers and which methods run on each: the registry and the method table
(``models.methods``), nothing named here."""
from __future__ import annotations

from typing import NamedTuple, Sequence

from models.methods import METHODS, Method
from models.registry import (
    FAMILY_LABELS,
    IMAGE_CLASSIFICATION,
    REGISTRY,
    ModelSpec,
    get_spec,
)


# --------------------------------------------------------------------------------------------
# Which models, which methods (registry + method table)
# --------------------------------------------------------------------------------------------
def methods_running_on(spec: ModelSpec) -> list[Method]:
    """The table's methods that run on the model as released: its family's first, then its backbone's."""
    return sorted((m for m in METHODS.values() if m.runs_on(spec)), key=lambda m: not m.applies_to(spec))


def absent_methods_note(spec: ModelSpec, shown: Sequence[Method]) -> str | None:
    """One sentence naming the image methods of the table not shown for this model, and why (None: all shown)."""
    missing = [m for m in METHODS.values() if m not in shown and not m.plain_for and m.label not in
               {s.label for s in shown}]
    if not missing:
        return None
    parts = [f"{m.label} applies to {', '.join(FAMILY_LABELS.get(f, f) for f in sorted(m.families))}" for m in missing]
    return (f"Not shown for {spec.name} ({spec.family_label}): " + "; ".join(parts) + ".")


class ModelChoice(NamedTuple):
    name: str                     # registry (or timm) name of what is loaded
    attached: Method | None = None  # a method whose untrained parts (score predictors) are attached first

    @property
    def untrained_predictors(self) -> bool:
        return self.attached is not None

    def methods(self) -> list[Method]:
        """The methods run on this choice: the attached one first, then every method that runs on the model."""
        return ([self.attached] if self.attached else []) + methods_running_on(get_spec(self.name))


def untrained_choice_label(name: str, method: Method) -> str:
    return f"{name} + UNTRAINED {method.label} predictors"


def model_choices(extra: Sequence[str] = ()) -> dict[str, ModelChoice]:
    """The token-reduction page's models, by label: each plain backbone with a method's untrained parts attached,
    then every image classifier (registry, then ``extra`` names) on which at least one method runs. Models of
    other tasks (PuMer's vision-language models, which have their own page) are not offered."""
    names = [n for n in list(REGISTRY) + [n for n in extra if n not in REGISTRY]
             if get_spec(n).task == IMAGE_CLASSIFICATION]
    choices: dict[str, ModelChoice] = {}
    for name in names:
        spec = get_spec(name)
        for method in METHODS.values():
            if method.needs_attachment(spec):
                choices[untrained_choice_label(name, method)] = ModelChoice(name, method)
    for name in names:
        if methods_running_on(get_spec(name)):
            choices[name] = ModelChoice(name)
    return choices


def choice_text(label: str, choice: ModelChoice) -> str:
    """How the model picker shows a choice: its methods, a release's with the value it was trained for."""
    if choice.untrained_predictors:
        return label
    spec = get_spec(choice.name)
    parts = []
    for method in choice.methods():
        trained = method.trained_value(spec)
        parts.append(method.label + (f", trained at {method.main_setting.symbol} {trained:g}" if trained else ""))
    return f"{label} ({'; '.join(dict.fromkeys(parts))})"
