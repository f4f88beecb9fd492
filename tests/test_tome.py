"""ToMe: the explicit forward, bipartite matching, merging, the trace, the merge map and the r sweep."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from analysis.token_reduction import tome_merge_map_image
from analysis.token_reduction.metrics import plot_agreement, top5_overlap
from analysis.tome_agreement import agreement_sweep
from models.tome import (
    Matching,
    attention_with_size_bias,
    merge_groups,
    merge_schedule,
    merge_tokens,
    pick_merges,
    size_bias,
    token_destinations,
    tome_forward,
)


def small_vit(class_token: bool = True, seed: int = 0) -> VisionTransformer:
    """A random ViT with an 8x8 patch grid (64 patches), 4 blocks, width 48: fast on 2 CPU cores."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    if not class_token:
        kwargs.update(class_token=False, global_pool="avg")
    return VisionTransformer(**kwargs).eval()


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    return small_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- equality with the plain model
@pytest.mark.parametrize("proportional", [True, False])
@pytest.mark.parametrize("class_token", [True, False])
def test_r0_equals_model(class_token, proportional, images):
    model = small_vit(class_token)
    with torch.inference_mode():
        torch.testing.assert_close(
            tome_forward(model, images, r=0, proportional_attention=proportional), model(images), atol=1e-5, rtol=0
        )


@pytest.mark.shared
@pytest.mark.parametrize("proportional", [True, False])
def test_r0_equals_real_deit_tiny(deit_tiny_real, deit_tiny_batch, proportional):
    batch = deit_tiny_batch[:2]
    with torch.inference_mode():
        torch.testing.assert_close(
            tome_forward(deit_tiny_real, batch, r=0, proportional_attention=proportional),
            deit_tiny_real(batch), atol=1e-5, rtol=0,
        )


def test_batch_is_processed_like_single_images(vit, images):
    """Vectorised matching must not mix images: each row equals that image run alone."""
    with torch.inference_mode():
        together = tome_forward(vit, images, r=8)
        alone = torch.cat([tome_forward(vit, images[i : i + 1], r=8) for i in range(len(images))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_merging_changes_logits(vit, images):
    with torch.inference_mode():
        assert not torch.allclose(tome_forward(vit, images, r=8), vit(images), atol=1e-4)


# ---------------------------------------------------------------- schedule and token counts
def test_merge_schedule_forms_and_clipping():
    assert merge_schedule(13, 12, 197) == [13] * 12
    assert merge_schedule("13", 12, 197) == [13] * 12
    assert merge_schedule("5,4,3,2", 4, 65) == [5, 4, 3, 2]
    decreasing = merge_schedule("decreasing:10", 4, 197)
    assert decreasing == sorted(decreasing, reverse=True) and decreasing[0] == 15 and decreasing[-1] == 5
    # 65 tokens, CLS protected: at most (65 - 1) // 2 = 32, then 16, 8, 4.
    assert merge_schedule(100, 4, 65) == [32, 16, 8, 4]
    assert merge_schedule(-3, 2, 65) == [0, 0]
    tokens = 197 - sum(merge_schedule(1000, 40, 197))
    assert tokens == 2  # CLS + one patch token always remain
    with pytest.raises(ValueError, match="blocks"):
        merge_schedule([1, 2], 4, 65)
    with pytest.raises(ValueError, match="merge spec"):
        merge_schedule("thirteen", 4, 65)


@pytest.mark.parametrize("r", [5, [3, 0, 7, 1], "decreasing:6"])
def test_tokens_after_each_layer_drop_by_r(vit, images, r):
    with torch.inference_mode():
        _, trace = tome_forward(vit, images, r=r, return_trace=True)
    schedule = merge_schedule(r, 4, 65)
    assert trace.schedule == schedule
    before = [65] + trace.tokens_per_layer[:-1]
    assert [b - a for b, a in zip(before, trace.tokens_per_layer)] == schedule
    assert [s.shape[1] for s in trace.sizes] == trace.tokens_per_layer


# ---------------------------------------------------------------- groups and the class token
def test_every_patch_in_exactly_one_group(vit, images):
    with torch.inference_mode():
        _, trace = tome_forward(vit, images, r=9, return_trace=True)
    for layer, tokens in enumerate(trace.tokens_per_layer):
        assignment = trace.assignments[layer]
        assert assignment.shape == (3, 64)
        for image in range(3):
            groups = merge_groups(trace, layer, image)
            assert len(groups) == tokens - 1  # every patch token holds at least one patch
            assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(64))
            # the recorded sizes are the group sizes (CLS counts itself)
            counts = np.bincount(assignment[image], minlength=tokens)
            assert counts[0] == 0
            np.testing.assert_array_equal(counts[1:], trace.sizes[layer][image, 1:])
            assert trace.sizes[layer][image, 0] == 1


def test_cls_is_never_merged(vit, images):
    with torch.inference_mode():
        _, trace = tome_forward(vit, images, r=32, return_trace=True)
    assert trace.tokens_per_layer[-1] == 5  # 65 -> 33 -> 17 -> 9 -> 5: merged to the limit
    for prefix, patches in zip(trace.prefix_assignments, trace.assignments):
        assert (prefix == 0).all()
        assert (patches > 0).all()


def test_model_without_class_token_merges_all_tokens(images):
    model = small_vit(class_token=False)
    with torch.inference_mode():
        _, trace = tome_forward(model, images, r=32, return_trace=True)
    assert trace.num_prefix_tokens == 0
    assert trace.tokens_per_layer == [32, 16, 8, 4]
    assert np.array_equal(np.sort(np.concatenate(merge_groups(trace, 3))), np.arange(64))


# ---------------------------------------------------------------- matching and merging on known tensors
def known_metric() -> torch.Tensor:
    """7 tokens with one-hot keys; CLS (0) duplicates token 1 and token 4 (A) duplicates token 5 (B)."""
    keys = torch.eye(7)
    keys[0] = keys[1]
    keys[4] = keys[5]
    return keys[None]


def test_matching_picks_the_identical_pair_and_protects_cls():
    matching = pick_merges(known_metric(), r=1, protect_first=True)
    # A = tokens 0, 2, 4, 6 ; B = tokens 1, 3, 5. Token 4 is A[2], token 5 is B[2].
    assert matching.merged_a.tolist() == [[2]]
    assert matching.into_b.tolist() == [[2]]
    assert matching.kept_a.tolist() == [[0, 1, 3]]
    unprotected = pick_merges(known_metric(), r=1, protect_first=False)
    assert unprotected.merged_a.tolist() in ([[0]], [[2]])  # CLS's perfect match is allowed now
    assert pick_merges(known_metric(), r=2, protect_first=True).merged_a[0, :1].tolist() == [2]


def test_merged_token_is_size_weighted_mean():
    x = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)
    sizes = torch.tensor([1.0, 2.0, 1.0, 3.0, 4.0, 1.0, 2.0]).reshape(1, 7, 1)
    # merge A[1] (token 2) and A[3] (token 6) both into B[0] (token 1); keep A[0], A[2]
    matching = Matching(
        kept_a=torch.tensor([[0, 2]]), merged_a=torch.tensor([[1, 3]]), into_b=torch.tensor([[0, 0]]), num_a=4, num_b=3
    )
    merged, new_sizes = merge_tokens(x, sizes, matching)
    assert merged.shape == (1, 5, 2)
    expected_b0 = (2 * x[0, 1] + 1 * x[0, 2] + 2 * x[0, 6]) / 5
    torch.testing.assert_close(merged[0, 2], expected_b0)
    torch.testing.assert_close(merged[0, 0], x[0, 0])
    torch.testing.assert_close(merged[0, 1], x[0, 4])
    torch.testing.assert_close(merged[0, 3:], x[0, [3, 5]])
    assert new_sizes[0, :, 0].tolist() == [1.0, 4.0, 5.0, 3.0, 1.0]
    assert token_destinations(matching).tolist() == [[0, 2, 2, 3, 1, 4, 2]]


