"""PuMer on ViLT: exactness with nothing reduced, text-informed pruning, modality-aware merging, batching, loading."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoints import WeightsNotFoundError
from models.vilt_pumer import load_vilt, pumer_forward, tiny_vilt

QUESTION = "what is the color of the dog?"
NUM_LAYERS = 10


@pytest.fixture(scope="module")
def vilt():
    return tiny_vilt(seed=0)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def wide_photo() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(120, 200, 3), dtype=np.uint8))


def _inputs(processor, images, texts, **kwargs):
    return processor(images=images, text=texts, return_tensors="pt", padding=True, **kwargs)


def test_nothing_reduced_equals_transformers(vilt, photo, wide_photo):
    model, processor = vilt
    # Two images of different shapes (padded pixels, pixel_mask) and two questions of different lengths.
    inputs = _inputs(processor, [photo, wide_photo], [QUESTION, "how many cats?"])
    assert inputs["pixel_mask"].float().mean() < 1 and inputs["attention_mask"].float().mean() < 1
    with torch.inference_mode():
        expected = model(**inputs).logits
        got = pumer_forward(model, inputs, prune_ratio=0, image_merge_ratio=0, text_merge_ratio=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pruning_drops_the_least_attended_patches(vilt, photo):
    model, processor = vilt
    inputs = _inputs(processor, photo, QUESTION)
    layer, ratio = 4, 0.2
    with torch.inference_mode():
        torch.manual_seed(7)  # visual_embed shuffles patches; the same seed gives the same order twice
        _, _, (patch_index, (_, grid_w)) = model.vilt.embeddings.visual_embed(
            inputs["pixel_values"], inputs["pixel_mask"], max_image_length=-1)
        torch.manual_seed(7)
        attentions = model(**inputs, output_attentions=True).attentions[layer]
        _, trace = pumer_forward(model, inputs, reduce_layers=(layer,), prune_ratio=ratio,
                                 image_merge_ratio=0, text_merge_ratio=0, return_trace=True)
    text_len = inputs["input_ids"].shape[1]
    direct = attentions.mean(dim=1)[0, :text_len, text_len + 1:].sum(dim=0)  # text rows -> image patches
    cells = (patch_index[0, :, 0] * grid_w + patch_index[0, :, 1]).numpy()
    image_len = 1 + len(cells)
    prune_r = round(ratio * image_len)
    expected_pruned = np.sort(cells[direct.argsort()[:prune_r].numpy()])

    step = trace.steps[0]
    np.testing.assert_array_equal(step.pruned_cells[0], expected_pruned)
    scores_by_cell = np.full(len(cells), np.nan)
    scores_by_cell[cells] = direct.numpy()
    np.testing.assert_allclose(step.patch_scores[0], scores_by_cell, atol=1e-6)
    assert step.image_pruned[0] == prune_r and step.image_merged[0] == 0
    assert (step.image_groups[0][expected_pruned] == -1).all()


def _expected_counts(text_len, image_len, reduce_layers, prune, merge, text_merge):
    """Independent re-statement of PuMer's schedule: ratios of the count entering each reduce layer."""
    text, image = [text_len], [image_len]
    for layer in range(NUM_LAYERS):
        t, i = text[-1], image[-1]
        if layer in reduce_layers:
            i = i - round(prune * i) - round(merge * i)
            t = t - round(text_merge * t)
        text.append(t)
        image.append(i)
    return text, image


@pytest.mark.parametrize("layers, ratios", [((2, 5, 8), (0.1, 0.3, 0.2)), ((2, 4, 6, 8), (0.2, 0.2, 0.3))])
def test_counts_compound_per_layer(vilt, photo, layers, ratios):
    model, processor = vilt
    inputs = _inputs(processor, photo, QUESTION)
    with torch.inference_mode():
        _, trace = pumer_forward(model, inputs, layers, *ratios, return_trace=True)
    text, image = _expected_counts(inputs["input_ids"].shape[1], 1 + 25, layers, *ratios)
    assert trace.text_counts[0].tolist() == text
    assert trace.image_counts[0].tolist() == image
    assert [s.layer for s in trace.steps] == list(layers)


@pytest.mark.parametrize("protect_image_cls", [False, True])
def test_merges_stay_within_their_modality(vilt, photo, protect_image_cls):
    model, processor = vilt
    inputs = _inputs(processor, photo, QUESTION)
    with torch.inference_mode():
        _, trace = pumer_forward(model, inputs, (2, 5, 8), 0.1, 0.3, 0.2, return_trace=True,
                                 protect_image_cls=protect_image_cls)
    for step in trace.steps:
        text_after = trace.text_counts[0, step.layer + 1]
        image_after = trace.image_counts[0, step.layer + 1]
        text_ids = set(step.text_groups[0][step.text_groups[0] >= 0].tolist())
        image_ids = set(step.image_groups[0][step.image_groups[0] >= 0].tolist())
        assert text_ids.isdisjoint(image_ids)
        assert max(text_ids) < text_after <= min(image_ids | {int(step.image_cls[0])} - {-1})
        assert len(text_ids) == text_after  # every text token group is made of input text tokens only
        cls_alone = step.image_cls[0] >= 0 and step.image_cls[0] not in image_ids
        assert len(image_ids) == image_after - cls_alone  # ... and every image token of patches (or the CLS)
        assert step.text_groups[0][0] == 0  # text CLS stays alone at the front
        assert (step.text_groups[0] == 0).sum() == 1
        if protect_image_cls:  # the correction: the image CLS holds no patch, first image token, never pruned
            assert step.image_cls[0] == text_after and cls_alone
    merged_text = trace.steps[-1].text_groups[0]
    assert len(set(merged_text.tolist())) < len(merged_text)  # merging did happen


