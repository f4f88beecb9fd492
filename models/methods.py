"""The token-reduction method table: one record per method, its settings, the families it applies to, its forward.

A variant name ``NAME@key=value[,key=value]`` selects the method whose setting keys it uses; the settings become
keyword arguments of the method's forward, so the cached model itself is never changed. Pages and the throughput
CLI loop over ``METHODS``; a new method is one record here plus its forward module (and its figures in
``analysis.token_reduction``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from .registry import (DYNAMIC_CNN, DYNAMIC_LVVIT, DYNAMIC_SWIN, DYNAMICVIT, METER, METER_IMAGE_SIZES, MHSA, VILT,
                       VILT_IMAGE_SIZES, MethodNotApplicable, ModelSpec, get_spec, import_target)


def _flag(value: Any) -> bool:
    """A switch in a variant name: ``NAME@cls`` or ``NAME@cls=true`` / ``=1`` / ``=yes`` is on."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _layers(value: Any) -> tuple[int, ...]:
    """Reduce layers in a variant name, 0-based, joined by '-' (',' separates settings): ``reduce=2-5-8``."""
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return tuple(int(v) for v in str(value).replace("-", " ").split())


def _r_spec(value: Any) -> int | str:
    """ToMe's r: an int per block, or a schedule string such as ``decreasing:13``."""
    return value if isinstance(value, int) else str(value)