def test_merge_preserves_size_weighted_total():
    """Merging is an average: the size-weighted sum of tokens does not change."""
    x = torch.randn(2, 65, 16)
    sizes = torch.randint(1, 5, (2, 65, 1)).float()
    merged, new_sizes = merge_tokens(x, sizes, pick_merges(torch.randn(2, 65, 8), r=20))
    torch.testing.assert_close((merged * new_sizes).sum(1), (x * sizes).sum(1), atol=1e-4, rtol=1e-5)
    assert new_sizes.sum().item() == sizes.sum().item()


# ---------------------------------------------------------------- proportional attention
def test_proportional_attention_with_unit_sizes_is_plain_attention(vit):
    attn = vit.blocks[0].attn
    x = torch.randn(2, 65, 48)
    with torch.inference_mode():
        biased, _ = attention_with_size_bias(attn, x, size_bias(torch.ones(2, 65, 1), True))
        torch.testing.assert_close(biased, attn(x), atol=1e-5, rtol=0)
        assert size_bias(torch.full((2, 65, 1), 3.0), False) is None


def test_proportional_attention_counts_a_token_size_times(vit):
    """log(size) on a key is the same as that key/value appearing ``size`` times."""
    attn = vit.blocks[1].attn
    x = torch.randn(1, 9, 48)
    sizes = torch.ones(1, 9, 1)
    sizes[0, 4] = 3.0
    duplicated = torch.cat([x, x[:, [4, 4]]], dim=1)
    with torch.inference_mode():
        proportional, _ = attention_with_size_bias(attn, x, size_bias(sizes, True))
        plain_on_copies = attn(duplicated)[:, :9]
        torch.testing.assert_close(proportional, plain_on_copies, atol=1e-5, rtol=0)
        unbiased, _ = attention_with_size_bias(attn, x, None)
        assert not torch.allclose(unbiased, plain_on_copies, atol=1e-4)


