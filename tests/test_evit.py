"""EViT (ICLR 2022): the fourth method of the table, in its own forward, record and figures."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import timm
import torch

from models.evit import NotApplicable, evit_forward, keep_and_fuse, kept_count, prune_locations
from models.methods import METHODS


@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=12,
                             num_classes=10).eval()


def test_keep_rate_one_is_the_model_itself(small_vit):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(evit_forward(small_vit, x, keep_rate=1.0), small_vit(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(METHODS["evit"].bind_neutral(small_vit)(x), small_vit(x), atol=1e-5, rtol=1e-5)


def test_one_stage_keeps_the_most_attended_and_fuses_the_rest_by_attention():
    tokens = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)  # CLS + 4 patch tokens, 2 channels
    attention = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.05, 0.25, 0.2]])
    out, kept, rest = keep_and_fuse(tokens, attention, prefix=1, keep=2, fuse=True)
    assert kept.tolist() == [[1, 3], [0, 2]] and rest.tolist() == [[2, 0], [3, 1]]
    body = tokens[:, 1:]
    torch.testing.assert_close(out[0], torch.stack([tokens[0, 0], body[0, 1], body[0, 3],
                                                    0.2 * body[0, 2] + 0.1 * body[0, 0]]))  # not renormalised
    torch.testing.assert_close(out[1, 3], 0.2 * body[1, 3] + 0.05 * body[1, 1])
    dropped, _, _ = keep_and_fuse(tokens, attention, prefix=1, keep=2, fuse=False)
    assert dropped.shape == (2, 3, 2)


def test_token_counts_follow_the_papers_schedule(small_vit):
    assert kept_count(196, 0.7) == 138 and kept_count(139, 0.7) == 98 and kept_count(99, 0.7) == 70
    assert prune_locations(12) == (3, 6, 9) and prune_locations(24) == (6, 12, 18) and prune_locations(4) == (1, 2, 3)
    with pytest.raises(ValueError, match="keep rate"):
        kept_count(10, 0.0)
    with torch.inference_mode():
        _, fused = evit_forward(small_vit, torch.randn(2, 3, 64, 64), 0.7, return_trace=True)
        _, dropped = evit_forward(small_vit, torch.randn(2, 3, 64, 64), 0.7, fuse=False, return_trace=True)
    assert fused.tokens_per_block == [65] * 4 + [47] * 3 + [35] * 3 + [26] * 2
    assert dropped.tokens_per_block == [65] * 4 + [46] * 3 + [33] * 3 + [24] * 2
    assert dropped.kept_counts == [45, 32, 23]  # without fusion every kept token is one patch
    for own, attention in zip(fused.own_token, fused.attention):
        assert own.shape == (2, 64) and not np.isnan(attention).any()  # fused patches keep their token's attention
    assert np.isnan(dropped.attention[-1]).sum(axis=1).tolist() == [64 - 32, 64 - 32]  # dropped before stage 3


def test_prefix_tokens_are_protected_and_no_class_token_is_said():
    torch.manual_seed(0)
    with_registers = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4,
                                       reg_tokens=4, num_classes=10).eval()
    with torch.inference_mode():
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(evit_forward(with_registers, x, 1.0), with_registers(x), atol=1e-5, rtol=1e-5)
        _, trace = evit_forward(with_registers, x, 0.5, return_trace=True)
    assert trace.prune_blocks == (1, 2, 3) and trace.tokens_per_block == [69, 69, 5 + 32 + 1, 5 + 17 + 1]
    pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4,
                               class_token=False, global_pool="avg", num_classes=10).eval()
    with pytest.raises(NotApplicable, match="no class token"):
        evit_forward(pooled, torch.randn(1, 3, 64, 64))


def test_variant_names_and_two_threads_on_one_model(small_vit):
    from models.variants import forward_for, parse_variant

    x = torch.randn(2, 3, 64, 64)
    assert METHODS["evit"].arguments({"evit": "0.6", "fuse": "off"}) == {"keep_rate": 0.6, "fuse": False}
    forward = forward_for(small_vit, "deit_tiny_patch16_224", parse_variant("deit_tiny_patch16_224@evit=0.6,fuse=off"))
    results = {}

    def run(rate):
        with torch.inference_mode():
            results[rate] = evit_forward(small_vit, x, rate, return_trace=True)[1].tokens_per_block[-1]

    threads = [threading.Thread(target=run, args=(rate,)) for rate in (0.5, 0.9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0.5: 1 + 9 + 1, 0.9: 1 + 50 + 1}
    with torch.inference_mode():
        torch.testing.assert_close(forward(x), evit_forward(small_vit, x, 0.6, fuse=False))


@pytest.mark.shared
def test_on_real_deit_tiny_the_class_tokens_attention_prunes_meaningfully(deit_tiny_real, deit_tiny_batch):
    """No trained predictor: EViT keeps real DeiT-Tiny's top-1 on the shared photos at the paper's 0.7, and at 0.5
    its ranking keeps far more of the top-5 than DynamicViT's untrained (random) predictors do."""
    from analysis.token_reduction.metrics import top1_agreement, top5_overlap
    from models.dynamicvit import dynamicvit_forward

    with torch.inference_mode():
        reference = deit_tiny_real(deit_tiny_batch)
        assert top1_agreement(reference, evit_forward(deit_tiny_real, deit_tiny_batch, 0.7)) == 1.0
        evit = top5_overlap(reference, evit_forward(deit_tiny_real, deit_tiny_batch, 0.5))
        untrained = METHODS["dynamicvit"].with_untrained_parts(deit_tiny_real, seed=0)
        random_pruning = top5_overlap(reference, dynamicvit_forward(untrained, deit_tiny_batch, 0.5))
    assert evit > random_pruning + 0.1, (evit, random_pruning)
