"""The models PuMer applies to: every registry model whose family has a PuMer record (``pumer_models``), and
what differs per family beyond the registry and the method table (``FAMILY_VIEWS``): loading, presets, what to fetch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from analysis.vision_language.records import PUMER, PuMerSettings
from models.methods import METHODS, Method, methods_for
from models.registry import METER, METER_SIZE_NOTES, REGISTRY, VILT, ModelSpec, import_target
from models.vilt_pumer import ENTAILMENT_REDUCE_LAYERS


# ----------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class FamilyView:
    """What the page and the records need about one family beyond the registry and the method table."""

    label: str  # "ViLT"
    description: str  # the released model, one line
    layer_word: str  # what the forward's reduce layers count
    depth_attribute: str  # model.config attribute: how many of them
    presets: tuple[tuple[str, tuple[int, ...]], ...]  # besides the forward's default (the paper's)
    paper_preset: str  # the name of the forward's default
    summary: str  # where PuMer acts in this model (markdown)
    missing: str  # what is missing when loading fails: "The ... are"
    load: str  # "module:function(source=None, weights_dir=None) -> (model, processor)" through the resolver
    tiny: str  # "module:function(seed, image_size=None) -> (model, processor)": a small random model of the same
    # structure (at ``image_size``: the same weights, its processor at that size)
    tiny_description: str
    fetch: Callable[[ModelSpec, Path], str]  # what to put where, one sentence body


def _fetch_vilt(spec: ModelSpec, base: Path) -> str:
    target = base / spec.weight_file_stem
    return (f"Create the folder {target} (on a machine with internet: `hf download {spec.hf_repo} "
            f"--local-dir {target}`)")


def _fetch_meter(spec: ModelSpec, base: Path) -> str:
    from models.meter import METER_VQA_FILE, ROBERTA_FOLDER_NAME, ROBERTA_REPO

    tokenizer = base / ROBERTA_FOLDER_NAME
    return (f"Put {METER_VQA_FILE} ({spec.url}) in {base} and the tokenizer files of {ROBERTA_REPO} in the folder "
            f"{tokenizer} (`hf download {ROBERTA_REPO} vocab.json merges.txt --local-dir {tokenizer}`)")


FAMILY_VIEWS: dict[str, FamilyView] = {
    VILT: FamilyView(
        label="ViLT", description="ViLT-B/32 fine-tuned on VQAv2", layer_word="layer",
        depth_attribute="num_hidden_layers", paper_preset="VQA / NLVR2",
        presets=(("Visual entailment", ENTAILMENT_REDUCE_LAYERS),),
        summary="ViLT runs the question's tokens and the image patches through **one 12-layer encoder**; PuMer "
                "reduces inside a few of its layers, between attention and MLP.",
        missing="The ViLT-VQA weights are", load="models.vilt_pumer:load_vilt", tiny="models.vilt_pumer:tiny_vilt",
        tiny_description="small 10-layer ViLT", fetch=_fetch_vilt),
    METER: FamilyView(
        label="METER", description="METER-CLIP16-RoBERTa fine-tuned on VQAv2", layer_word="fusion block",
        depth_attribute="fusion_layers", paper_preset="VQA",
        presets=(("All", (0, 1, 2, 3, 4, 5)), ("Alternate", (0, 2, 4))),
        summary="METER encodes the question with **RoBERTa** and the image with **CLIP ViT-B/16**, then fuses "
                "them in **6 co-attention blocks**; PuMer reduces inside the fusion blocks, in each text block "
                "after its cross-attention to the image (the image block then sees the reduced streams).",
        missing="The METER-VQA checkpoint or the roberta-base tokenizer it reads is",
        load="models.meter:load_meter", tiny="models.meter:tiny_meter",
        tiny_description="small 3-fusion-block METER", fetch=_fetch_meter),
}


@dataclass(frozen=True)
class PuMerModel:
    """A registry model PuMer applies to, its PuMer record and its family's view."""

    spec: ModelSpec
    method: Method
    view: FamilyView

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.view.label

    @property
    def tiny_name(self) -> str:
        return f"{self.view.label.lower()}_tiny_random"

    @property
    def tiny_weights(self) -> str:
        return f"random ({self.view.tiny_description})"

    def paper_settings(self, **overrides) -> PuMerSettings:
        return PuMerSettings.paper(self.method, **overrides)

    def layer_presets(self) -> dict[str, tuple[int, ...]]:
        """Preset name -> reduce layers; the first is the forward's default (the paper's setting)."""
        word = self.view.layer_word
        presets = ((f"{self.view.paper_preset} (paper)", self.paper_settings().reduce_layers),) + self.view.presets
        return {f"{name}: {word}s {', '.join(map(str, layers))}": tuple(layers) for name, layers in presets}

    def depth(self, model: torch.nn.Module) -> int:
        """How many layers (fusion blocks) ``model`` has: the reduce layers it can use."""
        return int(getattr(model.config, self.view.depth_attribute))

    @property
    def image_sizes(self) -> tuple[int, ...]:
        """The input sizes the entry offers, its default first (METER: 576, 384, 288); empty: one size."""
        return self.spec.input_sizes

    def size_label(self, size: int) -> str:
        note = METER_SIZE_NOTES.get(size) if self.spec.family == METER else None
        return f"{size} px" + (f" ({note})" if note else "")

    def sized_name(self, size: int | None) -> str:
        """The provenance name: the registry name, with the input size where the entry offers several."""
        return f"{self.name} at {size or self.spec.input_size} px" if self.image_sizes else self.name

    def load(self, random_weights: bool, folder: str | None = None, user_file: str | None = None,
             image_size: int | None = None):
        """``(model, processor, provenance name, weights label)``: the small random model when asked (at
        ``image_size`` when given), else the released weights through the one resolver, at ``image_size`` where the
        entry offers sizes. Raises
        WeightsNotFoundError or CheckpointError."""
        if random_weights:
            model, processor = import_target(self.view.tiny)(0, image_size=image_size)
            name = f"{self.tiny_name} at {image_size} px" if image_size else self.tiny_name
            return model, processor, name, self.tiny_weights
        from analysis.provenance import weights_label
        from models.weights import resolve

        base = Path(folder).expanduser() if folder else None
        source = resolve(self.spec, user_file=user_file, folder=base)
        sized = {"image_size": image_size or self.spec.input_size} if self.image_sizes else {}
        model, processor = import_target(self.view.load)(source=user_file, weights_dir=base, **sized)
        return model, processor, self.sized_name(image_size), weights_label(source)

    def missing_message(self, folder: str | None = None) -> str:
        """Two sentences: what is missing, what to put where."""
        from models.weights import WEIGHTS_DIR_ENV, hub_offline

        base = folder or os.environ.get(WEIGHTS_DIR_ENV, "")
        base_path = Path(base).expanduser() if base else Path(f"${WEIGHTS_DIR_ENV}")
        offline = " and the hub is off (HF_HUB_OFFLINE)" if hub_offline() else ""
        return (f"{self.view.missing} not on this machine{offline}. "
                f"{self.view.fetch(self.spec, base_path)}, or tick **Use a small random {self.view.label}** above.")


def pumer_models() -> list[PuMerModel]:
    """Every registry model whose family has a PuMer record in the method table (and a view), registry order."""
    return [PuMerModel(spec, method, FAMILY_VIEWS[spec.family]) for spec in REGISTRY.values()
            for method in methods_for(spec) if method.label == PUMER and spec.family in FAMILY_VIEWS]


def _method_of(method: Method | str | None) -> Method:
    """A record of the table by key; None: the table's first PuMer record (ViLT's)."""
    if method is None:
        return next(m for m in METHODS.values() if m.label == PUMER)
    return METHODS[method] if isinstance(method, str) else method


def _view_of(method: Method) -> FamilyView | None:
    return next((FAMILY_VIEWS[f] for f in sorted(method.families) if f in FAMILY_VIEWS), None)
