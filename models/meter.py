"""METER (Dou et al., CVPR 2022), CLIP-ViT-B/16 + RoBERTa fine-tuned on VQAv2, built from transformers parts.

transformers has no METER class. This module assembles it so that the official Lightning checkpoint
(``meter_clip16_288_roberta_vqa.ckpt`` from zdou0830/METER) loads strictly after ``official_to_ours``
(``models.meter_checkpoint``):

- ``vit_model``: a ``CLIPVisionModel`` (METER keeps 11 of CLIP's 12 vision blocks and applies ``ln_post`` to
  every token, not only the class token);
- ``text_transformer``: a ``RobertaModel`` (roberta-base, pooler included: the checkpoint holds it);
- ``cross_modal_{text,image}_layers``: 6 co-attention layers each, ``CoAttentionLayer`` below, made of
  transformers' RoBERTa attention, intermediate and output modules (self-attention, cross-attention, MLP);
- ``cross_modal_{text,image}_transform``, ``token_type_embeddings``, the two poolers and ``vqa_classifier``
  under their official names.

Forward (METER's ``infer``): RoBERTa encodes the question, CLIP the image; both are projected, get a token type
embedding, then pass the fusion layers where each stream attends to itself and then to the other stream's
*input* of that layer. The answer head reads ``[text pooler(CLS), image pooler(image CLS)]``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from models.checkpoints import CheckpointError, WeightsNotFoundError, load_strict, read_state_dict
from models.loading import checkpoint_path
from models.meter_checkpoint import (  # noqa: F401 - the key mapping, still importable from models.meter
    IN_PROJ,
    KEY_TABLE,
    UNUSED_KEYS,
    official_to_ours,
    resize_position_embedding,
)
from models.registry import ModelSpec, get_spec
from models.vilt_pumer import VILT_VQA_NAME
from models.weights import WEIGHTS_DIR_ENV, WeightsSource, hub_offline, resolve
from models.weights import weights_dir as weights_dir_from_env

METER_VQA_NAME = "meter_clip16_288_vqa"  # the registry entry: file name, release URL, loader
METER_VQA_FILE = f"{get_spec(METER_VQA_NAME).weight_file_stem}.ckpt"
ROBERTA_REPO = "FacebookAI/roberta-base"
ROBERTA_FOLDER_NAME = "roberta-base"
LABELS_FILE = "meter_vqa_labels.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POSITION_KEY = "vit_model.embeddings.position_embedding.weight"  # the image tower's, sized by the input grid


# ----------------------------------------------------------------------------------------------- config and model
@dataclass(frozen=True)
class MeterConfig:
    """Sizes of the three parts. Defaults: the released METER-CLIP16-RoBERTa VQA model."""

    image_size: int = 576  # the VQAv2 checkpoint's fine-tuned size (288 in its name is the pre-training size)
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 11  # CLIP ViT-B/16 has 12 blocks; METER builds layers - 1 of them
    vision_heads: int = 12
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 50265
    text_max_positions: int = 514
    hidden_size: int = 768  # fusion width
    fusion_layers: int = 6
    fusion_heads: int = 12
    fusion_intermediate: int = 3072
    max_text_len: int = 50  # the VQA fine-tuning setting; longer questions are truncated
    num_labels: int = 3129
    id2label: Mapping[int, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def vision_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(hidden_size=self.vision_width, intermediate_size=4 * self.vision_width,
                                num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                                image_size=self.image_size, patch_size=self.patch_size, hidden_act="quick_gelu",
                                layer_norm_eps=1e-5)

    def text_config(self):
        from transformers import RobertaConfig

        return RobertaConfig(vocab_size=self.vocab_size, hidden_size=self.text_hidden,
                             num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                             intermediate_size=self.text_intermediate, max_position_embeddings=self.text_max_positions,
                             type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)

    def fusion_config(self):
        # METER's RobertaConfig for the co-attention layers keeps BertConfig's layer_norm_eps=1e-12.
        from transformers import RobertaConfig

        config = RobertaConfig(hidden_size=self.hidden_size, num_attention_heads=self.fusion_heads,
                               intermediate_size=self.fusion_intermediate, layer_norm_eps=1e-12,
                               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        config._attn_implementation = "sdpa"  # the layers are used standalone, outside a PreTrainedModel
        return config


class CoAttentionLayer(nn.Module):
    """METER's BertCrossLayer from transformers' RoBERTa parts: self-attention, cross-attention to the other
    modality, MLP; post-norm residuals. transformers' RobertaLayer would make the self-attention causal once
    cross-attention is on, so the parts are assembled here (same submodule names as the official layer)."""

    def __init__(self, config):
        from transformers.models.roberta.modeling_roberta import RobertaAttention, RobertaIntermediate, RobertaOutput

        super().__init__()
        self.attention = RobertaAttention(config, is_causal=False)
        self.crossattention = RobertaAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = RobertaIntermediate(config)
        self.output = RobertaOutput(config)

    def forward(self, hidden, other, bias, other_bias):
        """bias / other_bias: additive key masks (B, 1, 1, N) of this stream and of ``other``."""
        hidden = self.attention(hidden, bias)[0]
        hidden = self.crossattention(hidden, encoder_hidden_states=other, encoder_attention_mask=other_bias)[0]
        return self.output(self.intermediate(hidden), hidden)


class Pooler(nn.Module):
    """METER's heads.Pooler: tanh(Linear(first token))."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class MeterForQuestionAnswering(nn.Module):
    """METER for VQA. ``forward(input_ids, attention_mask, pixel_values)`` returns the answer logits."""

    def __init__(self, config: MeterConfig = MeterConfig()):
        from transformers import CLIPVisionModel, RobertaModel

        super().__init__()
        self.config = config
        self.vit_model = CLIPVisionModel(config.vision_config())
        self.text_transformer = RobertaModel(config.text_config(), add_pooling_layer=True)
        self.cross_modal_text_transform = nn.Linear(config.text_hidden, config.hidden_size)
        self.cross_modal_image_transform = nn.Linear(config.vision_width, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, config.hidden_size)
        fusion = config.fusion_config()
        self.cross_modal_image_layers = nn.ModuleList(CoAttentionLayer(fusion) for _ in range(config.fusion_layers))
        self.cross_modal_text_layers = nn.ModuleList(CoAttentionLayer(fusion) for _ in range(config.fusion_layers))
        self.cross_modal_image_pooler = Pooler(config.hidden_size)
        self.cross_modal_text_pooler = Pooler(config.hidden_size)
        hs = config.hidden_size
        self.vqa_classifier = nn.Sequential(nn.Linear(2 * hs, 2 * hs), nn.LayerNorm(2 * hs), nn.GELU(),
                                            nn.Linear(2 * hs, config.num_labels))

    @property
    def id2label(self) -> Mapping[int, str]:
        return self.config.id2label

    def encode_text(self, input_ids, attention_mask):
        """RoBERTa over the question, projected to the fusion width, plus token type 0. (B, T, C)."""
        text = self.text_transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = self.cross_modal_text_transform(text)
        return text + self.token_type_embeddings(torch.zeros_like(input_ids))

    def encode_image(self, pixel_values):
        """CLIP's vision tower with ``ln_post`` on every token, projected, plus token type 1. (B, 1 + P, C)."""
        vision = self.vit_model
        image = vision.post_layernorm(vision(pixel_values=pixel_values).last_hidden_state)
        image = self.cross_modal_image_transform(image)
        types = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        return image + self.token_type_embeddings(types)

    def classify(self, text, image):
        pooled = torch.cat([self.cross_modal_text_pooler(text), self.cross_modal_image_pooler(image)], dim=-1)
        return self.vqa_classifier(pooled)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **_ignored):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x, y = self.encode_text(input_ids, attention_mask), self.encode_image(pixel_values)
        text_bias = key_bias(attention_mask.bool(), x.dtype)
        image_bias = key_bias(torch.ones(y.shape[:2], dtype=torch.bool, device=y.device), y.dtype)
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            x, y = text_layer(x, y, text_bias, image_bias), image_layer(y, x, image_bias, text_bias)
        return self.classify(x, y)