def test_padding_and_batching_do_not_change_answers(vilt, photo, wide_photo):
    model, processor = vilt
    other = "how many animals are there in this picture?"
    with torch.inference_mode():
        alone = [pumer_forward(model, _inputs(processor, img, q)) for img, q in [(photo, QUESTION), (wide_photo, other)]]
        padded_inputs = processor(images=photo, text=QUESTION, return_tensors="pt", padding="max_length", max_length=24)
        padded = pumer_forward(model, padded_inputs)
        batched = pumer_forward(model, _inputs(processor, [photo, wide_photo], [QUESTION, other]))
    assert padded_inputs["attention_mask"].float().mean() < 0.5
    torch.testing.assert_close(padded, alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=0)


def test_settings_are_arguments_and_the_model_is_untouched(vilt, photo):
    model, processor = vilt
    inputs = _inputs(processor, photo, QUESTION)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = [dict(prune_ratio=0.1), dict(prune_ratio=0.3, image_merge_ratio=0.1, proportional_attention=True)]
    with torch.inference_mode():
        sequential = [pumer_forward(model, inputs, **s) for s in settings]
        threaded: dict[int, torch.Tensor] = {}

        def run(i):
            with torch.inference_mode():
                threaded[i] = pumer_forward(model, inputs, **settings[i])

        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [w.start() for w in workers]
        [w.join() for w in workers]
    assert not torch.allclose(sequential[0], sequential[1])
    for i in range(2):
        torch.testing.assert_close(threaded[i], sequential[i])
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_loader_reads_a_saved_folder(tmp_path, vilt, photo):
    model, processor = vilt
    folder = tmp_path / "vilt-b32-finetuned-vqa"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loaded, loaded_processor = load_vilt(weights_dir=tmp_path)
    inputs = _inputs(loaded_processor, photo, QUESTION)
    with torch.inference_mode():
        torch.testing.assert_close(pumer_forward(loaded, inputs), pumer_forward(model, inputs))
    assert loaded.config.id2label == model.config.id2label


def test_loader_offline_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VITLAB_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as info:
        load_vilt(source=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(tmp_path / "vilt-b32-finetuned-vqa") in message
    assert "download dandelin/vilt-b32-finetuned-vqa --local-dir" in message
    assert "offline" in message and "nowhere" in message


def test_answer_question_records_and_figures(vilt, wide_photo):
    import json

    from analysis.vision_language import (PuMerSettings, answer_question, counts_frame, merge_overlay, pruned_overlay,
                                records_to_json, text_groups_html, token_counts_figure)

    model, processor = vilt
    settings = PuMerSettings(timing_iters=1, timing_rounds=1)
    result = answer_question(model, processor, wide_photo, QUESTION, settings)
    grid_h, grid_w = result.trace.grid_shape
    assert result.image.size == (grid_w * result.patch_size, grid_h * result.patch_size)
    assert len(result.full_answers) == len(result.pumer_answers) == 5
    assert result.text_tokens[0] == "[CLS]" and result.text_tokens[-1] == "[SEP]"
    assert result.speed.speedup > 0 and result.speed.memory_saving is not None  # the CPU allocator's peak too
    assert 0 < result.speed.pumer_kept_mib < result.speed.full_kept_mib  # fewer tokens in every later layer
    assert result.speed.pumer_gflops < result.speed.full_gflops

    record = json.loads(json.dumps(records_to_json(result)))
    assert [s["layer"] for s in record["reduce_steps"]] == [2, 5, 8]
    assert record["tokens_per_layer"][-1]["image_tokens"] == result.trace.image_counts[0, -1]
    assert counts_frame(result.trace)["total_tokens"].is_monotonic_decreasing

    original = np.asarray(result.image)
    for index, step in enumerate(result.trace.steps):
        pruned = np.asarray(pruned_overlay(result, index))
        assert pruned.shape == original.shape
        row, col = divmod(int(step.pruned_cells[0][0]), grid_w)
        patch = np.s_[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32]
        assert not np.array_equal(pruned[patch], original[patch])  # the pruned patch is marked
        assert np.asarray(merge_overlay(result, index)).shape == original.shape
        assert text_groups_html(result, index).count("<span") == len(result.text_tokens)
    assert len(token_counts_figure(result.trace).data) == 6
