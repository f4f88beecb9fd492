"""The one ViT walk (models/vit_forward.py) and the one bipartite matching (models/merging.py), against this timm."""
from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from models.merging import bipartite_match, merge_mask
from models.vit_forward import (
    attention, attention_residual, classify, embed_tokens, gather_tokens, is_plain_block, mlp_residual,
)


def small_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    config.update(kwargs)
    return VisionTransformer(**config).eval()


def timm_attention(attn: Attention, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """timm's own ``Attention.forward`` on its fused or its explicit path (the module is the test's own to set)."""
    attn.fused_attn = fused
    return attn(x)


@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"init_values": 0.1}])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_equals_timm_attention(options, fused):
    attn = small_vit(**options).blocks[1].attn
    x = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = timm_attention(attn, x, fused)
        plain = attention(attn, x)
        recorded = attention(attn, x, record=True)
    assert plain.maps is None
    torch.testing.assert_close(plain.out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(recorded.out, expected, atol=1e-5, rtol=0)
    assert plain.keys.shape == plain.heads.shape == (2, 3, 17, 16)


def test_gated_attention_equals_timm_when_this_timm_has_it():
    try:
        attn = Attention(48, num_heads=3, qkv_bias=True, gated=True).eval()
    except TypeError:
        pytest.skip("this timm's Attention has no gate")
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        torch.testing.assert_close(attention(attn, x).out, timm_attention(attn, x, True), atol=1e-5, rtol=0)
        torch.testing.assert_close(attention(attn, x, record=True).out, attn(x), atol=1e-5, rtol=0)


def test_plain_attention_stays_fused(monkeypatch):
    """Without recording or a policy no attention matrix is built: the call goes to SDPA."""
    attn = small_vit().blocks[0].attn
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    bias = torch.zeros(2, 1, 1, 17)
    with torch.inference_mode():
        attention(attn, torch.randn(2, 17, 48))
        attention(attn, torch.randn(2, 17, 48), key_bias=bias)
        attention(attn, torch.randn(2, 17, 48), record=True)
    assert len(calls) == 2 and calls[0] is None and calls[1] is bias


def test_recorded_maps_are_the_softmax_and_sum_to_one():
    attn = small_vit().blocks[0].attn
    x = torch.randn(3, 17, 48)
    with torch.inference_mode():
        result = attention(attn, x, record=True)
        q, k, _ = attn.qkv(x).reshape(3, 17, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
        expected = (q @ k.transpose(-2, -1) * 16 ** -0.5).softmax(-1)
    assert result.maps.shape == (3, 3, 17, 17)
    torch.testing.assert_close(result.maps.sum(-1), torch.ones(3, 3, 17))
    torch.testing.assert_close(result.maps, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("record", [False, True])
def test_zero_key_bias_is_no_bias_and_a_bias_moves_attention(record):
    attn = small_vit().blocks[0].attn
    x = torch.randn(2, 17, 48)
    bias = torch.zeros(2, 1, 1, 17)
    with torch.inference_mode():
        plain = attention(attn, x, record=record)
        zero = attention(attn, x, key_bias=bias, record=record)
        bias[:, ..., 5] = 4.0
        biased = attention(attn, x, key_bias=bias, record=True)
    torch.testing.assert_close(zero.out, plain.out, atol=1e-6, rtol=0)
    assert not torch.allclose(biased.out, plain.out, atol=1e-3)
    reference = attention(attn, x, record=True).maps
    assert bool((biased.maps[..., 5] > reference[..., 5]).all())  # key 5 weighs more everywhere


def test_policy_masks_dropped_keys_and_all_kept_is_plain():
    attn = small_vit().blocks[0].attn
    x = torch.randn(2, 17, 48)
    policy = torch.ones(2, 17)
    with torch.inference_mode():
        plain = attention(attn, x)
        kept = attention(attn, x, policy=policy)
        policy[:, 3] = 0.0
        masked = attention(attn, x, policy=policy)
    torch.testing.assert_close(kept.out, plain.out, atol=1e-5, rtol=0)
    others = [i for i in range(17) if i != 3]
    assert masked.maps[:, :, others, 3].max() < 1e-6  # nobody else attends to a dropped key
    assert masked.maps[:, :, 3, 3].min() > 1e-3  # a dropped token still attends to itself
    torch.testing.assert_close(masked.maps.sum(-1), torch.ones(2, 3, 17), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_embed_blocks_classify_equals_timm_forward(options):
    model = small_vit(**options)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        tokens = embed_tokens(model, x)
        for block in model.blocks:
            half, _ = attention_residual(block, tokens)
            walked = mlp_residual(block, half)
            torch.testing.assert_close(walked, block(tokens), atol=1e-5, rtol=0)
            tokens = walked
        torch.testing.assert_close(model.norm(tokens), model.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(classify(model, tokens), model.forward_head(model.forward_features(x)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(classify(model, tokens), model(x), atol=1e-5, rtol=0)


def test_gather_tokens_picks_rows_per_image():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    index = torch.tensor([[4, 0], [1, 1]])
    picked = gather_tokens(tokens, index)
    assert torch.equal(picked[0], tokens[0, [4, 0]]) and torch.equal(picked[1], tokens[1, [1, 1]])


def test_only_timms_plain_block_is_walked():
    assert is_plain_block(small_vit().blocks[0])
    assert not is_plain_block(small_vit(block_fn=ResPostBlock).blocks[0])


# ---------------------------------------------------------------- the one matching function
def test_matching_protects_first_token_and_ranks_pairs():
    keys = torch.eye(7)
    keys[0] = keys[1]  # token 0 (A) duplicates token 1 (B) but is protected
    keys[4] = keys[5]  # token 4 = A[2] duplicates token 5 = B[2]
    match = bipartite_match(keys[None], protect_first=True)
    assert match.order[0, 0].item() == 2 and match.partner[0, 2].item() == 2
    assert match.order[0, -1].item() == 0 and match.best[0, 0].item() == float("-inf")
    assert merge_mask(match, 1).tolist() == [[False, False, True, False]]
    assert merge_mask(match, 10).sum().item() == 3  # at most the three unprotected A tokens


def test_matching_with_padding_and_per_sample_counts():
    torch.manual_seed(3)
    metric = torch.randn(2, 9, 4)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 5:] = False  # the second sample has 5 real tokens: A = 0, 2, 4; B = 1, 3
    match = bipartite_match(metric, valid)
    mask = merge_mask(match, torch.tensor([2, 5]))
    assert mask[0].sum().item() == 2
    assert mask[1].sum().item() == 3 and not mask[1, 3:].any()  # padding never merges; 3 real A tokens
    assert bool((match.partner[1, :3] < 2).all())  # real A tokens only pick real B tokens
    alone = bipartite_match(metric[1:, :5])
    assert torch.equal(alone.partner[0], match.partner[1, :3])


def test_matching_one_token_has_nothing_to_merge():
    match = bipartite_match(torch.randn(2, 1, 4))
    assert not merge_mask(match, 3).any()