def key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive key mask (B, 1, 1, N) of transformers' ``get_extended_attention_mask``."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(
        ~valid, torch.finfo(dtype).min)[:, None, None, :]


# ----------------------------------------------------------------------------------------------- official checkpoint
# Sizes read from it, loading it (its names mapped by models.meter_checkpoint).
def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], image_size: int = 576,
                           id2label: Mapping[int, str] | None = None) -> MeterConfig:
    """The sizes of an official METER checkpoint (official names), read from its tensors."""
    def count(prefix: str, suffix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix) and k.endswith(suffix)})

    try:
        conv = state_dict["vit_model.visual.conv1.weight"]
        words = state_dict["text_transformer.embeddings.word_embeddings.weight"]
        head = state_dict["vqa_classifier.3.weight"]
        fusion_mlp = state_dict["cross_modal_text_layers.0.intermediate.dense.weight"]
        text_mlp = state_dict["text_transformer.encoder.layer.0.intermediate.dense.weight"]
        positions = state_dict["text_transformer.embeddings.position_embeddings.weight"]
    except KeyError as exc:
        raise CheckpointError(f"Not a METER VQA checkpoint: it has no {exc.args[0]!r}.") from None
    width, text_hidden, hidden = conv.shape[0], words.shape[1], fusion_mlp.shape[1]
    labels = dict(id2label) if id2label else {}
    return MeterConfig(
        image_size=image_size, patch_size=conv.shape[-1], vision_width=width,
        vision_layers=count("vit_model.visual.transformer.resblocks.", ".attn.in_proj_weight"),
        vision_heads=max(width // 64, 1), text_hidden=text_hidden,
        text_layers=count("text_transformer.encoder.layer.", ".attention.self.query.weight"),
        text_heads=max(text_hidden // 64, 1), text_intermediate=text_mlp.shape[0], vocab_size=words.shape[0],
        text_max_positions=positions.shape[0], hidden_size=hidden,
        fusion_layers=count("cross_modal_text_layers.", ".attention.self.query.weight"),
        fusion_heads=max(hidden // 64, 1), fusion_intermediate=fusion_mlp.shape[0], num_labels=head.shape[0],
        id2label=labels,
    )


def load_official_state_dict(model: MeterForQuestionAnswering, state_dict: Mapping[str, torch.Tensor],
                             source: str = "checkpoint") -> list[str]:
    """Map and load strictly (CheckpointError listing missing / unexpected / misshapen keys). Returns the
    keys dropped as unused."""
    mapped, dropped = official_to_ours(state_dict, image_size=model.config.image_size)
    load_strict(model, mapped, source=source)
    return dropped


def load_official_file(model: MeterForQuestionAnswering, path: str | Path) -> None:
    """Load an official METER ``.ckpt`` into an existing model (the registry's ``load_fn`` form)."""
    load_official_state_dict(model, read_state_dict(path), source=Path(path).name)


def load_meter_checkpoint(path: str | Path, image_size: int = 576, id2label: Mapping[int, str] | None = None,
                          config: MeterConfig | None = None) -> MeterForQuestionAnswering:
    """Build METER from an official ``.ckpt`` (``{'state_dict': ...}``, read with weights_only=True), sizes
    taken from the file unless ``config`` is given, and load it strictly. Eval mode."""
    state_dict = read_state_dict(path)
    config = config or config_from_state_dict(state_dict, image_size, id2label)
    model = MeterForQuestionAnswering(config)
    load_official_state_dict(model, state_dict, source=Path(path).name)
    return model.eval()


# ----------------------------------------------------------------------------------------------- processor
class MeterProcessor:
    """CLIP's image transform (resize the short side, centre crop, CLIP mean/std) and the RoBERTa tokenizer
    (questions padded and truncated to ``max_text_len``). Calling it returns input_ids, attention_mask,
    pixel_values and an all-ones pixel_mask (METER sees the whole crop), like ViltProcessor."""

    def __init__(self, tokenizer, image_size: int = 576, max_text_len: int = 50):
        from transformers import CLIPImageProcessor

        self.tokenizer = tokenizer
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        self.max_text_len = max_text_len

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **_ignored) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            encoded = self.tokenizer(text, padding="longest", truncation=True, max_length=self.max_text_len,
                                     return_tensors="pt")
            out.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        if images is not None:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            out.update(pixel_values=pixels,
                       pixel_mask=torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long))
        return out


# ----------------------------------------------------------------------------------------------- random models
_TINY_WORDS = ("what is the are there a an of in on this that it color how many who where which does do dog cat "
               "bird man woman person people car water sky grass tree picture left right red blue green yellow "
               "black white brown kind sitting standing holding wearing can you see number").split()
_TINY_ANSWERS = ("yes", "no", "2", "red", "dog", "cat", "bird", "water")


def _tiny_tokenizer(max_text_len: int):
    """A byte-level BPE RoBERTa tokenizer over a small vocabulary (every byte, plus whole words built by
    left-to-right merges), built in memory: any text encodes, common question words as one token."""
    from transformers import RobertaTokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    vocab: dict[str, int] = {}
    for token in ("<s>", "<pad>", "</s>", "<unk>"):
        vocab[token] = len(vocab)
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        for spelled in ("\u0120" + word, word):  # with and without the leading space marker
            piece = spelled[0]
            for char in spelled[1:]:
                if piece + char not in vocab:
                    merges.append((piece, char))
                    vocab[piece + char] = len(vocab)
                piece += char
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_text_len)