# ---------------------------------------------------------------- the shared model stays untouched
def test_model_is_not_mutated_and_threads_do_not_interfere(vit, images):
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    with torch.inference_mode():
        expected = {r: tome_forward(vit, images, r=r) for r in (2, 12)}
    results: dict[int, torch.Tensor] = {}

    def run(r: int) -> None:
        with torch.inference_mode():
            for _ in range(3):
                results[r] = tome_forward(vit, images, r=r)

    threads = [threading.Thread(target=run, args=(r,)) for r in (2, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for r in (2, 12):
        torch.testing.assert_close(results[r], expected[r])
    for key, value in vit.state_dict().items():
        assert torch.equal(value, state[key])
    assert not vit.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())


def test_unsupported_model_is_refused():
    with pytest.raises(TypeError, match="VisionTransformer"):
        tome_forward(torch.nn.Linear(3, 3), torch.randn(1, 3))


# ---------------------------------------------------------------- the merge map image
def test_merge_map_image_size_and_group_colours():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assignment = np.arange(1, 65)  # no merging
    assignment[:32] = 1  # the top half is one group
    painted = tome_merge_map_image(photo, assignment, grid=(8, 8), patch=8)
    assert painted.size == (64, 64)
    pixels = np.asarray(painted).astype(int)
    assert not np.array_equal(pixels, photo)
    top_mean = photo[:32].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(pixels[10, 20], top_mean, atol=0.51)  # inside the merged group
    np.testing.assert_allclose(pixels[44, 44], photo[40:48, 40:48].reshape(-1, 3).mean(0), atol=0.51)
    assert (pixels[31:33, 10] == 255).all()  # the border between the group and the row below


@pytest.mark.shared
def test_merge_map_on_real_photo(deit_tiny_real, deit_tiny_batch, shared_photos):
    with torch.inference_mode():
        _, trace = tome_forward(deit_tiny_real, deit_tiny_batch[:1], r=16, return_trace=True)
    photo = shared_photos[0].resize((224, 224))
    painted = tome_merge_map_image(photo, trace.assignments[-1][0], grid=trace.grid_size, patch=16)
    assert isinstance(painted, Image.Image) and painted.size == (224, 224)
    assert not np.array_equal(np.asarray(painted), np.asarray(photo))
    assert len(merge_groups(trace, 11)) == trace.tokens_per_layer[-1] - 1 == 10


# ---------------------------------------------------------------- the r sweep
def test_top5_overlap_counts_shared_classes():
    reference = torch.tensor([[9.0, 8, 7, 6, 5, 0, 0]])
    other = torch.tensor([[9.0, 8, 7, 0, 0, 6, 5]])
    assert top5_overlap(reference, other) == pytest.approx(3 / 5)


@pytest.mark.shared
def test_agreement_sweep_on_real_deit_tiny(deit_tiny_real, deit_tiny_batch):
    rows = agreement_sweep(deit_tiny_real, deit_tiny_batch, r_values=[0, 8, 16])
    assert [row.r for row in rows] == [0, 8, 16]
    assert rows[0].top1_agreement == 1.0 and rows[0].top5_overlap_mean == 1.0
    for row in rows:
        assert 0.0 <= row.top1_agreement <= 1.0 and 0.0 <= row.top5_overlap_mean <= 1.0
    assert [row.tokens_after_last_layer for row in rows] == [197, 101, 11]
    assert rows[0].gflops_per_image == pytest.approx(2.5, abs=0.1)  # DeiT-Tiny: 1.25 GMACs
    assert rows[0].gflops_per_image > rows[1].gflops_per_image > rows[2].gflops_per_image
    figure = plot_agreement(rows)
    assert len(figure.data) == 3 and list(figure.data[0].x) == [0, 8, 16]


# ---------------------------------------------------------------- the schedule ceiling
def _tokens_seen(model: VisionTransformer, forward) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of every block during ``forward()``; hooks on a test-owned model."""
    seen: list[list[int]] = [[] for _ in model.blocks]
    handles = []
    for i, block in enumerate(model.blocks):
        for part in (block.norm1, block.norm2):
            handles.append(part.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].shape[1])))
    try:
        with torch.inference_mode():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return [tuple(s) for s in seen]


@pytest.mark.parametrize("r", [8, "decreasing:6"])
def test_schedule_forward_runs_tomes_token_counts_without_merging(images, r):
    from models.tome import tome_schedule_forward
    model = small_vit(seed=2)
    expected = _tokens_seen(model, lambda: tome_forward(model, images, r=r))
    assert _tokens_seen(model, lambda: tome_schedule_forward(model, images, r=r)) == expected
    assert expected[0][1] < expected[0][0]  # the MLP of the first block already runs on fewer tokens
    with torch.inference_mode():
        torch.testing.assert_close(tome_schedule_forward(model, images, r=0), model(images), atol=1e-5, rtol=0)
