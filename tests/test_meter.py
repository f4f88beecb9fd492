"""METER from transformers parts: strict loading of an official-format checkpoint, key mapping, PuMer on the
fusion layers (exact with nothing reduced, counts per layer, padding, threads)."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.checkpoints import CheckpointError, WeightsNotFoundError
from models.meter import (KEY_TABLE, METER_VQA_FILE, MeterForQuestionAnswering, config_from_state_dict,
                          load_meter, load_meter_checkpoint, official_to_ours, tiny_meter)
from models.meter_pumer import meter_pumer_forward

QUESTION = "what color is the dog?"
NO_REDUCTION = dict(prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0)

# Small sizes for a checkpoint in the official layout; head counts follow METER's width // 64.
VISION_WIDTH, VISION_BLOCKS, PATCH, GRID = 128, 2, 16, 4
TEXT_HIDDEN, TEXT_LAYERS, VOCAB, TEXT_POSITIONS = 64, 2, 600, 40  # VOCAB: covers the tiny tokenizer
HIDDEN, FUSION_LAYERS, LABELS = 64, 2, 5


@pytest.fixture(scope="module")
def meter():
    return tiny_meter(seed=0)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)) for shape in ((70, 90, 3), (90, 64, 3))]


def _official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Keys and shapes of METERTransformerSS (CLIP-16 + RoBERTa, VQA head) written out from the official module
    tree (meter_module.py, clip_model.py, bert_model.py's BertCrossLayer, heads.Pooler), at small sizes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def linear(prefix, out_features, in_features):
        sd[prefix + ".weight"], sd[prefix + ".bias"] = t(out_features, in_features), t(out_features)

    def norm(prefix, width):
        sd[prefix + ".weight"], sd[prefix + ".bias"] = 1 + t(width), t(width)

    w = VISION_WIDTH
    sd["vit_model.visual.conv1.weight"] = t(w, 3, PATCH, PATCH)
    sd["vit_model.visual.class_embedding"] = t(w)
    sd["vit_model.visual.positional_embedding"] = t(GRID * GRID + 1, w)
    norm("vit_model.visual.ln_pre", w)
    for i in range(VISION_BLOCKS):
        block = f"vit_model.visual.transformer.resblocks.{i}"
        sd[f"{block}.attn.in_proj_weight"], sd[f"{block}.attn.in_proj_bias"] = t(3 * w, w), t(3 * w)
        linear(f"{block}.attn.out_proj", w, w)
        norm(f"{block}.ln_1", w)
        linear(f"{block}.mlp.c_fc", 4 * w, w)
        linear(f"{block}.mlp.c_proj", w, 4 * w)
        norm(f"{block}.ln_2", w)
    norm("vit_model.visual.ln_post", w)
    # CLIP's text-side leftovers that METER's CLIP wrapper builds and saves.
    sd["vit_model.token_embedding.weight"] = t(10, 16)
    sd["vit_model.positional_embedding"] = t(7, 16)
    norm("vit_model.ln_final", 16)

    th = TEXT_HIDDEN
    emb = "text_transformer.embeddings"
    sd[f"{emb}.word_embeddings.weight"] = t(VOCAB, th)
    sd[f"{emb}.position_embeddings.weight"] = t(TEXT_POSITIONS, th)
    sd[f"{emb}.token_type_embeddings.weight"] = t(1, th)
    sd[f"{emb}.position_ids"] = torch.arange(TEXT_POSITIONS)[None]
    norm(f"{emb}.LayerNorm", th)

    def bert_attention(prefix, width):
        for name in ("query", "key", "value"):
            linear(f"{prefix}.self.{name}", width, width)
        linear(f"{prefix}.output.dense", width, width)
        norm(f"{prefix}.output.LayerNorm", width)

    def bert_mlp(prefix, width):
        linear(f"{prefix}.intermediate.dense", 4 * width, width)
        linear(f"{prefix}.output.dense", width, 4 * width)
        norm(f"{prefix}.output.LayerNorm", width)

    for i in range(TEXT_LAYERS):
        bert_attention(f"text_transformer.encoder.layer.{i}.attention", th)
        bert_mlp(f"text_transformer.encoder.layer.{i}", th)
    linear("text_transformer.pooler.dense", th, th)

    h = HIDDEN
    linear("cross_modal_text_transform", h, th)
    linear("cross_modal_image_transform", h, w)
    sd["token_type_embeddings.weight"] = t(2, h)
    for stream in ("image", "text"):
        for i in range(FUSION_LAYERS):
            bert_attention(f"cross_modal_{stream}_layers.{i}.attention", h)
            bert_attention(f"cross_modal_{stream}_layers.{i}.crossattention", h)
            bert_mlp(f"cross_modal_{stream}_layers.{i}", h)
        linear(f"cross_modal_{stream}_pooler.dense", h, h)
    linear("vqa_classifier.0", 2 * h, 2 * h)
    norm("vqa_classifier.1", 2 * h)
    linear("vqa_classifier.3", LABELS, 2 * h)
    return sd


def _save_lightning(path, state_dict):
    torch.save({"epoch": 9, "global_step": 100, "pytorch-lightning_version": "1.3.2", "state_dict": state_dict,
                "hyper_parameters": {"config": {"vit": "ViT-B/16", "image_size": GRID * PATCH}}}, path)
    return path


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    return _save_lightning(tmp_path_factory.mktemp("meter") / METER_VQA_FILE, _official_state_dict())


# ----------------------------------------------------------------------------------------------- loading
def test_mapping_covers_the_model_exactly():
    official = _official_state_dict()
    model = MeterForQuestionAnswering(config_from_state_dict(official, image_size=GRID * PATCH))
    mapped, dropped = official_to_ours(official)
    assert set(mapped) == set(model.state_dict())
    assert sorted(dropped) == sorted(["vit_model.token_embedding.weight", "vit_model.positional_embedding",
                                      "vit_model.ln_final.weight", "vit_model.ln_final.bias",
                                      "text_transformer.embeddings.position_ids"])
    # in_proj packs q, k, v in this order.
    packed = official["vit_model.visual.transformer.resblocks.1.attn.in_proj_weight"]
    for i, p in enumerate("qkv"):
        torch.testing.assert_close(mapped[f"vit_model.encoder.layers.1.self_attn.{p}_proj.weight"],
                                   packed[i * VISION_WIDTH:(i + 1) * VISION_WIDTH])
    renamed = {key for key in official if any(key.startswith(o.split("{i}")[0]) for o, _ in KEY_TABLE)}
    assert renamed and not renamed & set(mapped)


def _clip_reference(sd, pixels):
    """The official VisualTransformer forward (nn.MultiheadAttention, QuickGELU, ln_post on every token)."""
    p = "vit_model.visual."
    w = VISION_WIDTH
    x = torch.nn.functional.conv2d(pixels, sd[p + "conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd[p + "positional_embedding"]
    x = nn.functional.layer_norm(x, (w,), sd[p + "ln_pre.weight"], sd[p + "ln_pre.bias"])
    for i in range(VISION_BLOCKS):
        b = f"{p}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(w, max(w // 64, 1), batch_first=True)
        attn.load_state_dict({k[len(b) + 5:]: v for k, v in sd.items() if k.startswith(b + "attn.")})
        h = nn.functional.layer_norm(x, (w,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False)[0]
        h = nn.functional.layer_norm(x, (w,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = nn.functional.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        x = x + nn.functional.linear(h * torch.sigmoid(1.702 * h), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    return nn.functional.layer_norm(x, (w,), sd[p + "ln_post.weight"], sd[p + "ln_post.bias"])


def test_official_checkpoint_loads_strictly_and_computes_like_clip(official_file):
    model = load_meter_checkpoint(official_file, image_size=GRID * PATCH)
    official = _official_state_dict()
    torch.testing.assert_close(model.vqa_classifier[3].weight, official["vqa_classifier.3.weight"])
    torch.testing.assert_close(model.cross_modal_text_layers[1].crossattention.self.key.bias,
                               official["cross_modal_text_layers.1.crossattention.self.key.bias"])
    pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model.vit_model.post_layernorm(model.vit_model(pixel_values=pixels).last_hidden_state)
        torch.testing.assert_close(ours, _clip_reference(official, pixels), atol=1e-5, rtol=1e-5)
        ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
        logits = model(input_ids=ids, attention_mask=(ids != 1).long(), pixel_values=pixels)
    assert logits.shape == (2, LABELS) and torch.isfinite(logits).all()


def test_a_full_lightning_training_checkpoint_loads(tmp_path, training_checkpoint):
    """METER's Lightning checkpoints carry optimizer states, schedulers, callbacks and hyper_parameters."""
    path = training_checkpoint(tmp_path / METER_VQA_FILE, nn.Linear(2, 2), "lightning",
                               state_dict=_official_state_dict())
    model = load_meter_checkpoint(path, image_size=GRID * PATCH)
    torch.testing.assert_close(model.vqa_classifier[3].weight, _official_state_dict()["vqa_classifier.3.weight"])


