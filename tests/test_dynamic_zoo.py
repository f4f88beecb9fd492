"""DynamicViT's zoo: LV-ViT, DynamicCNN (ConvNeXt), DynamicSwin. Official key layouts, strict loading,
equivalence with the unpruned backbones, the official keep schedules, the structured forward, threads."""
from __future__ import annotations

import threading

import pytest
import timm
import numpy as np
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer

from models import dynamic_convnext as dcnn
from models import dynamic_lvvit as dlv
from models import dynamic_swin as dswin
from models.checkpoints import CheckpointError
from models.dynamic_zoo import DynamicStageTrace, linear_counts
from models.dynamicvit import keep_counts


# ------------------------------------------------------------------------------------------------
# The official key layouts, written out from the official model code (raoyongming/DynamicViT
# models/dylvvit.py, dyconvnext.py, dyswin.py), independently of our modules.
# ------------------------------------------------------------------------------------------------
def _linear(prefix, out_f, in_f, bias=True):
    keys = {f"{prefix}.weight": (out_f, in_f)}
    if bias:
        keys[f"{prefix}.bias"] = (out_f,)
    return keys


def _norm(prefix, dim):
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _predictor(prefix, dim, conv=False):
    tail = (1, 1) if conv else ()
    keys = {**_norm(f"{prefix}.in_conv.0", dim)}
    for name, out_f, in_f in (("in_conv.1", dim, dim), ("out_conv.0", dim // 2, dim),
                              ("out_conv.2", dim // 4, dim // 2), ("out_conv.4", 2, dim // 4)):
        keys[f"{prefix}.{name}.weight"] = (out_f, in_f, *tail)
        keys[f"{prefix}.{name}.bias"] = (out_f,)
    return keys


def official_lvvit_keys(dim, depth, mlp_hidden, locations, grid=14, classes=1000, stem=64, patch=16):
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim),
            "patch_embed.conv1.weight": (stem, 3, 7, 7), "patch_embed.conv2.weight": (stem, stem, 3, 3),
            "patch_embed.conv3.weight": (stem, stem, 3, 3), "patch_embed.proj.weight": (dim, stem, patch // 2, patch // 2),
            "patch_embed.proj.bias": (dim,)}
    for bn in ("bn1", "bn2", "bn3"):
        keys.update({f"patch_embed.{bn}.{p}": (stem,) for p in ("weight", "bias", "running_mean", "running_var")})
        keys[f"patch_embed.{bn}.num_batches_tracked"] = ()
    for i in range(depth):
        b = f"blocks.{i}"
        keys.update({**_norm(f"{b}.norm1", dim), **_linear(f"{b}.attn.qkv", 3 * dim, dim, bias=False),
                     **_linear(f"{b}.attn.proj", dim, dim), **_norm(f"{b}.norm2", dim),
                     **_linear(f"{b}.mlp.fc1", mlp_hidden, dim), **_linear(f"{b}.mlp.fc2", dim, mlp_hidden)})
    keys.update({**_norm("norm", dim), **_linear("head", classes, dim), **_linear("aux_head", classes, dim)})
    for s in range(len(locations)):
        keys.update(_predictor(f"score_predictor.{s}", dim))
    return keys


def official_convnext_keys(depths, dims, locations, classes=1000):
    keys = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
            **_norm("downsample_layers.0.1", dims[0])}
    for i in range(1, 4):
        keys.update({**_norm(f"downsample_layers.{i}.0", dims[i - 1]),
                     f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                     f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            b = f"stages.{i}.{j}"
            keys.update({f"{b}.dwconv.weight": (d, 1, 7, 7), f"{b}.dwconv.bias": (d,), **_norm(f"{b}.norm", d),
                         **_linear(f"{b}.pwconv1", 4 * d, d), **_linear(f"{b}.pwconv2", d, 4 * d),
                         f"{b}.gamma": (d,)})
            if i == 2 and j >= locations[0]:  # AdaBlock
                keys.update({**_norm(f"{b}.fast_path.0", d), **_linear(f"{b}.fast_path.1", d, d),
                             f"{b}.fast_path_gamma": (d,)})
    keys.update({**_norm("norm", dims[-1]), **_linear("head", classes, dims[-1])})
    for s in range(len(locations)):
        keys.update(_predictor(f"score_predictor.{s}", dims[2], conv=True))
    return keys


def official_swin_keys(embed, depths, heads, locations, img=224, window=7, classes=1000):
    keys = {"patch_embed.proj.weight": (embed, 3, 4, 4), "patch_embed.proj.bias": (embed,),
            **_norm("patch_embed.norm", embed)}
    res = img // 4
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d = embed * 2 ** i
        win = min(window, res)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            keys.update({**_norm(f"{b}.norm1", d), f"{b}.attn.relative_position_bias_table": ((2 * win - 1) ** 2, h),
                         f"{b}.attn.relative_position_index": (win * win, win * win),
                         **_linear(f"{b}.attn.qkv", 3 * d, d), **_linear(f"{b}.attn.proj", d, d),
                         **_norm(f"{b}.norm2", d), **_linear(f"{b}.mlp.fc1", 4 * d, d),
                         **_linear(f"{b}.mlp.fc2", d, 4 * d)})
            if j % 2 == 1 and res > window:  # shifted windows keep their mask as a buffer
                keys[f"{b}.attn_mask"] = ((res // win) ** 2, win * win, win * win)
            if i == 2 and j >= locations[0]:  # AdaSwinTransformerBlock
                keys.update({**_norm(f"{b}.fastmlp.fc1.0", d), **_linear(f"{b}.fastmlp.fc1.1", d, d)})
        if i < 3:
            keys.update({**_norm(f"layers.{i}.downsample.norm", 4 * d),
                         **_linear(f"layers.{i}.downsample.reduction", 2 * d, 4 * d, bias=False)})
        if i == 2:
            for s in range(len(locations)):
                keys.update(_predictor(f"layers.2.score_predictor.{s}", d))
        res //= 2
    keys.update({**_norm("norm", embed * 8), **_linear("head", classes, embed * 8)})
    return keys


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("arch", ["lvvit_s", "lvvit_m"])
def test_lvvit_keys_are_the_official_ones(arch):
    spec = dlv.LVVIT_ARCHS[arch]
    with torch.device("meta"):
        model = dlv.build_dynamic_lvvit(arch)
    expected = official_lvvit_keys(spec.embed_dim, spec.depth, spec.embed_dim * 3, spec.pruning_locations)
    assert _shapes(model.state_dict()) == expected


@pytest.mark.parametrize("arch", ["convnext_tiny", "convnext_small", "convnext_base"])
def test_convnext_official_layout(arch):
    spec = dcnn.CONVNEXT_ARCHS[arch]
    with torch.device("meta"):
        model = dcnn.build_dynamic_convnext(arch)
    official = dcnn.official_state_dict(model)
    assert _shapes(official) == official_convnext_keys(spec.depths, spec.dims, spec.pruning_locations)
    assert dcnn.from_official_keys(official).keys() == model.state_dict().keys()


@pytest.mark.parametrize("arch", ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                                  "swin_base_patch4_window7_224"])
def test_swin_official_layout(arch):
    spec = dswin.SWIN_ARCHS[arch]
    with torch.device("meta"):
        model = dswin.build_dynamic_swin(arch)
    expected = official_swin_keys(spec.embed_dim, spec.depths, spec.num_heads, spec.pruning_locations)
    assert _shapes(dswin.official_state_dict(model)) == expected


# ------------------------------------------------------------------------------------------------
# Small models (random weights, eval) for the forwards
# ------------------------------------------------------------------------------------------------
def _randomise_scales(model, suffix="gamma", low=0.5):
    """Layer scales start at 1e-6, which would make every block (and fast path) nearly the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffix):
                p.copy_(low + (1 - low) * torch.rand(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def lvvit():
    torch.manual_seed(0)
    model = dlv.DynamicLVViT(embed_dim=64, depth=4, num_heads=2, pruning_locations=(1, 2, 3), img_size=64,
                             num_classes=10, stem_chans=8)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (model.patch_embed.bn1, model.patch_embed.bn2, model.patch_embed.bn3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def convnext_pair():
    torch.manual_seed(0)
    backbone = _randomise_scales(ConvNeXt(depths=(1, 1, 5, 1), dims=(16, 24, 32, 48), num_classes=10)).eval()
    model = dcnn.dynamic_convnext_from_backbone(backbone, pruning_locations=(1, 2, 3))
    _randomise_scales(model, suffix="fast_path_gamma")
    for name, value in backbone.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    return backbone, model.eval()


@pytest.fixture(scope="module")
def swin_pair():
    torch.manual_seed(0)
    backbone = SwinTransformer(img_size=224, patch_size=4, window_size=7, embed_dim=8, depths=(1, 1, 5, 1),
                               num_heads=(1, 1, 2, 2), num_classes=10).eval()
    model = dswin.dynamic_swin_from_backbone(backbone, pruning_locations=(1, 2, 3)).eval()
    return backbone, model


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 224, 224, generator=generator)


# ------------------------------------------------------------------------------------------------
# Official checkpoint files: strict round trip and a wrong backbone refused by name
# ------------------------------------------------------------------------------------------------
def test_lvvit_checkpoint_round_trip_and_wrong_width(lvvit, tmp_path):
    path = tmp_path / "dynamicvit_lvvit_small.pth"
    torch.save({"model": lvvit.state_dict(), "epoch": 3}, path)
    fresh = dlv.DynamicLVViT(embed_dim=64, depth=4, num_heads=2, pruning_locations=(1, 2, 3), img_size=64,
                             num_classes=10, stem_chans=8)
    dlv.load_official_lvvit(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), lvvit.state_dict().values()))
    wider = dlv.DynamicLVViT(embed_dim=96, depth=4, num_heads=2, pruning_locations=(1, 2, 3), img_size=64,
                             num_classes=10, stem_chans=8)
    with pytest.raises(CheckpointError, match=r"dynamicvit_lvvit_small\.pth.*(S|s)hape mismatch.*width 64"):
        dlv.load_official_lvvit(wider, path)


@pytest.mark.parametrize("which", ["lvvit", "convnext", "swin"])
def test_full_training_checkpoints_of_the_zoo_load(which, lvvit, convnext_pair, swin_pair, tmp_path,
                                                    training_checkpoint):
    """The zoo's training script saves model, optimizer, lr_scheduler, epoch, scaler and args (a Namespace)."""
    path = tmp_path / f"{which}_checkpoint.pth"
    if which == "lvvit":
        training_checkpoint(path, lvvit, "deit")
        fresh = dlv.DynamicLVViT(embed_dim=64, depth=4, num_heads=2, pruning_locations=(1, 2, 3), img_size=64,
                                 num_classes=10, stem_chans=8)
        dlv.load_official_lvvit(fresh, path)
        expected = lvvit.state_dict()
    elif which == "convnext":
        model = convnext_pair[1]
        training_checkpoint(path, model, "deit", state_dict=dcnn.official_state_dict(model))
        fresh = dcnn.dynamic_convnext_from_backbone(
            ConvNeXt(depths=(1, 1, 5, 1), dims=(16, 24, 32, 48), num_classes=10), pruning_locations=(1, 2, 3))
        dcnn.load_official_convnext(fresh, path)
        expected = model.state_dict()
    else:
        model = swin_pair[1]
        training_checkpoint(path, model, "deit", state_dict=dswin.official_state_dict(model))
        fresh = dswin.dynamic_swin_from_backbone(
            SwinTransformer(img_size=224, patch_size=4, window_size=7, embed_dim=8, depths=(1, 1, 5, 1),
                            num_heads=(1, 1, 2, 2), num_classes=10), pruning_locations=(1, 2, 3))
        dswin.load_official_swin(fresh, path)
        expected = model.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_convnext_official_file_loads_strictly_and_wrong_depth_is_refused(convnext_pair, tmp_path):
    _, model = convnext_pair
    official = dcnn.official_state_dict(model)
    assert _shapes(official) == official_convnext_keys((1, 1, 5, 1), (16, 24, 32, 48), (1, 2, 3), classes=10)
    path = tmp_path / "dynamiccnn_official.pth"
    torch.save({"model": official}, path)
    fresh = dcnn.DynamicConvNeXt(depths=(1, 1, 5, 1), dims=(16, 24, 32, 48), num_classes=10)
    dcnn.load_official_convnext(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    deeper = dcnn.DynamicConvNeXt(depths=(1, 1, 7, 1), dims=(16, 24, 32, 48), num_classes=10)
    with pytest.raises(CheckpointError, match=r"dynamiccnn_official\.pth.*Missing.*5 third-stage blocks"):
        dcnn.load_official_convnext(deeper, path)
    other_classes = tmp_path / "five_classes.pth"
    torch.save({"model": official | {"head.weight": torch.zeros(5, 48)}}, other_classes)
    with pytest.raises(CheckpointError, match=r"five_classes\.pth.*head\.fc\.weight: checkpoint \(5, 48\)"):
        dcnn.load_official_convnext(fresh, other_classes)


def test_swin_official_file_loads_strictly_and_wrong_model_is_refused(swin_pair, tmp_path):
    _, model = swin_pair
    official = dswin.official_state_dict(model)
    assert _shapes(official) == official_swin_keys(8, (1, 1, 5, 1), (1, 1, 2, 2), (1, 2, 3), classes=10)
    path = tmp_path / "dynamicswin_official.pth"
    torch.save({"model": official}, path)
    fresh = dswin.DynamicSwin(img_size=224, window_size=7, embed_dim=8, depths=(1, 1, 5, 1), num_heads=(1, 1, 2, 2),
                              num_classes=10)
    dswin.load_official_swin(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    backbone_only = {k: v for k, v in official.items() if "fastmlp" not in k and "score_predictor" not in k}
    plain = tmp_path / "swin_plain_backbone.pth"
    torch.save({"model": backbone_only}, plain)
    with pytest.raises(CheckpointError, match=r"swin_plain_backbone\.pth.*Missing.*(fastmlp|score_predictor)"):
        dswin.load_official_swin(fresh, plain)
    wider = dswin.DynamicSwin(img_size=224, window_size=7, embed_dim=16, depths=(1, 1, 5, 1),
                              num_heads=(1, 1, 2, 2), num_classes=10)
    with pytest.raises(CheckpointError, match=r"dynamicswin_official\.pth.*width 8"):
        dswin.load_official_swin(wider, path)


# ------------------------------------------------------------------------------------------------
# keep_ratio = 1 is the backbone; kept counts follow the official schedules
# ------------------------------------------------------------------------------------------------
def _lvvit_reference(model, x):
    """LV-ViT as the official code computes it, from the model's weights (softmax attention written out)."""
    pe = model.patch_embed
    h = F.relu(pe.bn1(pe.conv1(x)))
    h = F.relu(pe.bn2(pe.conv2(h)))
    h = F.relu(pe.bn3(pe.conv3(h)))
    h = pe.proj(h).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(len(x), -1, -1), h], dim=1) + model.pos_embed
    for block in model.blocks:
        attn = block.attn
        b, n, c = h.shape
        qkv = attn.qkv(block.norm1(h)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(dim=-1)
        h = h + attn.proj((weights @ qkv[2]).transpose(1, 2).reshape(b, n, c)) / 2.0
        h = h + block.mlp(block.norm2(h)) / 2.0
    h = model.norm(h)
    return model.head(h[:, 0]) + 0.5 * model.aux_head(h[:, 1:]).max(1)[0]


def test_lvvit_is_the_official_computation_and_rho_one_is_the_backbone(lvvit):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = lvvit(x)
        assert torch.allclose(plain, _lvvit_reference(lvvit, x), atol=1e-5)
        pruned, trace = dlv.lvvit_forward(lvvit, x, keep_ratio=1.0, return_trace=True)
    assert torch.allclose(pruned, plain, atol=1e-5)
    assert trace.kept_counts == [16, 16, 16]


def test_convnext_rho_one_equals_timm(convnext_pair, images):
    backbone, model = convnext_pair
    with torch.no_grad():
        plain = backbone(images)
        assert torch.allclose(model(images), plain, atol=1e-5)
        pruned = dcnn.convnext_forward(model, images, keep_ratio=1.0)
        assert torch.allclose(pruned, plain, atol=1e-5)
        assert not torch.allclose(dcnn.convnext_forward(model, images, keep_ratio=0.7), plain, atol=1e-3)


def test_swin_rho_one_equals_timm(swin_pair, images):
    backbone, model = swin_pair
    with torch.no_grad():
        plain = backbone(images)
        assert torch.allclose(model(images), plain, atol=1e-5)
        assert torch.allclose(dswin.swin_forward(model, images, keep_ratio=1.0), plain, atol=1e-5)
        assert not torch.allclose(dswin.swin_forward(model, images, keep_ratio=0.7), plain, atol=1e-3)


def test_official_keep_schedules():
    assert keep_counts(196, 0.7, 3) == [137, 96, 67]
    assert keep_counts(196, 0.5, 3) == [98, 49, 24]
    # SPARSE_RATIO = [rho, rho - 0.2, rho - 0.4] in the official main.py, float arithmetic included
    assert linear_counts(196, 0.7) == [137, 97, 58] == [int(196 * r) for r in (0.7, 0.7 - 0.2, 0.7 - 0.4)]
    assert linear_counts(196, 0.9) == [176, 137, 98]
    assert linear_counts(196, 1.0) == [196, 196, 196]
    with pytest.raises(ValueError, match="rho > 0.4"):
        linear_counts(196, 0.4)


def _check_top_k(trace: DynamicStageTrace):
    for kept, scores, mask in zip(trace.kept_indices, trace.keep_scores, trace.keep_masks()):
        flat = mask.flatten(1)
        candidate = scores.nan_to_num(-1.0)
        assert torch.equal(kept, kept.sort(dim=1).values)
        lowest_kept = candidate.masked_fill(~flat, 2.0).amin(dim=1)
        highest_dropped = candidate.masked_fill(flat | scores.isnan(), -1.0).amax(dim=1)
        assert bool((lowest_kept >= highest_dropped).all())


@pytest.mark.parametrize("rho, counts", [(0.7, [137, 97, 58]), (0.9, [176, 137, 98])])
def test_hierarchical_kept_counts_and_trace(swin_pair, convnext_pair, images, rho, counts):
    with torch.no_grad():
        _, swin_trace = dswin.swin_forward(swin_pair[1], images, keep_ratio=rho, return_trace=True)
        _, cnn_trace = dcnn.convnext_forward(convnext_pair[1], images, keep_ratio=rho, return_trace=True)
    for trace, stage_block in ((swin_trace, "layers.2.blocks.1"), (cnn_trace, "stages.2.blocks.1")):
        assert trace.kept_counts == counts
        assert trace.stage_grids == [(14, 14)] * 3 and trace.cell_size(0) == (16.0, 16.0)
        assert trace.stage_blocks[0] == stage_block and not trace.nested
        assert [m.shape for m in trace.keep_masks()] == [(2, 14, 14)] * 3
        assert not any(bool(s.isnan().any()) for s in trace.keep_scores)  # every position is scored
        _check_top_k(trace)
    # blocks after the last predictor keep its selection; the other stages stay full
    assert swin_trace.tokens_per_block == [56 * 56, 28 * 28, 196, *counts, counts[-1], 49]


def test_lvvit_kept_counts(lvvit):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, trace = dlv.lvvit_forward(lvvit, x, keep_ratio=0.7, return_trace=True)
    assert trace.kept_counts == keep_counts(16, 0.7, 3) == [11, 7, 5]
    assert trace.nested and trace.stage_grids == [(4, 4)] * 3 and trace.cell_size(2) == (16.0, 16.0)
    assert trace.tokens_per_block == [17, 12, 8, 6]
    _check_top_k(trace)


# ------------------------------------------------------------------------------------------------
# The structured forward equals the dense computation with the same selection
# ------------------------------------------------------------------------------------------------
def _dense_convnext_block(block, x, keep):
    """Both branches on every position, mixed by the (B, H, W) keep mask (the official training form)."""
    mixed = block.conv_dw(x).permute(0, 2, 3, 1)
    full = block.mlp(block.norm(mixed)) * block.gamma
    fast = block.fast_path(mixed) * block.fast_path_gamma
    return x + torch.where(keep[..., None], full, fast).permute(0, 3, 1, 2)


def _dense_swin_block(block, x, keep):
    x = x + block._attn(block.norm1(x))
    return x + torch.where(keep[..., None], block.mlp(block.norm2(x)), block.fastmlp(x))


def test_structured_blocks_equal_the_dense_mixture(convnext_pair, swin_pair, images):
    with torch.no_grad():
        _, model = convnext_pair
        logits, trace = dcnn.convnext_forward(model, images, keep_ratio=0.7, return_trace=True)
        x = model.stages[1](model.stages[0](model.stem(images)))
        x = model.stages[2].downsample(x)
        masks = trace.keep_masks()
        for i, block in enumerate(model.stages[2].blocks):
            stage = sum(1 for loc in model.pruning_locations if loc <= i) - 1
            x = block(x) if stage < 0 else _dense_convnext_block(block, x, masks[stage])
        assert torch.allclose(model.forward_head(model.stages[3](x)), logits, atol=1e-5)

        _, model = swin_pair
        logits, trace = dswin.swin_forward(model, images, keep_ratio=0.7, return_trace=True)
        x = model.layers[2].downsample(model.layers[1](model.layers[0](model.patch_embed(images))))
        masks = trace.keep_masks()
        for i, block in enumerate(model.layers[2].blocks):
            stage = sum(1 for loc in model.pruning_locations if loc <= i) - 1
            x = block(x) if stage < 0 else _dense_swin_block(block, x, masks[stage])
        assert torch.allclose(model.forward_head(model.norm(model.layers[3](x))), logits, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Shared model, settings as call arguments
# ------------------------------------------------------------------------------------------------
def test_two_keep_ratios_from_two_threads_on_one_model(convnext_pair, swin_pair, lvvit, images):
    small = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    cases = [(dcnn.convnext_forward, convnext_pair[1], images), (dswin.swin_forward, swin_pair[1], images),
             (dlv.lvvit_forward, lvvit, small)]
    for forward, model, x in cases:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.inference_mode():
            expected = {rho: forward(model, x, keep_ratio=rho) for rho in (0.6, 0.9)}
        results, errors = {}, []

        def run(rho, forward=forward, model=model, x=x):
            try:
                with torch.inference_mode():
                    results[rho] = forward(model, x, keep_ratio=rho, return_trace=True)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(rho,)) for rho in (0.6, 0.9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for rho in (0.6, 0.9):
            assert torch.allclose(results[rho][0], expected[rho], atol=1e-6)
            assert results[rho][1].keep_ratio == rho
        assert not model.training
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_builders_match_timm_backbones():
    with torch.device("meta"):
        for arch, spec in dcnn.CONVNEXT_ARCHS.items():
            timm_shapes = _shapes(timm.create_model(spec.timm_name).state_dict())
            ours = _shapes(dcnn.build_dynamic_convnext(arch).state_dict())
            assert {k: ours[k] for k in timm_shapes} == timm_shapes
            assert all("fast_path" in k or k.startswith("score_predictor.") for k in set(ours) - set(timm_shapes))
        for arch, spec in dswin.SWIN_ARCHS.items():
            timm_shapes = _shapes(timm.create_model(spec.timm_name).state_dict())
            ours = _shapes(dswin.build_dynamic_swin(arch).state_dict())
            assert {k: ours[k] for k in timm_shapes} == timm_shapes


# ------------------------------------------------------------------------------------------------
# Registry and the weights resolver
# ------------------------------------------------------------------------------------------------
def test_registry_entries_point_at_the_zoo():
    from models import registry
    from models.registry import import_target as _import

    families = {registry.DYNAMIC_LVVIT: dlv, registry.DYNAMIC_CNN: dcnn, registry.DYNAMIC_SWIN: dswin}
    names = [n for f in families for n in registry.list_models(f)]
    assert len(names) == 12 and {"dynamicvit_lvvit_s", "dynamiccnn_convnext_tiny", "dynamicswin_tiny"} <= set(names)
    for name in names:
        spec = registry.get_spec(name)
        module = families[spec.family]
        assert module.FAMILY == spec.family
        assert _import(spec.factory).__module__ == module.__name__ == _import(spec.load_fn).__module__
        assert spec.url.startswith("https://cloud.tsinghua.edu.cn/f/") and spec.url.endswith("/?dl=1")
        assert 80 < spec.top1 < 85


def test_official_file_through_the_resolver(tmp_path, monkeypatch):
    """The registry entry's own factory and loader, with a small Swin in place of Swin-T to keep the test fast."""
    import dataclasses

    from models import registry
    from models.loading import load_model

    small = dict(embed_dim=8, depths=(1, 1, 5, 1), num_heads=(1, 1, 2, 2), num_classes=10)
    for name, depths in (("dynamicswin_tiny", (1, 1, 5, 1)), ("dynamicswin_small", (1, 1, 7, 1))):
        spec = registry.get_spec(name)
        kwargs = {**spec.factory_kwargs, **small, "depths": depths}
        monkeypatch.setitem(registry.REGISTRY, name, dataclasses.replace(spec, factory_kwargs=kwargs))
    reference = dswin.build_dynamic_swin(**small)
    path = tmp_path / "dynamicswin_tiny_official.pth"
    torch.save({"model": dswin.official_state_dict(reference)}, path)
    loaded = load_model("dynamicswin_tiny", user_file=path, allow_network=False)
    assert isinstance(loaded.model, dswin.DynamicSwin) and not loaded.model.training
    assert loaded.data_config["input_size"] == (3, 224, 224) and loaded.data_config["crop_pct"] == 0.9
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match=r"dynamicswin_tiny_official\.pth.*5 third-stage blocks"):
        load_model("dynamicswin_small", user_file=path, allow_network=False)


# ------------------------------------------------------------------------------------------------
# Training forwards (official two-stream form) and loss
# ------------------------------------------------------------------------------------------------
def _random_mask(seed, batch=2, n=196, keep=0.6):
    return (torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) < keep).float()


def test_train_forwards_with_all_kept_are_the_backbone_and_its_features(convnext_pair, swin_pair, images):
    ones = [torch.ones(2, 196)] * 3
    cases = [(convnext_pair, dcnn.convnext_train_forward, dcnn.convnext_features_for_distillation),
             (swin_pair, dswin.swin_train_forward, dswin.swin_features_for_distillation)]
    with torch.no_grad():
        for (backbone, model), train_forward, teacher in cases:
            output = train_forward(model, images, policy_override=ones)
            logits, featmap = teacher(backbone, images)
            assert torch.allclose(output.logits, logits, atol=1e-5)
            assert torch.allclose(output.featmap, featmap, atol=1e-5)
            assert output.keep_targets == [0.7, 0.7 - 0.2, 0.7 - 0.4]


def test_train_forward_with_one_mask_equals_the_dense_mixture(convnext_pair, swin_pair, images):
    """With the same mask at every stage the two streams never disagree where it matters: the result is the
    map with MLP at kept positions and fast path elsewhere, as at inference."""
    mask = _random_mask(0)
    grid = mask.bool().view(2, 14, 14)
    with torch.no_grad():
        _, model = convnext_pair
        output = dcnn.convnext_train_forward(model, images, policy_override=[mask] * 3)
        x = model.stages[2].downsample(model.stages[1](model.stages[0](model.stem(images))))
        for i, block in enumerate(model.stages[2].blocks):
            x = block(x) if i < 1 else _dense_convnext_block(block, x, grid)
        assert torch.allclose(output.logits, model.forward_head(model.stages[3](x)), atol=1e-5)

        _, model = swin_pair
        output = dswin.swin_train_forward(model, images, policy_override=[mask] * 3)
        x = model.layers[2].downsample(model.layers[1](model.layers[0](model.patch_embed(images))))
        for i, block in enumerate(model.layers[2].blocks):
            x = block(x) if i < 1 else _dense_swin_block(block, x, grid)
        assert torch.allclose(output.logits, model.forward_head(model.norm(model.layers[3](x))), atol=1e-5)


def test_gumbel_training_step_reaches_predictors_and_fast_paths():
    from models.dynamic_zoo import hierarchical_loss

    torch.manual_seed(0)
    backbone = ConvNeXt(depths=(1, 1, 5, 1), dims=(16, 24, 32, 48), num_classes=10).eval()
    model = _randomise_scales(dcnn.dynamic_convnext_from_backbone(backbone), suffix="fast_path_gamma").train()
    x = torch.randn(2, 3, 224, 224)
    output = dcnn.convnext_train_forward(model, x, keep_ratio=0.9)
    assert [d.shape for d in output.decisions] == [(2, 196)] * 3
    assert all(bool(((d == 0) | (d == 1)).all()) for d in output.decisions)
    assert output.keep_targets == [0.9, 0.9 - 0.2, 0.9 - 0.4]
    with torch.no_grad():
        teacher_logits, teacher_featmap = dcnn.convnext_features_for_distillation(backbone, x)
    total, parts = hierarchical_loss(output, torch.tensor([1, 2]), teacher_logits, teacher_featmap)
    expected_ratio = sum(((d.mean(1) - t) ** 2).mean() for d, t in zip(output.decisions, output.keep_targets)) / 3
    assert torch.allclose(parts["ratio"], expected_ratio.detach())
    assert torch.allclose(total.detach(), parts["ce"] + 10 * parts["ratio"] + 0.5 * parts["kl"] + 0.5 * parts["token_mse"])
    total.backward()
    assert model.score_predictor[2].out_conv[4].weight.grad.abs().sum() > 0
    assert model.stages[2].blocks[2].fast_path[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_training_cli_takes_hierarchical_backbones(family, tmp_path, monkeypatch, capsys):
    """`--backbone convnext_*` / `swin_*`: two steps on a folder, an official-format checkpoint that loads strictly."""
    import numpy as np
    from PIL import Image

    from analysis import train_dynamicvit as cli

    torch.manual_seed(0)
    if family == "convnext":
        backbone = ConvNeXt(depths=(1, 1, 9, 1), dims=(8, 16, 32, 48), num_classes=1000)
        fresh = dcnn.DynamicConvNeXt(depths=(1, 1, 9, 1), dims=(8, 16, 32, 48), pruning_locations=(1, 2, 3))
        load, name = dcnn.load_official_convnext, "convnext_tiny"
    else:
        backbone = SwinTransformer(img_size=224, embed_dim=8, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2))
        fresh = dswin.DynamicSwin(img_size=224, embed_dim=8, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2),
                                  pruning_locations=(1, 2, 3))
        load, name = dswin.load_official_swin, "swin_tiny_patch4_window7_224"
    monkeypatch.setattr(cli, "load_backbone", lambda backbone_name, weights: backbone.eval())
    data = tmp_path / "data" / "n01530575"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / f"dynamic_{family}.pth"
    rc = cli.main(["--backbone", name, "--data", str(tmp_path / "data"), "--epochs", "2", "--steps", "2", "--batch", "2",
                   "--device", "cpu", "--keep-ratio", "0.9", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "step 2/2" in printed and "keep " in printed
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["vitlab"]["pruning_locations"] == [1, 2, 3] and saved["vitlab"]["keep_ratio"] == pytest.approx(0.9)
    load(fresh, out)  # official key names, strict
    first = "stages.2.blocks.0.conv_dw.weight" if family == "convnext" else "layers.2.blocks.0.attn.qkv.weight"
    assert torch.equal(fresh.state_dict()[first], backbone.state_dict()[first])  # backbone frozen by default


def test_keep_frequency_task_counts_the_zoo_forward():
    """analysis.run keep-frequency on a hierarchical family: positions of the pruned stage's 14 x 14 map."""
    from analysis.data.folders import NO_LABEL
    from analysis.runs.common import TaskModel, TaskOptions
    from analysis.runs.keep_frequency import KEEP_FREQUENCY
    from analysis.runs.tasks import TASKS
    from models.loading import load_model

    loaded = load_model("dynamiccnn_convnext_tiny", random_weights=True)
    task = TASKS[KEEP_FREQUENCY].build(TaskModel.of(loaded), TaskOptions(keep_ratio=0.7))
    task.update(torch.randn(2, 3, 224, 224), torch.full((2,), NO_LABEL))
    record = task.result(task.sums)
    assert record.grid_size == (14, 14) and record.kept_tokens == (137, 97, 58)
    assert record.stage_blocks[0].startswith("stages.2.blocks.")
    np.testing.assert_array_equal(record.kept_count.sum(1), 2 * np.array(record.kept_tokens))
    assert (record.scored_count == 2).all()  # hierarchical stages score every position