def tiny_meter(seed: int = 0, image_size: int | None = None):
    """A small random METER (widths 32, 2 heads; 2 CLIP blocks at 64 px, patch 16; 2 RoBERTa layers; 3 fusion
    layers) and a processor built offline. RANDOM weights: its answers mean nothing; it shows the mechanics.
    ``image_size``: the same weights at that input size (``meter_at_size``). Returns ``(model in eval mode,
    processor)``."""
    tokenizer = _tiny_tokenizer(max_text_len=24)
    config = MeterConfig(image_size=64, patch_size=16, vision_width=32, vision_layers=2, vision_heads=2,
                         text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
                         vocab_size=len(tokenizer), text_max_positions=32, hidden_size=32, fusion_layers=3,
                         fusion_heads=2, fusion_intermediate=64, max_text_len=24, num_labels=len(_TINY_ANSWERS),
                         id2label=dict(enumerate(_TINY_ANSWERS)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MeterForQuestionAnswering(config).eval()
    if image_size is not None and image_size != config.image_size:
        model = meter_at_size(model, image_size)
    return model, MeterProcessor(tokenizer, model.config.image_size, config.max_text_len)


def meter_at_size(model: MeterForQuestionAnswering, image_size: int) -> MeterForQuestionAnswering:
    """A new model with ``model``'s weights at input ``image_size``: the position embedding resized as loading
    the checkpoint at a size resizes it (``resize_position_embedding``); ``model`` itself is not changed."""
    config = replace(model.config, image_size=image_size)
    state = model.state_dict()
    state[POSITION_KEY] = resize_position_embedding(state[POSITION_KEY], config.grid)
    sized = MeterForQuestionAnswering(config).eval()
    sized.load_state_dict(state)
    return sized.to(next(model.parameters()).device)


def meter_random(image_size: int = 576) -> nn.Module:
    """METER-CLIP16-RoBERTa for VQA at ``image_size`` px with random weights: the released model's shape and
    cost, for timing without the weights."""
    return MeterForQuestionAnswering(MeterConfig(image_size=image_size)).eval()


# ----------------------------------------------------------------------------------------------- resolving

def load_roberta_tokenizer(tokenizer_dir: str | Path | None = None, weights_dir=None, max_text_len: int = 50):
    """roberta-base's tokenizer (vocab.json + merges.txt): the folder given, then ``$VITLAB_WEIGHTS_DIR/
    roberta-base``, then the Hugging Face cache, then the hub. Raises WeightsNotFoundError saying what to do."""
    from transformers import RobertaTokenizer

    attempts: list[str] = []
    base = Path(weights_dir).expanduser() if weights_dir else weights_dir_from_env()
    folders = [("folder you gave", Path(tokenizer_dir).expanduser())] if tokenizer_dir is not None else []
    if base is not None:
        folders.append(("weights folder", base / ROBERTA_FOLDER_NAME))
    else:
        attempts.append(f"${WEIGHTS_DIR_ENV}/{ROBERTA_FOLDER_NAME}: ${WEIGHTS_DIR_ENV} not set")
    candidates = [(f"{what} {folder}", str(folder), {}) for what, folder in folders]
    candidates.append(("Hugging Face cache", ROBERTA_REPO, {"local_files_only": True}))
    if hub_offline():
        attempts.append("Hugging Face hub: skipped (offline mode)")
    else:
        candidates.append(("Hugging Face hub", ROBERTA_REPO, {}))
    for description, location, kwargs in candidates:
        if not kwargs and location != ROBERTA_REPO and not Path(location).is_dir():
            attempts.append(f"{description}: not present")
            continue
        try:
            tokenizer = RobertaTokenizer.from_pretrained(location, model_max_length=max_text_len, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line of the final message
            attempts.append(f"{description}: {type(exc).__name__}")
            continue
        # Without vocabulary files transformers builds a tokenizer of the special tokens alone, silently.
        if len(tokenizer) > len(set(tokenizer.all_special_tokens)):
            return tokenizer
        attempts.append(f"{description}: no vocabulary files (vocab.json, merges.txt)")
    target = base / ROBERTA_FOLDER_NAME if base else Path(f"${WEIGHTS_DIR_ENV}") / ROBERTA_FOLDER_NAME
    raise WeightsNotFoundError(
        "The RoBERTa tokenizer METER needs was not found. Tried: " + "; ".join(attempts) + ". "
        f"Create {target} with vocab.json and merges.txt of {ROBERTA_REPO} (on a machine with internet: "
        f"`hf download {ROBERTA_REPO} vocab.json merges.txt tokenizer_config.json --local-dir {target}`), "
        "or pass the folder as `tokenizer_dir`.")


def vqa_labels(weights_dir=None, num_labels: int = 3129) -> tuple[dict[int, str], str]:
    """Answer names of METER's VQA head: ``$VITLAB_WEIGHTS_DIR/meter_vqa_labels.json`` (a list or an
    {index: answer} map), else the ViLT-VQA config's id2label (METER builds its answer list with ViLT's
    VQAv2 preprocessing script, so the 3,129 answers and their order are the same), else numbered answers.
    Returns (id2label, where it came from)."""
    base = Path(weights_dir).expanduser() if weights_dir else weights_dir_from_env()
    if base is not None and (base / LABELS_FILE).is_file():
        data = json.loads((base / LABELS_FILE).read_text())
        labels = dict(enumerate(data)) if isinstance(data, list) else {int(k): str(v) for k, v in data.items()}
        return labels, str(base / LABELS_FILE)
    vilt = get_spec(VILT_VQA_NAME)
    vilt_folder = base / vilt.weight_file_stem if base else None
    sources = [("ViLT-VQA folder", str(vilt_folder), {})] if vilt_folder and vilt_folder.is_dir() else []
    sources.append(("ViLT-VQA config in the Hugging Face cache", vilt.hf_repo, {"local_files_only": True}))
    for description, location, kwargs in sources:
        try:
            from transformers import ViltConfig

            id2label = ViltConfig.from_pretrained(location, **kwargs).id2label
            if len(id2label) == num_labels:
                return {int(k): v for k, v in id2label.items()}, description
        except Exception:  # noqa: BLE001 - absent or unreadable: try the next source
            continue
    return {i: f"answer #{i}" for i in range(num_labels)}, "numbered (no answer list found)"


def meter_from_source(spec: ModelSpec, source: WeightsSource, weights_dir: str | Path | None = None,
                      tokenizer_dir: str | Path | None = None, image_size: int | None = None):
    """``(model in eval mode, MeterProcessor)`` from what the resolver chose; the registry's ``loader`` for METER,
    at ``image_size`` (default: the entry's ``input_size``, 576). Random weights give the full-size architecture
    and no processor (for timing)."""
    image_size = image_size or spec.input_size
    if source.is_random:
        return meter_random(image_size), None
    path = checkpoint_path(spec, source)
    tokenizer = load_roberta_tokenizer(tokenizer_dir, weights_dir)
    state_dict = read_state_dict(path)
    head = state_dict.get("vqa_classifier.3.weight")
    labels, _ = vqa_labels(weights_dir, int(head.shape[0]) if head is not None else 3129)
    config = config_from_state_dict(state_dict, image_size, labels)
    model = MeterForQuestionAnswering(config)
    load_official_state_dict(model, state_dict, source=Path(path).name)
    return model.eval(), MeterProcessor(tokenizer, image_size, config.max_text_len)


def load_meter(source: str | Path | None = None, weights_dir: str | Path | None = None,
               tokenizer_dir: str | Path | None = None, image_size: int | None = None):
    """METER-CLIP16-RoBERTa fine-tuned on VQAv2 and its processor, through the one resolver: ``source`` (the
    .ckpt, or a folder holding it), ``<weights dir>/meter_clip16_288_roberta_vqa.ckpt``, the official GitHub
    release (downloaded once; there is no Hugging Face copy). The RoBERTa tokenizer comes from ``tokenizer_dir``,
    ``<weights dir>/roberta-base``, the HF cache or hub (``load_roberta_tokenizer``); answer names from
    ``vqa_labels``. The position embedding is resized to ``image_size`` (METER evaluates VQA at 576; 288 is the
    name's size; 384 is PuMer's benchmark size). Raises WeightsNotFoundError saying what was tried and what to put
    where."""
    spec = get_spec(METER_VQA_NAME)
    if source is not None and Path(source).expanduser().is_dir():
        source = Path(source).expanduser() / f"{spec.weight_file_stem}.ckpt"
    folder = Path(weights_dir).expanduser() if weights_dir else None
    try:
        resolved = resolve(spec, user_file=source, folder=folder)
    except WeightsNotFoundError as exc:
        error = WeightsNotFoundError(f"{exc} METER also needs the roberta-base tokenizer files (vocab.json, "
                                     f"merges.txt) in a {ROBERTA_FOLDER_NAME}/ folder next to it.")
        error.tried = exc.tried
        raise error from exc
    return meter_from_source(spec, resolved, weights_dir, tokenizer_dir, image_size)