def test_position_embedding_is_resized_like_meter(official_file):
    model = load_meter_checkpoint(official_file, image_size=6 * PATCH)
    table = model.vit_model.embeddings.position_embedding.weight
    assert table.shape == (37, VISION_WIDTH)
    torch.testing.assert_close(table[0], _official_state_dict()["vit_model.visual.positional_embedding"][0])


def test_a_wrong_file_is_refused_with_the_keys(tmp_path):
    official = _official_state_dict()
    del official["cross_modal_image_pooler.dense.bias"]
    official["itm_score.fc.weight"] = torch.zeros(2, 2 * HIDDEN)
    with pytest.raises(CheckpointError) as info:
        load_meter_checkpoint(_save_lightning(tmp_path / "bad.ckpt", official), image_size=GRID * PATCH)
    message = str(info.value)
    assert "Missing 1 keys: cross_modal_image_pooler.dense.bias" in message
    assert "Unexpected 1 keys: itm_score.fc.weight" in message
    with pytest.raises(CheckpointError, match="Not a METER VQA checkpoint"):
        load_meter_checkpoint(_save_lightning(tmp_path / "other.ckpt", {"model.weight": torch.zeros(2)}))


def test_loader_resolves_the_weights_folder(tmp_path, monkeypatch, meter, official_file, photos):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / METER_VQA_FILE).write_bytes(official_file.read_bytes())
    meter[1].tokenizer.save_pretrained(folder / "roberta-base")
    labels = ["yes", "no", "two", "red", "dog"]
    (folder / "meter_vqa_labels.json").write_text(json.dumps(labels))
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(folder))
    model, processor = load_meter(image_size=GRID * PATCH)
    assert model.id2label == dict(enumerate(labels))
    inputs = processor(images=photos[0], text=QUESTION)
    assert inputs["pixel_values"].shape == (1, 3, GRID * PATCH, GRID * PATCH)
    with torch.inference_mode():
        assert model(**inputs).shape == (1, LABELS)


