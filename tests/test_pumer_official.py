"""PuMer's decisions as PuMer's code makes them (csarron/PuMer), on a tiny ViLT and a tiny METER.

The reference below is the official semantics written down from the authors' code as plain list operations on
one sample (none of their code is used): walk the model's own submodules; in a reduce layer score every image
token (its CLS too) by the text-to-image attention, keep the best ``n - round(p * n)`` in score order, ToMe-merge
them in that order (A = even positions, B = odd, A's first token protected, the best-matched A tokens merge into
their B partner with equal weights, result ``[unmerged A, B]``), merge the text the same way (its CLS first and
protected); in METER the image layer attends to the text layer's output. The forwards under test must make the
same decisions (kept tokens, merge groups, their order) and give the same logits.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.meter import tiny_meter
from models.meter_pumer import meter_pumer_forward
from models.vilt_pumer import pumer_forward, tiny_vilt

CLS = "image CLS"


# ----------------------------------------------------------------------------------------------- the reference
def _attention(query_layer, key_layer, value_layer, hidden, context, heads):
    """Scaled dot-product attention with probabilities: (context (N, C), probs (H, N, M), keys (H, M, d))."""
    def split(x):
        return x.view(x.shape[0], heads, -1).transpose(0, 1)

    q, k, v = split(query_layer(hidden)), split(key_layer(context)), split(value_layer(context))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (probs @ v).transpose(0, 1).reshape(hidden.shape[0], -1), probs, k


def _tome(states, groups, sizes, metric, r, size_weighted):
    """One ToMe step as PuMer's ``bipartite_soft_matching(metric, r, class_token=True)`` + ``merge_wavg``."""
    n = len(groups)
    r = min(r, (n - 1) // 2)
    a_positions, b_positions = list(range(0, n, 2)), list(range(1, n, 2))
    if r <= 0 or not b_positions:
        return states, groups, sizes
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = {}
    for a in a_positions[1:]:  # the first A token (class token) never merges
        similarities = [float(unit[a] @ unit[b]) for b in b_positions]
        j = int(np.argmax(similarities))
        best[a] = (similarities[j], b_positions[j])
    merging = sorted(best, key=lambda a: -best[a][0])[:r]
    weights = sizes if size_weighted else [1.0] * n  # PuMer's merge_wavg starts every step from size 1
    into = {b: [b] for b in b_positions}
    for a in merging:
        into[best[a][1]].append(a)
    order = [a for a in a_positions if a not in merging] + b_positions
    new_states, new_groups, new_sizes = [], [], []
    for p in order:
        members = into.get(p, [p])
        total = sum(weights[m] for m in members)
        new_states.append(sum(states[m] * weights[m] for m in members) / total)
        new_groups.append(frozenset().union(*(groups[m] for m in members)))
        new_sizes.append(sum(sizes[m] for m in members))
    return torch.stack(new_states), new_groups, new_sizes


def _reduce(text, image, text_groups, image_groups, text_sizes, image_sizes, probs, text_keys, image_keys,
            prune, image_merge, text_merge, protect_image_cls, size_weighted):
    """One PuMer step. probs: (H, T, I) text-to-image attention. Returns the new streams, groups, sizes and the
    groups pruned here."""
    n = len(image_groups)
    scores = probs.mean(dim=0).sum(dim=0).tolist()
    if protect_image_cls:  # the correction: the image CLS ranks first whatever its score
        scores[next(i for i, group in enumerate(image_groups) if CLS in group)] = math.inf
    keep = max(n - round(prune * n), 1)
    ranked = sorted(range(n), key=lambda i: -scores[i])
    kept, pruned = ranked[:keep], ranked[keep:]
    image, image_sizes_kept = image[kept], [image_sizes[i] for i in kept]
    image, new_image_groups, image_sizes = _tome(image, [image_groups[i] for i in kept], image_sizes_kept,
                                                 image_keys[kept], round(image_merge * n), size_weighted)
    text, text_groups, text_sizes = _tome(text, text_groups, text_sizes, text_keys, round(text_merge * len(text)),
                                          size_weighted)
    return text, image, text_groups, new_image_groups, text_sizes, image_sizes, [image_groups[i] for i in pruned]


def vilt_reference(model, inputs, reduce_layers, prune, image_merge, text_merge, protect_image_cls=False,
                   size_weighted=False):
    """(logits, steps): steps[k] = (text groups, image groups, pruned groups) after the k-th reduce layer, each
    group a frozenset of input text positions / patch grid cells (and CLS)."""
    vilt = model.vilt
    embeddings = vilt.embeddings
    ids = inputs["input_ids"]
    text = embeddings.text_embeddings(input_ids=ids, token_type_ids=inputs["token_type_ids"])
    text = text + embeddings.token_type_embeddings(torch.zeros_like(ids))
    image, _, (patch_index, (_, grid_w)) = embeddings.visual_embed(inputs["pixel_values"], inputs["pixel_mask"],
                                                                   max_image_length=-1)
    image = image + embeddings.token_type_embeddings(torch.ones(image.shape[:2], dtype=torch.long))
    text_groups = [frozenset({i}) for i in range(ids.shape[1])]
    image_groups = [frozenset({CLS})] + [frozenset({int(r) * grid_w + int(c)}) for r, c in patch_index[0]]
    x = torch.cat([text, image], dim=1)[0]
    text_sizes, image_sizes = [1.0] * len(text_groups), [1.0] * len(image_groups)
    heads = model.config.num_attention_heads
    steps = []
    for index, layer in enumerate(vilt.encoder.layer):
        normed = layer.layernorm_before(x)
        attention = layer.attention.attention
        context, probs, keys = _attention(attention.query, attention.key, attention.value, normed, normed, heads)
        x = layer.attention.output(context, normed) + x
        if index in reduce_layers:
            t = len(text_groups)
            metric = keys.mean(dim=0)
            text, image, text_groups, image_groups, text_sizes, image_sizes, pruned = _reduce(
                x[:t], x[t:], text_groups, image_groups, text_sizes, image_sizes, probs[:, :t, t:], metric[:t],
                metric[t:], prune, image_merge, text_merge, protect_image_cls, size_weighted)
            x = torch.cat([text, image])
            steps.append((list(text_groups), list(image_groups), pruned))
        x = layer.output(layer.intermediate(layer.layernorm_after(x)), x)
    return model.classifier(vilt.pooler(vilt.layernorm(x[None]))), steps


def meter_reference(model, inputs, reduce_layers, prune, image_merge, text_merge, protect_image_cls=False,
                    size_weighted=False):
    """METER as PuMer's ``modeling_meter`` runs it: in every fusion block the text layer first (reducing in a
    reduce block, after its cross-attention), then the image layer over the text layer's *output*."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    x = model.encode_text(ids, mask)[0]
    y = model.encode_image(inputs["pixel_values"])[0]
    grid = model.config.grid
    text_groups = [frozenset({i}) for i in range(len(x))]
    image_groups = [frozenset({CLS})] + [frozenset({c}) for c in range(grid * grid)]
    text_sizes, image_sizes = [1.0] * len(text_groups), [1.0] * len(image_groups)
    heads = model.config.fusion_heads

    def attend(module, hidden, context):
        out, probs, keys = _attention(module.self.query, module.self.key, module.self.value, hidden, context, heads)
        return module.output(out, hidden), probs, keys

    steps = []
    for index, (text_layer, image_layer) in enumerate(zip(model.cross_modal_text_layers,
                                                          model.cross_modal_image_layers)):
        attended, _, text_keys = attend(text_layer.attention, x, x)
        crossed, probs, image_keys = attend(text_layer.crossattention, attended, y)
        if index in reduce_layers:
            crossed, y, text_groups, image_groups, text_sizes, image_sizes, pruned = _reduce(
                crossed, y, text_groups, image_groups, text_sizes, image_sizes, probs, text_keys.mean(dim=0),
                image_keys.mean(dim=0), prune, image_merge, text_merge, protect_image_cls, size_weighted)
            steps.append((list(text_groups), list(image_groups), pruned))
        x = text_layer.output(text_layer.intermediate(crossed), crossed)
        attended, _, _ = attend(image_layer.attention, y, y)
        crossed, _, _ = attend(image_layer.crossattention, attended, x)
        y = image_layer.output(image_layer.intermediate(crossed), crossed)
    return model.classify(x[None], y[None]), steps


# ----------------------------------------------------------------------------------------------- comparing
def traced_groups(trace, step_index):
    """(text groups, image groups, pruned cells) of a traced step, in the reference's form (batch 1)."""
    step = trace.steps[step_index]
    text_after = int(trace.text_counts[0, step.layer + 1])
    image_after = int(trace.image_counts[0, step.layer + 1])
    text = [frozenset(np.flatnonzero(step.text_groups[0] == p).tolist()) for p in range(text_after)]
    image = []
    for p in range(text_after, text_after + image_after):
        cells = set(np.flatnonzero(step.image_groups[0] == p).tolist())
        image.append(frozenset(cells | ({CLS} if step.image_cls[0] == p else set())))
    return text, image, set(step.pruned_cells[0].tolist())


def _pruned_cells(pruned_groups) -> set:
    return set().union(*pruned_groups) - {CLS} if pruned_groups else set()


def _check(logits, trace, expected_logits, steps):
    assert len(trace.steps) == len(steps)
    for index, (text, image, pruned) in enumerate(steps):
        got_text, got_image, got_pruned = traced_groups(trace, index)
        assert got_text == text, f"step {index}: text merge groups"
        assert got_image == image, f"step {index}: image tokens (kept set, merge groups, order)"
        assert got_pruned == _pruned_cells(pruned), f"step {index}: pruned cells"
        assert (trace.steps[index].image_cls[0] == -1) == all(CLS not in group for group in image)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vilt():
    return tiny_vilt(seed=1)


@pytest.fixture(scope="module")
def meter():
    return tiny_meter(seed=1)


SETTINGS = {  # reduce layers, prune, image merge, text merge
    "vilt": [((2, 5, 8), 0.1, 0.3, 0.2),  # PuMer's ViLT VQA setting
             ((1, 2, 3, 4, 5, 6), 0.2, 0.2, 0.2), ((0, 1), 0.3, 0.5, 0.5)],
    "meter": [((0, 1, 2), 0.2, 0.2, 0.2), ((0, 2), 0.3, 0.5, 0.3), ((1,), 0.1, 0.3, 0.5)],
}
QUESTIONS = ["what is the color of the dog?", "how many people are sitting on the grass?"]
CASES = [(family, question, setting) for family in SETTINGS for question in QUESTIONS for setting in SETTINGS[family]]
CORRECTIONS = {"official": {}, "protect_cls": dict(protect_image_cls=True), "size_weighted": dict(size_weighted=True)}
# PuMer's code on every case; each correction on the first question's cases
RUNS = [pytest.param(case, corrections, id=f"{case[0]}-{name}-{'-'.join(map(str, case[2][0]))}-{case[1][:8]}")
        for case in CASES for name, corrections in CORRECTIONS.items() if not corrections or case[1] == QUESTIONS[0]]
REFERENCES = {"vilt": (vilt_reference, pumer_forward), "meter": (meter_reference, meter_pumer_forward)}


def _run(request, family, question, photo, setting, with_reference=True, **corrections):
    """(logits, trace) of the forward under test and (logits, steps) of the reference (or None), same inputs."""
    model, processor = request.getfixturevalue(family)
    reference, forward = REFERENCES[family]
    layers, prune, image_merge, text_merge = setting
    inputs = processor(images=photo, text=question, return_tensors="pt")
    with torch.inference_mode():
        expected = None
        if with_reference:
            expected = reference(model, inputs, layers, prune, image_merge, text_merge, **corrections)
        got = forward(model, inputs, reduce_layers=layers, prune_ratio=prune, image_merge_ratio=image_merge,
                      text_merge_ratio=text_merge, return_trace=True, **corrections)
    return got, expected


@pytest.mark.parametrize("case, corrections", RUNS)
def test_decides_as_pumers_code(request, photo, case, corrections):
    family, question, setting = case
    (logits, trace), (expected, steps) = _run(request, family, question, photo, setting, **corrections)
    _check(logits, trace, expected, steps)


def test_the_official_image_cls_moves_and_can_be_pruned(request, photo):
    """The behaviour the ``protect_image_cls`` correction removes is real on these models: across questions and
    settings the image CLS leaves position 0 or is pruned at least once (and never with the correction)."""
    moved = {False: 0, True: 0}
    for family, question, setting in CASES:
        for protect in (False, True):
            (_, trace), _ = _run(request, family, question, photo, setting, with_reference=False,
                                 protect_image_cls=protect)
            moved[protect] += sum(int(step.image_cls[0] != trace.text_counts[0, step.layer + 1])
                                  for step in trace.steps)
    assert moved[False] > 0 and moved[True] == 0


def test_corrections_are_named_settings_of_the_method_records():
    """Each correction is a variant key with a one-line help; METER's unreduced baseline runs METER's order."""
    from models.methods import METHODS, method_of
    from models.registry import get_spec
    from models.variants import parse_variant

    variant = parse_variant("meter_clip16_288_vqa@pumer,cls,wavg=true,context=block_input")
    method = method_of(variant.settings, get_spec("meter_clip16_288_vqa"))
    assert method.key == "pumer-meter" and method.arguments(variant.settings) == dict(
        prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2, protect_image_cls=True, size_weighted=True,
        image_context="block_input")
    assert method.neutral_arguments["image_context"] == "block_input"
    for key in ("pumer", "pumer-meter"):
        corrections = [s for s in METHODS[key].settings if s.help]
        assert {s.key for s in corrections} >= {"cls", "wavg"} and all("\n" not in s.help for s in corrections)
        assert all(s.default is False or s.default == "text_output" for s in corrections)  # PuMer's code by default
