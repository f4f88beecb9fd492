"""Head redundancy: metrics against direct numpy computations, recording forwards against model(x)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from analysis import head_redundancy as hr
from models.attention_recording import (
    BlockAttention, UnsupportedModelError, from_windows, record_attention, to_windows,
)


# ----------------------------------------------------------------------------- metrics on small known inputs

def _numpy_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_head_similarity_equals_direct_numpy_computation():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 5, 5)).astype(np.float32)  # 3 images, 4 heads
    expected = np.array([[np.mean([_numpy_cosine(maps[m, i], maps[m, j]) for m in range(3)])
                          for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(hr.head_similarity(maps), expected, atol=1e-5)


def test_redundancy_is_max_off_diagonal():
    sim = np.array([[1.0, 0.2, 0.7], [0.2, 1.0, 0.4], [0.7, 0.4, 1.0]])
    np.testing.assert_allclose(hr.head_redundancy(sim), [0.7, 0.4, 0.7])
    assert np.isnan(hr.head_redundancy(np.ones((1, 1)))).all()


def test_identical_heads_score_one():
    maps = torch.rand(2, 3, 6, 6).softmax(-1)
    maps[:, 2] = maps[:, 0]
    redundancy = hr.head_redundancy(hr.head_similarity(maps))
    assert redundancy[0] == pytest.approx(1.0, abs=1e-6) and redundancy[2] == pytest.approx(1.0, abs=1e-6)
    assert redundancy[1] < 0.999


def test_feature_similarity_is_linear_cka():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2, 3, 10, 4)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    feats[:, 2] = feats[:, 0] @ rotation.astype(np.float32)  # same representation, another basis

    def cka(x, y):
        x, y = x - x.mean(0), y - y.mean(0)
        return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    expected = np.array([[np.mean([cka(feats[m, i], feats[m, j]) for m in range(2)]) for j in range(3)]
                         for i in range(3)])
    sim = hr.head_feature_similarity(feats)
    np.testing.assert_allclose(sim, expected, atol=1e-5)
    assert sim[0, 2] == pytest.approx(1.0, abs=1e-5)


def test_cluster_order_puts_similar_heads_together():
    groups = np.array([0, 1, 0, 1, 0])
    sim = np.where(groups[:, None] == groups[None, :], 0.9, 0.1)
    np.fill_diagonal(sim, 1.0)
    order = hr.cluster_order(sim)
    assert sorted(order) == list(range(5))
    labels = groups[order]
    assert (np.diff(labels) != 0).sum() == 1  # one boundary between the two groups


def test_offset_profile_of_self_attention_is_the_centre_bin():
    eye = torch.eye(1 + 9).expand(2, 2, 10, 10).clone()  # CLS + 3x3 patches, every token attends to itself
    block = BlockAttention(block=0, stage=0, kind="mhsa", batch_size=2, num_heads=2, grid=(3, 3),
                           num_prefix_tokens=1, maps=eye)
    profile = hr.offset_profile(block, reach=1)
    assert profile.shape == (2, 9 + 2)
    np.testing.assert_allclose(profile[:, 4], 1.0)  # offset (0, 0) is the middle of the 3x3 bins
    np.testing.assert_allclose(profile.sum(1), 1.0)


# ----------------------------------------------------------------------------- recording forwards

def _assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training


def test_deit_recording_matches_model_and_maps_are_row_stochastic(deit_tiny_real, deit_tiny_batch):
    x = deit_tiny_batch[:2]
    before = {k: v.clone() for k, v in deit_tiny_real.state_dict().items()}
    with torch.inference_mode():
        reference = deit_tiny_real(x)
    plain, empty = record_attention(deit_tiny_real, x, blocks=[])
    assert empty.blocks == [] and torch.allclose(plain, reference, atol=1e-5, rtol=0)
    logits, record = record_attention(deit_tiny_real, x)
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
    assert [b.block for b in record.blocks] == list(range(12)) and record.kind == "mhsa"
    for block in record.blocks:
        assert block.maps.shape == (2, 3, 197, 197) and block.head_outputs.shape == (2, 3, 197, 64)
        assert block.maps.dtype == torch.float32 and block.maps.device.type == "cpu"
        torch.testing.assert_close(block.maps.sum(-1), torch.ones(2, 3, 197))
    assert record.relative_depth(0) == 0.0 and record.relative_depth(11) == 1.0
    _assert_untouched(deit_tiny_real, before)


def test_record_only_some_blocks_and_skip_outputs(deit_tiny_real, deit_tiny_batch):
    _, record = record_attention(deit_tiny_real, deit_tiny_batch[:1], blocks=[3, 10], store_head_outputs=False)
    assert [b.block for b in record.blocks] == [3, 10]
    assert all(b.head_outputs is None and b.maps is not None for b in record.blocks)
    with pytest.raises(IndexError):
        record_attention(deit_tiny_real, deit_tiny_batch[:1], blocks=[12])


@pytest.fixture(scope="module")
def efficientvit_m0():
    """Random-init EfficientViT-M0 whose zero-initialised BN scales and attention biases are randomised,
    so that every attention head actually changes the logits (timm zero-inits the residual branches)."""
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_m0", pretrained=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for name, param in model.named_parameters():
            if "attention_biases" in name:
                param.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("size", [224, 192])  # 192 px: feature maps not divisible by the window -> padding
def test_efficientvit_recording_matches_model(efficientvit_m0, size):
    x = torch.randn(2, 3, size, size)
    caches = [m.attn.attention_bias_cache for m in efficientvit_m0.modules() if hasattr(m, "window_resolution")]
    for cache in caches:
        cache.clear()
    _, record = record_attention(efficientvit_m0, x)
    assert all(cache == {} for cache in caches), "the recording forward must not write the model's bias cache"
    with torch.inference_mode():
        reference = efficientvit_m0(x)
    logits, _ = record_attention(efficientvit_m0, x, blocks=[])
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
    logits, record = record_attention(efficientvit_m0, x)
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)
    assert record.kind == "cga" and record.stage_of_block == (0, 1, 1, 2, 2, 2)
    first = record.blocks[0]
    assert first.window == 7 and first.grid == (size // 16, size // 16)
    assert first.maps.shape == (2 * first.windows_per_image, 4, 49, 49)
    assert first.head_outputs.shape[:3] == (2 * first.windows_per_image, 4, 49)
    for block in record.blocks:
        torch.testing.assert_close(block.maps.sum(-1), torch.ones(block.maps.shape[:-1]))


def test_windows_round_trip():
    x = torch.randn(2, 5, 12, 9)
    windows, layout = to_windows(x, 7)
    assert windows.shape == (2 * 2 * 2, 5, 7, 7) and (layout.rows, layout.cols) == (2, 2)
    assert torch.equal(from_windows(windows, layout), x)


def test_unsupported_model_gets_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="not Linear"):
        record_attention(torch.nn.Linear(3, 3), torch.randn(1, 3))


def test_two_threads_with_different_settings_share_one_model(deit_tiny_real, deit_tiny_batch):
    x = deit_tiny_batch[:1]
    expected = {b: record_attention(deit_tiny_real, x, blocks=[b])[1].blocks[0].maps for b in (1, 9)}
    got = {}

    def run(block):
        got[block] = record_attention(deit_tiny_real, x, blocks=[block])[1].blocks[0].maps

    threads = [threading.Thread(target=run, args=(b,)) for b in (1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[b], expected[b]) for b in (1, 9))


# ----------------------------------------------------------------------------- overlays

def test_cga_query_map_is_stitched_into_its_window(efficientvit_m0):
    x = torch.randn(1, 3, 224, 224)
    _, record = record_attention(efficientvit_m0, x, blocks=[0], store_head_outputs=False)
    block = record.blocks[0]  # 14x14 grid, 2x2 windows of 7x7
    grid = hr.query_attention_grid(block, image=0, head=1, query=(9, 3))  # window (1, 0), local (2, 3)
    assert grid.shape == (14, 14)
    assert grid[7:, :7].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert grid[:7].abs().sum() == 0 and grid[7:, 7:].abs().sum() == 0
    torch.testing.assert_close(grid[7:, :7].flatten(), block.maps[2, 1, 2 * 7 + 3])


def test_overlays_one_per_head(deit_tiny_real, deit_tiny_batch):
    cfg = deit_tiny_real.pretrained_cfg
    overlays = hr.attention_overlays(deit_tiny_real, deit_tiny_batch[0], 11, cfg["mean"], cfg["std"], (0.5, 0.5))
    assert len(overlays) == 3 and overlays[0].size == (224, 224)
    sheet = hr.montage(overlays, ["h0", "h1", "h2"], columns=3)
    assert sheet.size == (672, 224)


# ----------------------------------------------------------------------------- the real DeiT-Tiny

@pytest.fixture(scope="module")
def deit_tiny_result(deit_tiny_real, shared_photos):
    import timm.data

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=deit_tiny_real))
    loaded = SimpleNamespace(name="deit_tiny_patch16_224", model=deit_tiny_real, transform=transform,
                             weights=SimpleNamespace(is_random=False))
    steps = []
    results = hr.analyze_models([loaded], shared_photos, progress=lambda f, m: steps.append(f), chunk=2)
    assert steps and steps[-1] == pytest.approx(1.0)
    return results[0]


def test_real_deit_tiny_later_blocks_are_more_redundant(deit_tiny_result):
    mean = deit_tiny_result.mean_redundancy()
    feature = deit_tiny_result.mean_redundancy(hr.FEATURE)
    print("\nDeiT-Tiny (real weights, 5 photos) mean head redundancy per block")
    print("  attention maps:", " ".join(f"{v:.3f}" for v in mean))
    print("  outputs (CKA): ", " ".join(f"{v:.3f}" for v in feature))
    assert deit_tiny_result.num_images == 5 and len(mean) == 12
    assert ((0 <= mean) & (mean <= 1 + 1e-6)).all()
    assert mean[-4:].mean() > mean[:4].mean()  # the paper's observation for MHSA models


def test_tables_and_figures(deit_tiny_result, efficientvit_m0):
    cga = hr.analyze_model(efficientvit_m0, torch.randn(2, 3, 224, 224), "efficientvit_m0", random_weights=True)
    results = [deit_tiny_result, cga]
    table = hr.to_dataframe(results)
    assert len(table) == 12 * 3 + 6 * 4 and not table["attention_redundancy"].isna().any()
    assert set(table["attention_type"]) == {"mhsa", "cga"}
    assert len(hr.similarity_dataframe(results)) == 12 * 9 + 6 * 16
    assert len(hr.similarity_heatmaps(cga).data) == 6
    depth = hr.redundancy_vs_depth(results)
    assert {t.xaxis for t in depth.data} == {"x", "x2"}  # MHSA left, CGA right
    assert "random weights" in depth.data[1].name
    # Issue 30: without EfficientViT (no weights on a first visit) there was an empty "Cascaded group attention" panel
    for alone, title in ((deit_tiny_result, "Multi-head"), (cga, "Cascaded")):
        single = hr.redundancy_vs_depth([alone])
        assert [a.text.split(" ")[0] for a in single.layout.annotations] == [title]
        assert "xaxis2" not in single.to_dict()["layout"] and single.data[0].xaxis == "x"
    assert cga.embedding.shape == (24, 2) and len(hr.head_embedding_figure(cga).data) == 6


def test_page_analysis_and_dataset_task_share_one_accumulator():
    """analyze_model (page) and analysis.run's head-similarity task run HeadSimilaritySums: same result,
    whatever the chunking, and the task's sums are the accumulator's."""
    from analysis.runs.head_similarity import HeadSimilarityTask

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_heads=3,
                              embed_dim=24).eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    page = hr.analyze_model(model, x, "tiny", chunk=2)
    whole = hr.analyze_model(model, x, "tiny", chunk=5)
    task = HeadSimilarityTask(model, (3, 32, 32), "tiny")
    assert task.sums is task.accumulator.sums and isinstance(task.accumulator, hr.HeadSimilaritySums)
    task.update(x[:3], torch.zeros(3)), task.update(x[3:], torch.zeros(2))
    dataset = task.result(task.sums)
    assert page.num_images == dataset.num_images == 5
    for a, b, c in zip(page.blocks, whole.blocks, dataset.blocks):
        for field in ("attention_similarity", "feature_similarity", "offset_profile"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(getattr(a, field), getattr(c, field), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_twelve_blocks():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=12, num_heads=3,
                              embed_dim=24).eval()
    return hr.analyze_model(model, torch.randn(2, 3, 32, 32), "tiny", random_weights=True)


def test_cka_redundancy_axis_says_cka_not_cosine(tiny_twelve_blocks):
    """Issue 20: in CKA mode the y-axis still said 'max cosine'."""
    cka = hr.redundancy_vs_depth([tiny_twelve_blocks], hr.FEATURE).layout.yaxis.title.text
    assert "CKA" in cka and "cosine" not in cka
    cosine = hr.redundancy_vs_depth([tiny_twelve_blocks], hr.ATTENTION).layout.yaxis.title.text
    assert "cosine" in cosine and "CKA" not in cosine


def test_mds_gives_every_block_its_own_colour_and_no_overlapping_labels(tiny_twelve_blocks):
    """Issue 20: blocks 0/10 and 1/11 shared a colour (plotly's ten-colour cycle); 36 text labels overlapped."""
    figure = hr.head_embedding_figure(tiny_twelve_blocks)
    colours = [trace.marker.color for trace in figure.data]
    assert len(colours) == 12 and all(isinstance(c, str) for c in colours)
    assert len(set(colours)) == 12
    assert all("text" not in trace.mode for trace in figure.data)  # names in the hover, not on the chart


def _two_heads_alike(similarity: float) -> hr.RedundancyResult:
    sim = np.array([[1.0, similarity], [similarity, 1.0]])
    block = hr.BlockRedundancy(0, 0, 0.0, sim, sim, np.array([[0.0, 1.0], [1.0, 0.0]]))
    return hr.RedundancyResult("m", "mhsa", 1, True, [block], np.array([[0.0, 0.0], [1.0, 1.0]]))


def test_alike_heads_note_writes_a_similarity_that_reads_right():
    """Issue 30: 'attention maps at least 1.000 alike': 0.9997 rounded up to what 'at least' cannot claim."""
    (note,) = hr.untrained_notes(_two_heads_alike(0.99973))
    assert "cosine similarity ≥ 0.999 in every block" in note and "1.000" not in note and "alike" not in note
    (note,) = hr.untrained_notes(_two_heads_alike(0.93456))
    assert "cosine similarity ≥ 0.934 in every block" in note
    (note,) = hr.untrained_notes(_two_heads_alike(1.0 - 1e-8))
    assert "identical attention maps" in note and "≥" not in note
    assert hr.untrained_notes(_two_heads_alike(0.5)) == []