def test_loader_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VITLAB_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsNotFoundError) as info:
        load_meter(weights_dir=tmp_path)
    message = str(info.value)
    assert METER_VQA_FILE in message and "github.com/zdou0830/METER" in message and "roberta-base" in message


# ----------------------------------------------------------------------------------------------- PuMer
def _inputs(processor, images, texts):
    return processor(images=images, text=texts, return_tensors="pt")


def test_nothing_reduced_equals_the_model(meter, photos):
    model, processor = meter
    inputs = _inputs(processor, photos, [QUESTION, "how many"])
    assert inputs["attention_mask"].float().mean() < 1  # the shorter question is padded
    with torch.inference_mode():
        expected = model(**inputs)
        got = meter_pumer_forward(model, inputs, **NO_REDUCTION, reduce_layers=(0, 1, 2), image_context="block_input")
        pumer_order = meter_pumer_forward(model, inputs, **NO_REDUCTION, reduce_layers=(0, 1, 2))
    # PuMer's code runs each image layer over the text layer's output: not METER's order, even unreduced
    assert not torch.allclose(pumer_order, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _mergeable(count):
    """Bipartite matching merges at most every token of set A (even positions) into set B."""
    return (count + 1) // 2 if count >= 2 else 0


def _expected_counts(text_len, image_len, layers, reduce_layers, prune, image_merge, text_merge):
    """Counts from PuMer's rule: r = round(ratio * tokens entering the layer); CLS tokens never reduced."""
    text, image = [text_len], [image_len]
    for index in range(layers):
        t, i = text[-1], image[-1]
        if index in reduce_layers:
            pruned = min(round(prune * i), i - 2)
            kept = i - 1 - pruned  # patches left after pruning
            i = 1 + kept - min(round(image_merge * image[-1]), _mergeable(kept))
            t = t - min(round(text_merge * t), _mergeable(t - 1))
        text.append(t)
        image.append(i)
    return text, image


@pytest.mark.parametrize("reduce_layers,ratios", [((0, 1, 2), (0.2, 0.2, 0.2)), ((1,), (0.3, 0.1, 0.4))])
def test_counts_per_layer(meter, photos, reduce_layers, ratios):
    model, processor = meter
    inputs = _inputs(processor, photos[0], QUESTION)
    with torch.inference_mode():
        _, trace = meter_pumer_forward(model, inputs, *ratios, reduce_layers=reduce_layers, return_trace=True)
    layers = model.config.fusion_layers
    text, image = _expected_counts(int(inputs["attention_mask"].sum()), 1 + model.config.grid ** 2, layers,
                                   reduce_layers, *ratios)
    assert trace.text_counts[0].tolist() == text
    assert trace.image_counts[0].tolist() == image
    assert [s.layer for s in trace.steps] == list(reduce_layers)
    for step in trace.steps:  # a pruned token may hold several cells merged earlier
        assert step.image_groups.shape == (1, model.config.grid ** 2)
        assert len(step.pruned_cells[0]) >= int(step.image_pruned[0]) > 0
        assert (step.image_groups[0][step.pruned_cells[0]] == -1).all()
    assert len(trace.steps[0].pruned_cells[0]) == int(trace.steps[0].image_pruned[0])


def test_pruning_follows_text_attention(meter, photos):
    """The patches pruned at block 0 are those the text attends to least in the text layer's cross-attention."""
    model, processor = meter
    inputs = _inputs(processor, photos[1], QUESTION)
    layer = model.cross_modal_text_layers[0]
    with torch.inference_mode():
        x = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        y = model.encode_image(inputs["pixel_values"])
        heads = layer.attention.self
        attended = layer.attention(x, torch.zeros(1, 1, 1, x.shape[1]))[0]
        query = layer.crossattention.self.query(attended).view(1, -1, heads.num_attention_heads,
                                                                 heads.attention_head_size).transpose(1, 2)
        key = layer.crossattention.self.key(y).view(1, -1, heads.num_attention_heads,
                                                     heads.attention_head_size).transpose(1, 2)
        probs = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(heads.attention_head_size), -1)
        scores = probs.mean(1).sum(1)[0, 1:]  # over all (real) text tokens, image CLS excluded
        _, trace = meter_pumer_forward(model, inputs, 0.25, 0.0, 0.0, reduce_layers=(0,), return_trace=True)
    pruned = round(0.25 * (1 + model.config.grid ** 2))
    assert sorted(trace.steps[0].pruned_cells[0].tolist()) == sorted(scores.argsort()[:pruned].tolist())