@dataclass(frozen=True)
class Setting:
    key: str  # in variant names: NAME@key=value
    argument: str  # keyword argument of the forward
    label: str
    parse: Callable[[Any], Any] = float
    choices: tuple = ()  # what pages offer
    default: Any = None
    symbol: str = ""  # how papers write it (r, rho); defaults to the key
    help: str = ""  # one line: what the setting changes (for corrections of an official choice: which and why)
    column: str = ""  # its column in exported tables; defaults to the key
    span: tuple = ()  # (lowest, highest, step) a page's slider offers; empty: the choices
    picks: tuple = ()  # the values a page picks by default among several (the frontier's points); empty: 3 choices
    # Other forms of a value, written FORM:VALUE ("decreasing:13" for ToMe's decreasing schedule); the first is the
    # default form's name, which is written as the bare value.
    schedules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.symbol:
            object.__setattr__(self, "symbol", self.key)
        if not self.column:
            object.__setattr__(self, "column", self.key)

    @property
    def is_switch(self) -> bool:
        return set(self.choices) == {False, True}

    def scheduled(self, value: Any, schedule: str) -> Any:
        """``value`` in the form ``schedule`` (the first form: the bare value)."""
        return value if not self.schedules or schedule == self.schedules[0] else f"{schedule}:{value}"

    def schedule_of(self, value: Any) -> str | None:
        """The form ``value`` is written in ('decreasing' for 'decreasing:8', the first form for a bare value);
        None for a setting with one form."""
        return (str(value).rpartition(":")[0] or self.schedules[0]) if self.schedules else None

    def describe(self, value: Any) -> str:
        """The setting at ``value`` in words: 'rho=0.7', 'r=13 (decreasing schedule)', 'proportional attention on'."""
        if self.is_switch:
            return f"{self.label} {'on' if _flag(value) else 'off'}"
        form, _, bare = str(value).rpartition(":")
        if self.schedules:
            return f"{self.symbol}={bare} ({form or self.schedules[0]} schedule)"
        return f"{self.symbol}={value:g}" if isinstance(value, float) else f"{self.symbol}={value}"


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    families: frozenset[str]
    forward: str  # "module:function(model, inputs, **settings)"
    settings: tuple[Setting, ...]
    reference: str = ""
    # A bare flag (NAME@flag) that selects the paper's setting; the arguments it stands for.
    paper_flag: str | None = None
    paper_arguments: dict = field(default_factory=dict)
    # Arguments with which the forward reduces nothing (equals the model's own forward).
    neutral_arguments: dict = field(default_factory=dict)
    # Families whose unreduced runs also go through this forward at its neutral arguments, so that a speed-up
    # against them measures the token reduction alone (ViLT: the explicit encoder walk).
    plain_for: frozenset[str] = frozenset()
    action: str = "pruning"  # what it does to tokens, in its name on pages: "DynamicViT pruning", "ToMe merging"
    # Families whose plain models can run it once untrained parts (DynamicViT's score predictors) are attached:
    # "module:function(backbone) -> model" builds a seeded copy with them; the backbone itself is not changed.
    attachable_to: frozenset[str] = frozenset()
    attach: str | None = None
    # "module:function(model)" raising MethodNotApplicable where a model of its families (or the backbone it attaches
    # to) cannot run it: no class token, register tokens, too few blocks, blocks the forward does not walk. Checked on
    # the architecture (meta device), so a timm model typed by name is offered only the methods that run on it.
    check: str | None = None
    # Score predictors drop positions stage by stage at a keep ratio (the DynamicViT family): its forward takes
    # ``keep_ratio`` and, with ``return_trace=True``, returns each stage's keep masks and scores
    # (``models.dynamic_zoo.as_stage_trace``), which ``python -m analysis.run keep-frequency`` counts.
    stage_pruning: bool = False
    # The paper's ablations of the method, each (what it shows, the settings after a variant's ``@``): the
    # vision-language frontier (``python -m analysis.run vqa-frontier``) scores them beside the paper's setting.
    ablations: tuple[tuple[str, str], ...] = ()
    # A setting of the loaded model and its inputs rather than of a forward (the input size): its variant loads the
    # entry at the value, and its key combines with another method's settings (``NAME@pumer,size=320``).
    model_setting: bool = False

    @property
    def main_setting(self) -> Setting:
        return self.settings[0]

    @property
    def name(self) -> str:
        """How pages and tables name it: 'DynamicViT pruning', 'ToMe merging'."""
        return f"{self.label} {self.action}"

    def runs_on(self, spec: ModelSpec) -> bool:
        """Whether it runs on the model as released: on its family, or on the backbone a pruning release is built on
        (ToMe on DynamicViT's DeiT)."""
        return (self.applies_to(spec) or spec.backbone_family in self.families) and self.fits(spec)

    def needs_attachment(self, spec: ModelSpec) -> bool:
        """Whether it runs on the model only with untrained parts attached (DynamicViT on a plain DeiT)."""
        return not self.runs_on(spec) and spec.family in self.attachable_to and self.fits(spec)

    def not_applicable_reason(self, spec: ModelSpec) -> str | None:
        """Why the method cannot run on ``spec``'s architecture, in one sentence; None when it can (or no check)."""
        return _check_reason(self.check, spec.name) if self.check else None

    def fits(self, spec: ModelSpec) -> bool:
        return self.not_applicable_reason(spec) is None

    def with_untrained_parts(self, backbone, seed: int = 0):
        """A copy of ``backbone`` with this method's untrained parts attached, seeded (the global random state is not
        disturbed)."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return import_target(self.attach)(backbone).eval()

    def trained_value(self, spec: ModelSpec) -> Any:
        """The main setting's value a release was trained for (``ModelSpec.trained_<argument>``), or None."""
        return getattr(spec, f"trained_{self.main_setting.argument}", None)

    def describe(self, settings: dict[str, Any]) -> str:
        """Every setting of a run in words: 'r=13 (constant schedule), proportional attention on'."""
        by_key = {s.key: s for s in self.settings}
        return ", ".join(by_key[k].describe(v) for k, v in settings.items() if k in by_key) or "none"

    def defaults(self) -> dict[str, Any]:
        """Every setting at its default value, by key."""
        return {s.key: s.default for s in self.settings}

    @property
    def keys(self) -> set[str]:
        return {s.key for s in self.settings} | ({self.paper_flag} if self.paper_flag else set())

    def applies_to(self, spec: ModelSpec) -> bool:
        return spec.family in self.families

    def arguments(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Forward keyword arguments for variant settings (``{'rho': 0.7}`` -> ``{'keep_ratio': 0.7}``)."""
        by_key = {s.key: s for s in self.settings}
        arguments = dict(self.paper_arguments) if self.paper_flag in settings else {}
        for key, value in settings.items():
            if key != self.paper_flag and (key in by_key or key not in MODEL_SETTING_KEYS):
                arguments[by_key[key].argument] = by_key[key].parse(value)
        return arguments

    def forward_function(self) -> Callable:
        return import_target(self.forward)

    def bind(self, model, settings: dict[str, Any]) -> Callable:
        """The forward over ``model`` at the variant ``settings``, as a function of the inputs."""
        return functools.partial(self.forward_function(), model, **self.arguments(settings))

    def bind_neutral(self, model) -> Callable:
        """The forward over ``model`` reducing nothing."""
        return functools.partial(self.forward_function(), model, **self.neutral_arguments)

    def variant(self, model_name: str, value: Any) -> str:
        """The variant name running ``model_name`` with the main setting at ``value``."""
        return f"{model_name}@{self.main_setting.key}={value}"


_RHO = (Setting("rho", "keep_ratio", "keep ratio rho", float, (0.5, 0.6, 0.7, 0.8, 0.9), 0.7, span=(0.3, 1.0, 0.05),
               picks=(0.5, 0.7, 0.9), help="The share of positions the first predictor keeps; later stages follow "
                                            "the family's schedule."),)
_PUMER_SETTINGS = (Setting("prune", "prune_ratio", "image prune ratio", float, (0.1, 0.2, 0.3), 0.1),
                   Setting("image_merge", "image_merge_ratio", "image merge ratio", float, (0.1, 0.2, 0.3), 0.3),
                   Setting("text_merge", "text_merge_ratio", "text merge ratio", float, (0.1, 0.2, 0.3), 0.2))
# PuMer's code decides by default (models.vilt_pumer); these switch on corrections of its choices, one each.
_PUMER_CORRECTIONS = (
    Setting("cls", "protect_image_cls", "protect the image CLS", _flag, (False, True), False,
            help="Correction: PuMer's code ranks the image CLS with the patches, so it can move or be pruned (and "
                 "METER's image pooler then reads the best-scored patch); on, it is never pruned or merged and "
                 "stays first."),
    Setting("wavg", "size_weighted", "size-weighted merges", _flag, (False, True), False,
            help="Correction: PuMer's code averages each merge with equal weights, whatever a token already "
                 "holds; on, merges are weighted by token size (ToMe)."),
)
_METER_ORDER = Setting(
    "context", "image_context", "METER image layer attends to", str, ("text_output", "block_input"), "text_output",
    help="PuMer's code runs METER's image layer over the text layer's output in every fusion block "
         "(text_output); block_input is METER's own order, the one the released weights were trained with.")
_PUMER_NEUTRAL = dict(prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0)


def _reduce_layers(choices: tuple[str, ...], word: str) -> Setting:
    """Where PuMer reduces: 0-based layers (fusion blocks) joined by '-', the paper's first."""
    return Setting("reduce", "reduce_layers", f"reduce {word}s", _layers, choices, choices[0])


def _pumer_ablations(*where: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """PuMer's ablations (its section 5): text-informed pruning alone, modality-aware merging alone, larger ratios,
    and other reduce layers (``where``: (name, layers))."""
    return (("pruning only", "pumer,image_merge=0,text_merge=0"), ("merging only", "pumer,prune=0"),
            ("larger ratios", "pumer,prune=0.3,image_merge=0.3,text_merge=0.3"),
            *((name, f"pumer,reduce={layers}") for name, layers in where))


# PuMer's baselines on ViLT and METER (models.vilt_baselines, models.meter_baselines): ToMe and EViT on the image
# tokens only, each either at its own setting or at a target FLOP ratio (the paper sets its baselines to a speed-up
# similar to PuMer's), and the model at a smaller input size.
_NO_DYNAMICVIT = ("DynamicViT is not offered on ViLT or METER: its score predictors would have to be trained on "
                  "VQA first (the paper trained them), and no such weights are released.")
_FLOP_HELP = ("Picks the {what} whose forward's counted FLOPs (torch's FlopCounterMode, an 11-token question) are "
              "closest to this share of the unreduced forward's, once per model and size: the paper configures its "
              "baselines to a speed-up similar to PuMer's. " + _NO_DYNAMICVIT)
_VL_PROP_ATTN = Setting("prop_attn", "proportional_attention", "proportional attention", _flag, (True, False), True,
                        column="tome_proportional_attention",
                        help="Adds log(size) to the attention logits of every key, so that a merged image token counts "
                             "as often as the patches it holds (ToMe's default).")
_VL_FUSE = Setting("fuse", "fuse", "fuse the inattentive tokens", _flag, (True, False), True, column="evit_fuse",
                   help="On (the paper): the image tokens not kept become one token, their sum weighted by the class "
                        "token's attention; off: they are dropped.")


def _vl_tome_r(default: int, choices: tuple, span: tuple, picks: tuple, where: str) -> Setting:
    return Setting("tome", "r", "image tokens merged per layer (r)", _r_spec, choices, default, "r", column="tome_r",
                   span=span, picks=picks, schedules=("constant", "decreasing"),
                   help=f"ToMe merges r image tokens in every {where} (the class tokens and the text never); "
                        f"decreasing: 1.5 r at the first to 0.5 r at the last. " + _NO_DYNAMICVIT)


_VL_TOME_FLOPS = Setting("tome_flops", "flop_ratio", "target FLOP ratio", float, (0.5, 0.6, 0.7, 0.8, 0.9), 0.6,
                         "FLOPs", column="tome_flop_ratio", span=(0.3, 1.0, 0.05), picks=(0.5, 0.6, 0.8),
                         help=_FLOP_HELP.format(what="constant r"))
_VL_EVIT = Setting("evit", "keep_rate", "image keep rate", float, (0.5, 0.6, 0.7, 0.8, 0.9), 0.7, "keep_rate",
                   column="evit_keep_rate", span=(0.3, 1.0, 0.05), picks=(0.5, 0.7, 0.9),
                   help="The share of the image patch tokens kept at each of EViT's three layers (its DeiT blocks "
                        "4, 7, 10 of 12, scaled to the depth), ranked by the class token's attention. " + _NO_DYNAMICVIT)
_VL_EVIT_FLOPS = Setting("evit_flops", "flop_ratio", "target FLOP ratio", float, (0.5, 0.6, 0.7, 0.8, 0.9), 0.6,
                         "FLOPs", column="evit_flop_ratio", span=(0.3, 1.0, 0.05), picks=(0.5, 0.6, 0.8),
                         help=_FLOP_HELP.format(what="keep rate (in steps of 0.01)"))


SIZE_KEY = "size"  # the input size: a model setting (``Method.model_setting``), the "Input size" records' only one


def _size(sizes: tuple[int, ...], model: str) -> Setting:
    return Setting(SIZE_KEY, "input_size", "input size (px)", int, sizes, sizes[0], "size", column="input_size",
                   picks=sizes[1:],
                   help=f"The image side {model} is loaded and fed at (its default first); combines with the other "
                        "methods (NAME@pumer,size=320). PuMer's baseline: a smaller image instead of fewer tokens.")


def _vl_baselines(family: str, module: str, where: str, r: Setting) -> list[Method]:
    """ToMe and EViT on a vision-language family, each at its own setting and at a target FLOP ratio."""
    tome, evit = f"models.{module}:{family}_tome_forward", f"models.{module}:{family}_evit_forward"
    reference = f"{{}}, on the image tokens {where} (PuMer's baseline)"
    return [
        Method(f"tome-{family}", "ToMe", frozenset({family}), tome, (r, _VL_PROP_ATTN),
               reference=reference.format("ToMe (ICLR 2023)"), neutral_arguments={"r": 0}, action="merging"),
        Method(f"tome-flops-{family}", "ToMe", frozenset({family}), tome, (_VL_TOME_FLOPS, _VL_PROP_ATTN),
               reference=reference.format("ToMe (ICLR 2023) at a target FLOP ratio"), neutral_arguments={"r": 0},
               action="merging"),
        Method(f"evit-{family}", "EViT", frozenset({family}), evit, (_VL_EVIT, _VL_FUSE),
               reference=reference.format("EViT (ICLR 2022)"), neutral_arguments={"keep_rate": 1.0},
               action="pruning + fusion"),
        Method(f"evit-flops-{family}", "EViT", frozenset({family}), evit, (_VL_EVIT_FLOPS, _VL_FUSE),
               reference=reference.format("EViT (ICLR 2022) at a target FLOP ratio"),
               neutral_arguments={"keep_rate": 1.0}, action="pruning + fusion"),
    ]

METHODS: dict[str, Method] = {m.key: m for m in [
    Method("tome", "ToMe", frozenset({MHSA}), "models.tome:tome_forward",
           (Setting("tome", "r", "tokens merged per block (r)", _r_spec, tuple(range(1, 25)), 13, "r",
                    column="tome_r", span=(0, 32, 1), picks=(4, 8, 13, 16), schedules=("constant", "decreasing"),
                    help="Decreasing: linear from 1.5 r at the first block to 0.5 r at the last (ToMe's schedule)."),
            Setting("prop_attn", "proportional_attention", "proportional attention", _flag, (True, False), True,
                    column="tome_proportional_attention", help="Adds log(size) to the attention logits, so that a "
                                                               "merged token counts as often as the patches it holds.")),
           reference="ToMe (ICLR 2023)", neutral_arguments={"r": 0}, action="merging",
           check="models.tome:check_supported"),
    Method("dynamicvit", "DynamicViT", frozenset({DYNAMICVIT}), "models.dynamicvit:dynamicvit_forward", _RHO,
           reference="DynamicViT (NeurIPS 2021)", neutral_arguments={"keep_ratio": 1.0},
           attachable_to=frozenset({MHSA}), attach="models.dynamicvit:dynamicvit_from_backbone",
           check="models.dynamicvit:check_backbone", stage_pruning=True),
    # EViT keeps the patches the class token attends to most and fuses the rest into one token; no trained part.
    Method("evit", "EViT", frozenset({MHSA}), "models.evit:evit_forward",
           (Setting("evit", "keep_rate", "keep rate", float, (0.5, 0.6, 0.7, 0.8, 0.9), 0.7, "keep_rate",
                    column="evit_keep_rate", span=(0.3, 1.0, 0.05), picks=(0.5, 0.7, 0.9),
                    help="The share of the patch tokens kept at each of blocks 4, 7 and 10 (1-based, as in the "
                         "paper), ranked by the class token's attention averaged over heads."),
            Setting("fuse", "fuse", "fuse the inattentive tokens", _flag, (True, False), True, column="evit_fuse",
                    help="On (the paper): the tokens not kept become one token, their sum weighted by the class "
                         "token's attention; off: they are dropped.")),
           reference="EViT (ICLR 2022)", neutral_arguments={"keep_rate": 1.0}, action="pruning + fusion",
           check="models.evit:check_supported"),
    Method("dynamicvit-lvvit", "DynamicViT", frozenset({DYNAMIC_LVVIT}), "models.dynamic_lvvit:lvvit_forward", _RHO,
           reference="DynamicViT (NeurIPS 2021), LV-ViT", neutral_arguments={"keep_ratio": 1.0}, stage_pruning=True),
    # Structured sparsification (T-PAMI extension): the feature map stays whole; only kept positions run the MLP.
    Method("dynamiccnn", "DynamicCNN", frozenset({DYNAMIC_CNN}), "models.dynamic_convnext:convnext_forward", _RHO,
           reference="Dynamic Spatial Sparsification (T-PAMI 2023), ConvNeXt", neutral_arguments={"keep_ratio": 1.0},
           stage_pruning=True),
    Method("dynamicswin", "DynamicSwin", frozenset({DYNAMIC_SWIN}), "models.dynamic_swin:swin_forward", _RHO,
           reference="Dynamic Spatial Sparsification (T-PAMI 2023), Swin", neutral_arguments={"keep_ratio": 1.0},
           stage_pruning=True),
    Method("pumer", "PuMer", frozenset({VILT}), "models.vilt_pumer:pumer_forward",
           _PUMER_SETTINGS + (_reduce_layers(("2-5-8", "2-4-6-8", "0-1-2-3", "8-9-10-11"), "layer"),)
           + _PUMER_CORRECTIONS,
           reference="PuMer (ACL 2023), ViLT: layers 2, 5, 8", paper_flag="pumer",
           paper_arguments=dict(prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.2),
           neutral_arguments=_PUMER_NEUTRAL, plain_for=frozenset({VILT}),
           ablations=_pumer_ablations(("early layers", "0-1-2"), ("late layers", "8-9-10"))),
    # PuMer's METER-VQA setting: fusion blocks 0-3, prune 0.2, image and text merge 0.2 (csarron/PuMer).
    # Unreduced, it runs METER's own order, so the baseline is the released model.
    Method("pumer-meter", "PuMer", frozenset({METER}), "models.meter_pumer:meter_pumer_forward",
           _PUMER_SETTINGS + (_reduce_layers(("0-1-2-3", "0-2-4", "0-1-2-3-4-5", "2-3-4-5"), "fusion block"),)
           + _PUMER_CORRECTIONS + (_METER_ORDER,),
           reference="PuMer (ACL 2023), METER: fusion blocks 0-3", paper_flag="pumer",
           paper_arguments=dict(prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2),
           neutral_arguments=dict(_PUMER_NEUTRAL, image_context="block_input"), plain_for=frozenset({METER}),
           ablations=_pumer_ablations(("late fusion blocks", "2-3-4-5"), ("alternate fusion blocks", "0-2-4"))),
    *_vl_baselines(VILT, "vilt_baselines", "of ViLT's encoder",
                   _vl_tome_r(8, (2, 4, 6, 8, 10, 12), (0, 16, 1), (4, 8, 12), "encoder layer")),
    *_vl_baselines(METER, "meter_baselines", "in METER's CLIP image tower",
                   _vl_tome_r(40, (10, 20, 30, 40, 60, 80, 100), (0, 110, 5), (20, 40, 80), "image tower block")),
    Method("size-vilt", "Input size", frozenset({VILT}), "models.input_sizes:sized_forward",
           (_size(VILT_IMAGE_SIZES, "ViLT"),), reference="PuMer (ACL 2023): smaller input resolution, ViLT",
           action="reduction", model_setting=True),
    Method("size-meter", "Input size", frozenset({METER}), "models.input_sizes:sized_forward",
           (_size(METER_IMAGE_SIZES, "METER"),), reference="PuMer (ACL 2023): smaller input resolution, METER 320 px",
           action="reduction", model_setting=True),
]}
# Keys of settings that change what is loaded (the input size), not a forward; they combine with any method's.
MODEL_SETTING_KEYS = frozenset(s.key for m in METHODS.values() if m.model_setting for s in m.settings)


def methods_for(spec: ModelSpec) -> list[Method]:
    return [m for m in METHODS.values() if m.applies_to(spec) and m.fits(spec)]


@functools.lru_cache(maxsize=256)
def _check_reason(check: str, model_name: str) -> str | None:
    from .loading import meta_model

    model = meta_model(get_spec(model_name))
    if model is None:  # not buildable on the meta device: nothing to say before it runs
        return None
    try:
        import_target(check)(model)
    except MethodNotApplicable as exc:
        return str(exc)
    return None


def method_of(settings: dict[str, Any], spec: ModelSpec | None = None) -> Method | None:
    """The method whose keys the settings use (preferring one that applies to ``spec``), leaving out the model
    settings (``MODEL_SETTING_KEYS``) unless they are all there is; None for no settings. ValueError when none
    matches."""
    if not settings:
        return None
    # A model setting (the input size) combines with another method's settings; alone, its own record runs.
    keys = set(settings) - MODEL_SETTING_KEYS or set(settings)
    matching = [m for m in METHODS.values() if keys <= m.keys]
    if matching:
        return next((m for m in matching if spec is not None and m.applies_to(spec)), matching[0])
    known = "; ".join(sorted({f"{m.label}: {', '.join(sorted(m.keys))}" for m in METHODS.values()}))
    raise ValueError(f"Settings {sorted(settings)} match no method. Known settings: {known}")


def plain_method(spec: ModelSpec) -> Method | None:
    return next((m for m in METHODS.values() if spec.family in m.plain_for), None)
