"""Taylor channel importance: exact values on tiny models, accumulation, captum variant, no mutation."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import timm
import torch
import torch.nn.functional as F

from analysis.channel_importance import (
    COMPONENTS,
    activation_importance,
    budget_keep_fraction,
    combined_table,
    component_importance_figure,
    fraction_kept_figure,
    head_importance_figure,
    normalized_scores,
    rank_agreement,
    taylor_importance,
    taylor_vs_activation_figure,
)

EMBED, HEADS, DEPTH, CLASSES = 16, 2, 2, 5


def tiny_vit(num_classes: int = CLASSES, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=DEPTH, num_heads=HEADS,
                             embed_dim=EMBED, num_classes=num_classes).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def score_of(scores, block: int, component: str, head: int, channel: int) -> float:
    hit = ((scores.block == block) & (scores.component == component) & (scores.head == head)
           & (scores.channel == channel))
    assert hit.sum() == 1
    return float(scores.score[hit][0])


def hand_taylor(model, batches) -> dict[tuple, float]:
    """Direct computation: grads of the summed CE over all batches, then |sum w*g| per channel, one at a time."""
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        loss = F.cross_entropy(model(x), y, reduction="sum")
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[n] += g
    prod = {n: (params[n] * grads[n]).detach() for n in params}
    out, head_dim = {}, EMBED // HEADS
    for c in range(EMBED):  # embedding channel: conv row + bias + cls/pos columns
        out[(-1, "embed", -1, c)] = abs(float(prod["patch_embed.proj.weight"][c].sum() + prod["patch_embed.proj.bias"][c]
                                              + prod["cls_token"][..., c].sum() + prod["pos_embed"][..., c].sum()))
    for b in range(DEPTH):
        for i, comp in enumerate("qkv"):
            for h in range(HEADS):
                for d in range(head_dim):
                    row = i * EMBED + h * head_dim + d
                    out[(b, comp, h, d)] = abs(float(prod[f"blocks.{b}.attn.qkv.weight"][row].sum()
                                                     + prod[f"blocks.{b}.attn.qkv.bias"][row]))
        for comp, layer in (("proj", "attn.proj"), ("ffn_hidden", "mlp.fc1")):
            for c in range(params[f"blocks.{b}.{layer}.weight"].shape[0]):
                out[(b, comp, -1, c)] = abs(float(prod[f"blocks.{b}.{layer}.weight"][c].sum()
                                                  + prod[f"blocks.{b}.{layer}.bias"][c]))
    return out


def test_scores_equal_direct_computation_over_two_batches():
    model = tiny_vit()
    batches = [(images(3, 1), torch.tensor([0, 1, 2])), (images(2, 2), torch.tensor([4, 3]))]
    scores = taylor_importance(model, batches, loss_target="labels")
    expected = hand_taylor(model, batches)
    assert len(scores) == len(expected) == EMBED + DEPTH * (3 * EMBED + EMBED + 4 * EMBED)
    got = {(int(b), c, int(h), int(ch)): float(s) for b, c, h, ch, s in
           zip(scores.block, scores.component, scores.head, scores.channel, scores.score)}
    keys = sorted(expected)
    np.testing.assert_allclose([got[k] for k in keys], [expected[k] for k in keys], rtol=1e-4, atol=1e-9)
    assert scores.num_images == 5


def test_score_does_not_depend_on_batching():
    model, x = tiny_vit(), images(4)
    whole = taylor_importance(model, [(x, None)])
    split = taylor_importance(model, [(x[:2], None), (x[2:], None)])
    np.testing.assert_allclose(split.score, whole.score, rtol=1e-4, atol=1e-9)


def test_accumulation_is_abs_of_sum_not_sum_of_abs():
    # With two classes, the CE gradient w.r.t. the logits for label 1 is -(p0/p1) times the one for label 0,
    # so on the same image every per-batch product w*g has the opposite sign in batch B.
    model, x = tiny_vit(num_classes=2), images(1)
    a = taylor_importance(model, [(x, 0)], loss_target="labels")
    b = taylor_importance(model, [(x, 1)], loss_target="labels")
    both = taylor_importance(model, [(x, 0), (x, 1)], loss_target="labels")
    with torch.no_grad():
        p0, p1 = model(x).softmax(-1)[0].tolist()
    np.testing.assert_allclose(b.score, a.score * p0 / p1, rtol=1e-3, atol=1e-10)
    np.testing.assert_allclose(both.score, np.abs(a.score - b.score), rtol=1e-3, atol=1e-9)
    live = a.score > 1e-8
    assert live.sum() > 50
    assert np.all(both.score[live] < 0.99 * (a.score + b.score)[live])


def test_channel_with_zero_weights_and_bias_scores_zero():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[7].zero_()
        model.blocks[1].mlp.fc1.bias[7].zero_()
        v_row = 2 * EMBED + 1 * (EMBED // HEADS) + 3  # V, head 1, channel 3
        model.blocks[0].attn.qkv.weight[v_row].zero_()
        model.blocks[0].attn.qkv.bias[v_row].zero_()
    scores = taylor_importance(model, [(images(4), None)])
    assert score_of(scores, 1, "ffn_hidden", -1, 7) == 0.0
    assert score_of(scores, 0, "v", 1, 3) == 0.0
    assert score_of(scores, 1, "ffn_hidden", -1, 6) > 0.0
    assert score_of(scores, 0, "v", 1, 2) > 0.0


def test_loss_target_labels_needs_labels():
    with pytest.raises(ValueError, match="label"):
        taylor_importance(tiny_vit(), [(images(2), None)], loss_target="labels")
    with pytest.raises(ValueError, match="loss_target"):
        taylor_importance(tiny_vit(), [(images(2), None)], loss_target="teacher")


def test_captum_variant_matches_hand_grad_times_activation():
    model, x, y = tiny_vit(), images(3), torch.tensor([1, 0, 4])
    captured = {}
    work = tiny_vit()  # same seed -> same weights, a separate object for the hand computation
    handle = work.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: captured.__setitem__("fc1", o))
    loss = F.cross_entropy(work(x), y, reduction="sum")
    act = captured["fc1"]
    (grad,) = torch.autograd.grad(loss, act)
    handle.remove()
    expected = (act * grad).sum(dim=(0, 1)).abs().detach().numpy()
    scores = activation_importance(model, [(x, y)], loss_target="labels")
    mask = (scores.block == 1) & (scores.component == "ffn_hidden")
    np.testing.assert_allclose(scores.score[mask], expected, rtol=1e-4, atol=1e-9)


def test_linear_layers_give_identical_weight_and_activation_scores():
    # sum_t a_tc * g_tc = sum_j W_cj dL/dW_cj + b_c dL/db_c for a Linear layer, so only `embed` may differ.
    model, batches = tiny_vit(), [(images(2, 1), None), (images(2, 2), None)]
    taylor, activation = taylor_importance(model, batches), activation_importance(model, batches)
    table = combined_table(taylor, activation)
    linear = table[table["component"] != "embed"]
    np.testing.assert_allclose(linear["activation"], linear["taylor"], rtol=1e-3, atol=1e-9)
    agreement = rank_agreement(taylor, activation)
    assert agreement.set_index("component").loc["v", "spearman"] > 0.999


def _model_state(model):
    return ([(n, p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def test_cached_model_is_not_mutated():
    model = tiny_vit()
    model.requires_grad_(False)
    model.blocks[0].attn.qkv.weight.requires_grad_(True)
    model.blocks[0].attn.qkv.weight.grad = torch.full_like(model.blocks[0].attn.qkv.weight, 0.5)
    model.train()  # the copy runs in eval mode; the caller's flag stays
    before = _model_state(model)
    x = images(2)
    taylor_importance(model, [(x, None)])
    activation_importance(model, [(x, torch.tensor([1, 2]))], loss_target="labels")
    after = _model_state(model)
    assert [(n, r) for n, r, _ in before[0]] == [(n, r) for n, r, _ in after[0]]
    for (_, _, g0), (_, _, g1) in zip(before[0], after[0]):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2] == after[2]
    assert not model._forward_hooks and not model.blocks[0].mlp.fc1._forward_hooks


def _live_efficientvit_m0() -> torch.nn.Module:
    """Random-init EfficientViT-M0 with random BN affine params: timm zero-inits the BN closing each branch,
    which would make every gradient inside the branches exactly zero."""
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_m0", num_classes=10, img_size=160)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def test_efficientvit_m0_scores_every_component():
    model = _live_efficientvit_m0()
    with torch.inference_mode():
        model(torch.randn(1, 3, 160, 160))  # fills the model's attention-bias cache, which must survive
    cache_before = {k: v.clone() for k, v in model.stages[0].blocks[0].mixer.m.attn.attention_bias_cache.items()}
    batches = [(torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(3)), torch.tensor([7]))]
    taylor = taylor_importance(model, batches, loss_target="labels")
    activation = activation_importance(model, batches, loss_target="labels")
    assert set(taylor.component) == set(COMPONENTS)
    for scores in (taylor, activation):
        assert np.isfinite(scores.score).all()
        for comp in COMPONENTS:
            assert scores.score[scores.component == comp].max() > 0, comp
    # Channel counts from the model's own configuration: blocks 1 + 2 + 3, 4 heads, key_dim 16.
    attns = [m for m in model.modules() if type(m).__name__ == "CascadedGroupAttention"]
    assert (taylor.component == "q").sum() == sum(a.num_heads * a.key_dim for a in attns)
    assert (taylor.component == "v").sum() == sum(a.num_heads * a.val_dim for a in attns)
    assert (taylor.component == "embed").sum() == 64
    assert sorted(set(taylor.block)) == [-1, 0, 1, 2, 3, 4, 5]
    cache_after = model.stages[0].blocks[0].mixer.m.attn.attention_bias_cache
    assert cache_before.keys() == cache_after.keys()
    assert all(torch.equal(cache_before[k], cache_after[k]) for k in cache_before)
    assert rank_agreement(taylor, activation).set_index("component").loc["all", "spearman"] > 0


def test_normalisation_and_global_budget():
    scores = taylor_importance(tiny_vit(), [(images(4), None)])
    layer = normalized_scores(scores, "layer")
    for (b, c) in {(int(b), c) for b, c in zip(scores.block, scores.component)}:
        part = layer[(scores.block == b) & (scores.component == c)]
        assert part.mean() == pytest.approx(1.0)
    block = normalized_scores(scores, "block")
    assert block[scores.block == 1].mean() == pytest.approx(1.0)
    budget = budget_keep_fraction(scores, 0.3)
    assert budget["kept"].sum() == round(0.3 * len(scores))
    assert budget["channels"].sum() == len(scores)
    assert budget["fraction_kept"].between(0, 1).all()
    # The kept channels are exactly the top-ranked ones: every kept score >= every dropped score.
    kept = np.zeros(len(scores), bool)
    kept[np.argsort(-block, kind="stable")[: round(0.3 * len(scores))]] = True
    assert block[kept].min() >= block[~kept].max()
    assert budget_keep_fraction(scores, 1.0)["fraction_kept"].eq(1).all()
    assert budget_keep_fraction(scores, 0.0)["fraction_kept"].eq(0).all()


def test_figures_build():
    model, batches = tiny_vit(), [(images(2), None)]
    taylor, activation = taylor_importance(model, batches), activation_importance(model, batches)
    budget = budget_keep_fraction(taylor, 0.5)
    figures = [component_importance_figure(taylor, note="(random weights)"), head_importance_figure(taylor),
               fraction_kept_figure(budget, 0.5, taylor.model), taylor_vs_activation_figure(taylor, activation)]
    for fig in figures:
        assert isinstance(fig, go.Figure) and len(fig.data) > 0
    assert "random weights" in figures[0].layout.title.text
    assert "Spearman" in figures[3].layout.title.text
    assert len(figures[1].data) == 3  # Q, K, V panels


@pytest.mark.shared
def test_real_deit_tiny_scores(deit_tiny_real, deit_tiny_batch):
    scores = taylor_importance(deit_tiny_real, [(deit_tiny_batch, None)])
    assert np.isfinite(scores.score).all()
    assert np.unique(scores.score).size > 0.9 * len(scores)
    summary = scores.component_summary(0.5)
    print("\nDeiT-Tiny, 5 photos, own top-1, global 50 % budget (block-normalised):\n", summary.to_string())
    kept = summary.set_index("component")["fraction_kept"]
    # Attention logits are bilinear in q and k, so channel d of Q and of K get the same score.
    q, k = scores.score[scores.component == "q"], scores.score[scores.component == "k"]
    np.testing.assert_allclose(q, k, rtol=1e-3, atol=1e-9)
    # EfficientViT's finding on a real model: V and the embedding keep more width than Q/K.
    assert kept["v"] > kept["q"] and kept["embed"] > kept["k"]


def test_class_folders_map_to_imagenet_indices(tmp_path):
    from PIL import Image

    from analysis.data.images import imagenet_class_index
    from analysis.channel_importance import labelled_folder, split_batches

    assert imagenet_class_index("207") == imagenet_class_index("golden_retriever") == 207
    assert imagenet_class_index("n01443537") == imagenet_class_index("Goldfish") == 1
    with pytest.raises(ValueError, match="not an ImageNet class"):
        imagenet_class_index("teapots_i_like")
    for cls in ("1", "golden retriever"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 20)).save(tmp_path / cls / "x.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "loose.png")
    found, labels, messages = labelled_folder(tmp_path)
    assert labels == [1, 207] and len(found) == 2
    assert any("loose.png" in m for m in messages)
    chunks = split_batches(torch.zeros(5, 3, 4, 4), torch.arange(5), 2)
    assert [len(x) for x, _ in chunks] == [2, 2, 1] and chunks[2][1].tolist() == [4]
    chunks = split_batches(torch.zeros(3, 3, 4, 4), [207, 1, 5], 2)  # the page passes the labels as a list
    assert chunks[0][1].dtype == torch.long and chunks[0][1].tolist() == [207, 1] and chunks[1][1].tolist() == [5]
    assert split_batches(torch.zeros(3, 3, 4, 4), None, 2)[1][1] is None


def test_inputs_digest_changes_with_pixels_and_labels():
    from analysis.channel_importance import inputs_digest

    x = torch.rand(2, 3, 4, 4)
    digests = {inputs_digest(x), inputs_digest(x, [1, 2]), inputs_digest(x, [2, 1]), inputs_digest(x + 1, [1, 2])}
    assert len(digests) == 4
    assert inputs_digest(x.clone(), [1, 2]) == inputs_digest(x, torch.tensor([1, 2]))


def test_two_threads_on_one_model_match_sequential_runs():
    from concurrent.futures import ThreadPoolExecutor

    model, x = tiny_vit(), images(2)
    settings = [dict(loss_target="self"), dict(loss_target="labels")]
    jobs = [lambda s=s: taylor_importance(model, [(x, torch.tensor([3, 4]))], **s).score for s in settings]
    with ThreadPoolExecutor(2) as pool:
        parallel = list(pool.map(lambda job: job(), jobs))
    for job, got in zip(jobs, parallel):
        np.testing.assert_allclose(got, job(), rtol=1e-5, atol=1e-10)
    assert not np.allclose(parallel[0], parallel[1])


def test_private_copy_is_reused_and_follows_the_models_weights():
    """The copy a pass works on is kept for the next pass on the same model, sees in-place weight changes
    through its shared storage, and is rebuilt when a parameter is replaced."""
    import copy

    from analysis.channel_importance.taylor import _WORKSPACES

    model, x = tiny_vit(), images(2)
    first = taylor_importance(model, [(x, None)])
    kept = list(_WORKSPACES._free[model])
    assert len(kept) == 1
    np.testing.assert_array_equal(taylor_importance(model, [(x, None)]).score, first.score)
    assert _WORKSPACES._free[model] == kept  # the same copy, handed back again

    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight.mul_(3.0)  # in place: the kept copy shares this storage
    scaled = taylor_importance(model, [(x, None)])
    np.testing.assert_allclose(scaled.score, taylor_importance(copy.deepcopy(model), [(x, None)]).score, rtol=1e-6)
    assert not np.allclose(scaled.score, first.score)

    model.blocks[0].attn.qkv.weight = torch.nn.Parameter(torch.randn_like(model.blocks[0].attn.qkv.weight))
    replaced = taylor_importance(model, [(x, None)])
    np.testing.assert_allclose(replaced.score, taylor_importance(copy.deepcopy(model), [(x, None)]).score, rtol=1e-6)
    assert _WORKSPACES._free[model] != kept
    assert all(p.grad is None for p in model.parameters())  # the shared model is never written to


def test_benchmark_record_describes_what_it_timed():
    # How much slower Taylor scoring is belongs to `python -m analysis.bench`, not to a test on a busy CPU.
    from analysis.bench.taylor_cost import time_taylor_vs_forward

    timing = time_taylor_vs_forward(tiny_vit(), images(2), repeats=1, name="tiny")
    assert (timing.model, timing.batch, timing.device) == ("tiny", 2, "cpu")
    assert timing.forward_s > 0 and timing.taylor_s > 0
    assert timing.ratio == pytest.approx(timing.taylor_s / timing.forward_s)


def test_page_function_and_dataset_task_share_one_accumulator():
    from analysis.runs.taylor import TaylorTask
    from analysis.channel_importance import TaylorSums

    model, x, labels = tiny_vit(), images(4), torch.tensor([0, 1, 2, 3])
    page = taylor_importance(model, [(x[:1], labels[:1]), (x[1:], labels[1:])], loss_target="labels")
    task = TaylorTask(model, "labels", "tiny")
    assert task.sums is task.accumulator.sums and isinstance(task.accumulator, TaylorSums)
    task.update(x[:3], labels[:3]), task.update(x[3:], labels[3:])
    dataset = task.result(task.sums)
    assert dataset.num_images == page.num_images == 4
    np.testing.assert_allclose(dataset.score, page.score, rtol=1e-4, atol=1e-6 * page.score.max())


def test_q_and_k_score_the_same_and_both_lines_stay_visible():
    """Issue 20: Q and K Taylor scores are identical (it follows from S = q k^T) and q's line hid under k's."""
    from analysis.channel_importance import QK_SAME_NOTE, qk_scores_identical

    model, batches = tiny_vit(), [(images(3), None)]
    taylor = taylor_importance(model, batches)
    assert qk_scores_identical(taylor)
    assert "follows from the maths" in QK_SAME_NOTE
    assert "chart above" in QK_SAME_NOTE and "below" not in QK_SAME_NOTE  # the page shows it under that chart
    changed = taylor_importance(model, batches)
    changed.score[np.flatnonzero(changed.component == "k")[0]] *= 2  # one K channel off: no longer the same
    assert not qk_scores_identical(changed)
    lines = {t.name: t for t in fraction_kept_figure(budget_keep_fraction(taylor, 0.5), 0.5).data}
    assert lines["k"].line.dash == "dash" and lines["q"].line.dash in (None, "solid")
    assert lines["q"].line.width > 2 * (lines["k"].line.width or 2)  # q drawn wide underneath, k on top


def test_p_values_are_written_as_people_write_them():
    """Issue 20: a p-value was printed as 0.0000000000000009."""
    from analysis.channel_importance import p_value_text

    assert p_value_text(9e-16) == "9.0e-16"
    assert p_value_text(0.0321) == "0.032" and p_value_text(0.0) == "< 1e-300"
    assert p_value_text(float("nan")) == "n/a"