def test_padding_is_never_merged_and_changes_nothing(meter, photos):
    model, processor = meter
    short, long = "how many", QUESTION
    with torch.inference_mode():
        batch = _inputs(processor, photos, [long, short])
        logits, trace = meter_pumer_forward(model, batch, 0.2, 0.3, 0.4, reduce_layers=(0, 1), return_trace=True)
        alone = meter_pumer_forward(model, _inputs(processor, photos[1], short), 0.2, 0.3, 0.4, reduce_layers=(0, 1))
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=0)
    padded = ~batch["attention_mask"][1].bool()
    assert padded.any()
    for step in trace.steps:
        assert (step.text_groups[1][padded.numpy()] == -1).all()
        real = step.text_groups[1][~padded.numpy()]
        assert (real >= 0).all() and real.max() < trace.text_counts[1, step.layer + 1]


def test_two_settings_from_two_threads_on_one_model(meter, photos):
    model, processor = meter
    inputs = _inputs(processor, photos[0], QUESTION)
    settings = [dict(prune_ratio=0.3, image_merge_ratio=0.2, text_merge_ratio=0.0, reduce_layers=(0,)),
                dict(prune_ratio=0.0, image_merge_ratio=0.4, text_merge_ratio=0.3, reduce_layers=(1, 2))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = [meter_pumer_forward(model, inputs, **s, return_trace=True) for s in settings]
    results: dict[int, tuple] = {}

    def run(i):
        with torch.inference_mode():
            for _ in range(3):
                results[i] = meter_pumer_forward(model, inputs, **settings[i], return_trace=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        torch.testing.assert_close(results[i][0], expected[i][0], atol=1e-6, rtol=0)
        assert results[i][1].image_counts.tolist() == expected[i][1].image_counts.tolist()
    assert not np.array_equal(expected[0][1].image_counts, expected[1][1].image_counts)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_registry_entry_builds_and_loads_official_files(official_file):
    from models.registry import METER, get_spec, list_models
    from models.meter import MeterConfig, load_official_file

    spec = get_spec("meter_clip16_288_vqa")
    assert spec.family == METER and list_models(METER) == ["meter_clip16_288_vqa"]
    assert spec.factory == "models.meter:meter_random" and spec.load_fn == "models.meter:load_official_file"
    official = _official_state_dict()
    model = MeterForQuestionAnswering(config_from_state_dict(official, image_size=GRID * PATCH))
    load_official_file(model, official_file)
    torch.testing.assert_close(model.token_type_embeddings.weight, official["token_type_embeddings.weight"])
    # The VQAv2 checkpoint's fine-tuned size is the default; 384 (PuMer's benchmarks) and 288 are offered
    assert MeterConfig().grid == 36 and spec.input_size == 576 and spec.input_sizes == (576, 384, 320, 288)


def test_a_size_is_a_setting_of_the_entry(tmp_path, monkeypatch):
    """load_model builds METER at the size asked (random weights: the full architecture), only at offered sizes."""
    from models.loading import load_model
    from models.registry import get_spec, sized

    spec = get_spec("meter_clip16_288_vqa")
    assert sized(spec, 384).input_size == 384 and sized(spec, None) is spec
    with pytest.raises(ValueError, match="576, 384, 320, 288 px, not 500 px"):
        sized(spec, 500)
    loaded = load_model("meter_clip16_288_vqa", random_weights=True, input_size=288)
    assert loaded.model.config.image_size == 288 and loaded.data_config["input_size"] == (3, 288, 288)
    assert loaded.model.vit_model.embeddings.position_embedding.weight.shape[0] == 18 * 18 + 1


def test_tokenizer_missing_offline_names_the_folder(tmp_path, monkeypatch):
    from models.meter import load_roberta_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as info:
        load_roberta_tokenizer(weights_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "roberta-base") in message and "vocab.json" in message and "offline" in message
