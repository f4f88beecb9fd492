"""DynamicViT: pruned inference, training forward, loss, official checkpoints and the training CLI."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from analysis import train_dynamicvit as cli
from models.checkpoints import CheckpointError, read_state_dict
from models.dynamicvit import (
    DYNAMICVIT_ARCHS,
    DynamicViT,
    DynamicViTTrainOutput,
    build_dynamicvit,
    dynamicvit_forward,
    dynamicvit_from_backbone,
    dynamicvit_loss,
    dynamicvit_schedule_forward,
    dynamicvit_train_forward,
    keep_counts,
    keep_logits,
    load_official_checkpoint,
    mean_keep_per_stage,
    policy_softmax,
)

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def dyn_tiny(deit_tiny_real) -> DynamicViT:
    """Real DeiT-Tiny weights with freshly initialised predictors (seeded), eval mode."""
    torch.manual_seed(0)
    return dynamicvit_from_backbone(deit_tiny_real).eval()


# ------------------------------------------------------------------------------------------------
# Inference forward
# ------------------------------------------------------------------------------------------------
def test_keep_ratio_one_reproduces_the_backbone(dyn_tiny, deit_tiny_real, deit_tiny_batch):
    with torch.no_grad():
        plain = deit_tiny_real(deit_tiny_batch)
        assert torch.allclose(dyn_tiny(deit_tiny_batch), plain, atol=1e-5)
        pruned, trace = dynamicvit_forward(dyn_tiny, deit_tiny_batch, keep_ratio=1.0, return_trace=True)
    assert torch.allclose(pruned, plain, atol=1e-5)
    assert trace.tokens_per_block == [197] * 12


def test_keep_counts_follow_the_official_int_convention():
    assert keep_counts(196, 0.7, 3) == [137, 96, 67]
    assert keep_counts(196, 0.7, 3) == [int(196 * r) for r in (0.7, 0.7 ** 2, 0.7 ** 3)]
    assert keep_counts(196, 0.5, 3) == [98, 49, 24]
    with pytest.raises(ValueError):
        keep_counts(196, 0.0, 3)


def test_pruned_forward_keeps_137_96_67_top_scored_patches(dyn_tiny, deit_tiny_batch):
    with torch.no_grad():
        logits, trace = dynamicvit_forward(dyn_tiny, deit_tiny_batch, keep_ratio=0.7, return_trace=True)
    assert logits.shape == (5, 1000)
    assert [k.shape for k in trace.kept_indices] == [(5, 137), (5, 96), (5, 67)]
    assert trace.tokens_per_block == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    alive = torch.ones(5, 196, dtype=torch.bool)
    for kept, scores, mask in zip(trace.kept_indices, trace.keep_scores, trace.keep_masks()):
        assert torch.equal(kept, kept.sort(dim=1).values)  # original spatial order
        assert torch.equal(scores.isnan(), ~alive)  # NaN exactly for patches dropped earlier
        assert bool(mask[~alive].logical_not().all())  # a dropped patch never comes back
        candidate = scores.nan_to_num(-1.0)
        lowest_kept = candidate.masked_fill(~mask, 2.0).amin(dim=1)
        highest_dropped = candidate.masked_fill(mask | ~alive, -1.0).amax(dim=1)
        assert bool((lowest_kept >= highest_dropped).all())  # kept = top-k by keep score
        alive = mask


def test_pruned_forward_is_per_image(dyn_tiny, deit_tiny_batch):
    with torch.no_grad():
        batched, trace = dynamicvit_forward(dyn_tiny, deit_tiny_batch, return_trace=True)
        for i in (0, 3):
            single, single_trace = dynamicvit_forward(dyn_tiny, deit_tiny_batch[i:i + 1], return_trace=True)
            assert torch.allclose(single[0], batched[i], atol=1e-4)
            for a, b in zip(single_trace.kept_indices, trace.kept_indices):
                assert torch.equal(a[0], b[i])


def test_keep_logits_rank_like_the_predictors_keep_probability():
    torch.manual_seed(7)
    model = _small("dynamicvit_deit_small_patch16_224").eval()
    tokens = torch.randn(3, 17, 384)
    with torch.inference_mode():
        log_keep = model.score_predictor[0](tokens[:, 1:])[..., 0]
        logits = keep_logits(model.score_predictor[0], tokens)
    torch.testing.assert_close(F.logsigmoid(logits), log_keep, atol=1e-6, rtol=0)


def test_schedule_forward_runs_the_same_token_counts_without_predictors():
    torch.manual_seed(8)
    model = _small("dynamicvit_deit_small_patch16_224").eval()
    x = torch.randn(2, 3, 64, 64)
    seen: list[int] = []
    handles = [block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
               for block in model.blocks]
    predictor_calls = []
    handles += [p.in_conv[1].register_forward_pre_hook(lambda *_: predictor_calls.append(1))
                for p in model.score_predictor]
    try:
        with torch.inference_mode():
            _, trace = dynamicvit_forward(model, x, keep_ratio=0.7, return_trace=True)
            assert len(predictor_calls) == 3
            seen.clear()
            predictor_calls.clear()
            dynamicvit_schedule_forward(model, x, keep_ratio=0.7)
            assert torch.allclose(dynamicvit_schedule_forward(model, x, keep_ratio=1.0), model(x), atol=1e-5)
    finally:
        for handle in handles:
            handle.remove()
    assert seen[:12] == trace.tokens_per_block == [17] * 3 + [12] * 3 + [8] * 3 + [6] * 3
    assert not predictor_calls


# ------------------------------------------------------------------------------------------------
# Training forward and loss
# ------------------------------------------------------------------------------------------------
def test_training_forward_with_all_kept_policy_equals_plain_forward(dyn_tiny, deit_tiny_batch):
    x = deit_tiny_batch[:2]
    with torch.no_grad():
        out = dynamicvit_train_forward(dyn_tiny, x, policy_override=[torch.ones(2, 196)] * 3)
        plain = dyn_tiny.forward_features(x)
        plain_logits = dyn_tiny.forward_head(plain)
    assert torch.allclose(out.logits, plain_logits, atol=1e-5)  # measured ~4e-6
    # The official eps terms move each attention weight by <= 1e-6; through 9 masked blocks and the final
    # norm that is ~1e-5 on tokens of magnitude ~10 (the same in float64, so it is the formula, not rounding).
    assert torch.allclose(out.tokens, plain[:, 1:], atol=5e-5)


def test_policy_softmax_is_softmax_when_all_kept_and_ignores_dropped_keys():
    torch.manual_seed(6)
    logits = torch.randn(2, 3, 5, 5) * 4
    ones = torch.ones(2, 5)
    assert torch.allclose(policy_softmax(logits, ones, eps=0.0), logits.softmax(-1), atol=1e-7)
    assert (policy_softmax(logits, ones) - logits.softmax(-1)).abs().max() <= 1e-6
    policy = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]] * 2)
    weights = policy_softmax(logits, policy, eps=0.0)
    expected = logits.masked_fill(policy[:, None, None, :] == 0, float("-inf")).softmax(-1)
    kept_rows = policy[0] > 0
    assert torch.allclose(weights[:, :, kept_rows], expected[:, :, kept_rows], atol=1e-6)
    # A dropped query still attends to the kept keys and to itself, never to other dropped keys.
    sees = (policy[:, None, None, :] > 0) | (torch.arange(5) == 1)
    expected_dropped_row = logits.masked_fill(~sees, float("-inf")).softmax(-1)[:, :, 1]
    assert torch.allclose(weights[:, :, 1], expected_dropped_row, atol=1e-6)
    assert bool((weights[:, :, 1, 4] == 0).all())


def test_gumbel_decisions_are_hard_and_cumulative(dyn_tiny, deit_tiny_batch):
    torch.manual_seed(1)
    with torch.no_grad():
        out = dynamicvit_train_forward(dyn_tiny, deit_tiny_batch[:2], tau=1.0, hard=True)
    previous = torch.ones(2, 196)
    for decision in out.decisions:
        assert set(decision.unique().tolist()) <= {0.0, 1.0}
        assert bool((decision <= previous).all())
        previous = decision
    assert out.keep_targets == pytest.approx([0.7, 0.49, 0.343])


def _patch_slice(index: int, grid: int = 14, patch: int = 16) -> tuple[slice, slice]:
    row, col = divmod(index, grid)
    return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


def test_hard_mask_kept_tokens_ignore_dropped_inputs(deit_tiny_real, deit_tiny_batch):
    # Prune before block 0 so that a patch's pixels reach only its own token before the first mask.
    # float64 separates the masking formula's own leak from float32 rounding (which alone is ~2e-5 here).
    torch.manual_seed(2)
    model = dynamicvit_from_backbone(deit_tiny_real, pruning_locations=(0, 4, 8)).eval().double()
    x = deit_tiny_batch[:1].double()
    masks = [(torch.rand(1, 196) > 0.3).double() for _ in range(3)]
    dropped_first = int((masks[0][0] == 0).nonzero()[0])
    rows, cols = _patch_slice(dropped_first)
    perturbed = x.clone()
    perturbed[0, :, rows, cols] = torch.randn(3, 16, 16, dtype=torch.float64) * 3.0
    ones = [torch.ones(1, 196, dtype=torch.float64)] * 3
    with torch.no_grad():
        base = dynamicvit_train_forward(model, x, policy_override=masks)
        moved = dynamicvit_train_forward(model, perturbed, policy_override=masks)
        unmasked = dynamicvit_train_forward(model, perturbed, policy_override=ones)
        unmasked_base = dynamicvit_train_forward(model, x, policy_override=ones)
    kept = base.decisions[-1][0] > 0.5
    # A dropped key still leaks through the official formula: its logit enters the row max, so it rescales
    # exp(S - max) against the eps terms (relative effect ~ eps * exp(shift of the max)); measured <= 3e-6
    # on kept final tokens (magnitudes ~10) and 3e-7 on logits, so 1e-5 is honest and still ~1e4 below the
    # change the same perturbation causes when nothing is masked.
    assert (base.logits - moved.logits).abs().max() < 1e-5
    assert (base.tokens[0, kept] - moved.tokens[0, kept]).abs().max() < 1e-5
    assert (unmasked.logits - unmasked_base.logits).abs().max() > 1e-2
    assert (base.tokens[0, dropped_first] - moved.tokens[0, dropped_first]).abs().max() > 1e-2


def _fake_output(decisions, logits, tokens, rho=0.7) -> DynamicViTTrainOutput:
    return DynamicViTTrainOutput(logits, tokens, decisions, [rho ** (s + 1) for s in range(len(decisions))])


def test_loss_terms_and_weights():
    torch.manual_seed(3)
    logits, tokens = torch.randn(2, 10), torch.randn(2, 8, 4)
    labels = torch.tensor([1, 7])
    ce = F.cross_entropy(logits, labels)
    ones = [torch.ones(2, 8)] * 3
    total, parts = dynamicvit_loss(_fake_output(ones, logits, tokens), labels, logits, tokens)
    expected_ratio = ((1 - 0.7) ** 2 + (1 - 0.49) ** 2 + (1 - 0.343) ** 2) / 3
    assert parts["ratio"].item() == pytest.approx(expected_ratio, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["token_mse"].item() == pytest.approx(0.0, abs=1e-9)
    assert total.item() == pytest.approx(ce.item() + 2.0 * expected_ratio, rel=1e-5)

    teacher_logits = torch.randn(2, 10)
    last = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0]] * 2, dtype=torch.float)  # 4 of 8 kept, per image
    decisions = [torch.ones(2, 8), torch.ones(2, 8), last]
    student = tokens.clone()
    student[:, 2] += 5.0  # a dropped token: must not count
    student[:, 0] += 1.0  # a kept token: 4 channels of error 1 over 4 kept tokens x 2 images x 4 channels
    total, parts = dynamicvit_loss(_fake_output(decisions, logits, student), labels, teacher_logits, tokens)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean", log_target=True)
    assert parts["token_mse"].item() == pytest.approx(0.25, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    ratio = ((1 - 0.7) ** 2 + (1 - 0.49) ** 2 + (0.5 - 0.343) ** 2) / 3
    assert total.item() == pytest.approx(ce.item() + 2.0 * ratio + 0.5 * kl.item() + 0.5 * 0.25, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Official checkpoints
# ------------------------------------------------------------------------------------------------
OFFICIAL_PREDICTOR_KEYS = {
    f"score_predictor.{s}.{part}.{i}.{w}"
    for s in range(3) for part, idx in (("in_conv", (0, 1)), ("out_conv", (0, 2, 4))) for i in idx
    for w in ("weight", "bias")
}


def _small(arch: str) -> DynamicViT:
    return build_dynamicvit(arch, img_size=64, num_classes=10)


def test_official_format_checkpoint_round_trips(tmp_path):
    torch.manual_seed(4)
    source = _small("dynamicvit_deit_256_patch16_224").eval()
    deit_keys = set(timm.models.vision_transformer.VisionTransformer(
        img_size=64, num_classes=10, embed_dim=256, depth=12, num_heads=4).state_dict())
    state = source.state_dict()
    assert set(state) - deit_keys == OFFICIAL_PREDICTOR_KEYS and deit_keys <= set(state)
    path = tmp_path / "dynamicvit_256.pth"
    torch.save({"model": state}, path)

    target = load_official_checkpoint(_small("dynamicvit_deit_256_patch16_224").eval(), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, trace_a = dynamicvit_forward(source, x, 0.7, return_trace=True)
        b, trace_b = dynamicvit_forward(target, x, 0.7, return_trace=True)
    assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(trace_a.kept_indices, trace_b.kept_indices))
    assert trace_a.tokens_per_block == [17] * 3 + [12] * 3 + [8] * 3 + [6] * 3  # int(16 * 0.7^s) + CLS


def test_wrong_backbone_checkpoint_is_refused_with_shapes():
    with torch.device("meta"):  # only the DeiT-B key names and shapes matter: skip allocating 86M weights
        base_shapes = build_dynamicvit("dynamicvit_deit_base_patch16_224", img_size=64, num_classes=10).state_dict()
    checkpoint = {"model": {k: torch.zeros(v.shape) for k, v in base_shapes.items()}}
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(_small("dynamicvit_deit_small_patch16_224"), checkpoint)
    message = str(info.value)
    assert "Shape mismatch" in message and "(768" in message and "384" in message
    assert "dynamicvit_deit_base_patch16_224" in message


def test_archs_are_the_official_shapes():
    assert {n: (a.embed_dim, a.num_heads) for n, a in DYNAMICVIT_ARCHS.items()} == {
        "dynamicvit_deit_256_patch16_224": (256, 4),
        "dynamicvit_deit_small_patch16_224": (384, 6),
        "dynamicvit_deit_base_patch16_224": (768, 12),
    }
    with pytest.raises(ValueError):
        DynamicViT(embed_dim=64, depth=4, num_heads=2, pruning_locations=(3, 6, 9))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_real_setup(shared_dir, shared_photos):
    """Real DeiT-Tiny at 112 px (pos-embed resampled by timm), 7 real photos, a frozen teacher."""
    import timm.data
    from sklearn.datasets import load_sample_images
    from PIL import Image

    vit = timm.create_model("deit_tiny_patch16_224", pretrained=True, img_size=112,
                            pretrained_cfg_overlay=dict(file=str(shared_dir / "weights" / "deit_tiny_patch16_224.safetensors")))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, 112, 112)}, model=vit))
    photos = list(shared_photos) + [Image.fromarray(a) for a in load_sample_images().images]
    batch = torch.stack([transform(p) for p in photos])
    return vit, cli.frozen_teacher(vit), batch


def _evaluate(model, teacher, batch, labels, seeds=(10, 11)) -> tuple[float, list[float]]:
    """Loss and mean keep per stage averaged over fixed Gumbel seeds (same noise before and after training)."""
    from models.dynamicvit import teacher_outputs

    losses, keeps = [], []
    with torch.no_grad():
        t_logits, t_tokens = teacher_outputs(teacher, batch)
        for seed in seeds:
            torch.manual_seed(seed)
            out = dynamicvit_train_forward(model, batch)
            losses.append(dynamicvit_loss(out, labels, t_logits, t_tokens)[0].item())
            keeps.append(mean_keep_per_stage(out))
    return sum(losses) / len(losses), [sum(k[s] for k in keeps) / len(keeps) for s in range(3)]


def test_training_steps_lower_the_loss_and_move_keep_towards_target(small_real_setup):
    vit, teacher, batch = small_real_setup
    torch.manual_seed(5)
    model = dynamicvit_from_backbone(vit).train()
    optimizer = torch.optim.Adam(cli.trainable_parameter_groups(model, finetune_backbone=False, lr=2e-3))
    labels = torch.full((batch.shape[0],), cli.TEACHER_LABEL)
    with torch.no_grad():
        teacher_labels = teacher(batch).argmax(-1)
    targets = [0.7, 0.49, 0.343]
    loss_before, keep_before = _evaluate(model, teacher, batch, teacher_labels)
    assert keep_before[0] == pytest.approx(0.5, abs=0.1)  # random predictors: far from 0.7

    backbone_before = model.blocks[5].mlp.fc1.weight.detach().clone()
    for _ in range(8):
        stats = cli.train_step(model, teacher, batch, labels, optimizer, keep_ratio=0.7)
        assert math.isfinite(stats["loss"]) and {"ce", "ratio", "kl", "token_mse", "keep_2"} <= set(stats)
    loss_after, keep_after = _evaluate(model, teacher, batch, teacher_labels)

    assert loss_after < loss_before
    distance_before = sum(abs(k - t) for k, t in zip(keep_before, targets))
    distance_after = sum(abs(k - t) for k, t in zip(keep_after, targets))
    assert distance_after < 0.5 * distance_before, (keep_before, keep_after)
    assert torch.equal(model.blocks[5].mlp.fc1.weight, backbone_before)  # backbone frozen by default


def test_folder_labels_from_synsets_or_indices():
    assert cli.label_of_folder("n01443537", 1000) == 1
    assert cli.label_of_folder("17", 1000) == 17
    assert cli.label_of_folder("1000", 1000) == cli.TEACHER_LABEL
    assert cli.label_of_folder("holiday", 1000) == cli.TEACHER_LABEL
    assert cli.label_of_folder("17", 10) == cli.TEACHER_LABEL
    assert cli.label_of_folder(None, 1000) == cli.TEACHER_LABEL


def test_cli_trains_two_steps_and_writes_a_loadable_checkpoint(tmp_path, shared_dir, shared_photos, capsys):
    data = tmp_path / "data"
    (data / "n01530575").mkdir(parents=True)
    shared_photos[0].save(data / "n01530575" / "a.jpg")
    shared_photos[1].save(data / "b.jpg")
    shared_photos[2].save(data / "c.png")
    (data / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "ckpt" / "dynamicvit_tiny.pth"
    weights = shared_dir / "weights" / "deit_tiny_patch16_224.safetensors"

    rc = cli.main(["--backbone", "deit_tiny_patch16_224", "--backbone-weights", str(weights), "--data", str(data),
                   "--steps", "2", "--batch", "2", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "4 images: 1 labelled by class folder, 3 by the teacher's top-1" in printed
    assert "step 2/2" in printed and "keep " in printed and "skipped 1 unreadable" in printed

    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["vitlab"]["backbone"] == "deit_tiny_patch16_224" and saved["vitlab"]["steps"] == 2
    assert saved["vitlab"]["keep_ratio"] == pytest.approx(0.7)
    loaded = load_official_checkpoint(dynamicvit_from_backbone(timm.create_model("deit_tiny_patch16_224")), out)
    real = read_state_dict(weights)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, real["blocks.0.attn.qkv.weight"])  # backbone untouched


def test_cli_reports_a_missing_folder(tmp_path, capsys):
    rc = cli.main(["--backbone", "deit_tiny_patch16_224", "--backbone-weights", str(tmp_path / "none.safetensors"),
                   "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pth")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_two_keep_ratios_from_two_threads_share_one_model():
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(7)
    model = _small("dynamicvit_deit_256_patch16_224").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = {r: dynamicvit_forward(model, x, r) for r in (0.7, 0.5)}
        before = {k: v.clone() for k, v in model.state_dict().items()}

        def run(ratio: float) -> torch.Tensor:
            with torch.inference_mode():
                return dynamicvit_forward(model, x, ratio)

        ratios = (0.7, 0.5, 0.7, 0.5)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(run, ratios))
    assert not torch.allclose(expected[0.7], expected[0.5])
    assert all(torch.equal(result, expected[r]) for r, result in zip(ratios, results))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
