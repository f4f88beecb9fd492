"""VQAv2 accuracy against hand-computed cases and against the official evaluation's loop written out plainly."""
from __future__ import annotations

import random

import numpy as np
import pytest

from analysis.runs.vqa_points import bootstrap
from analysis.vision_language.vqa_accuracy import (normalize_answer, process_digit_article, process_punctuation,
                                                   vqa_accuracy)


def official_loop(prediction: str, answers: list[str]) -> float:
    """vqaEval.py's per-question loop over annotator records (each with its own id), as it is written there."""
    records = [{"answer_id": i, "answer": a.replace("\n", " ").replace("\t", " ").strip()}
               for i, a in enumerate(answers)]
    predicted = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = process_digit_article(process_punctuation(r["answer"]))
        predicted = process_digit_article(process_punctuation(predicted))
    accuracies = []
    for record in records:
        others = [r for r in records if r != record]
        accuracies.append(min(1, len([r for r in others if r["answer"] == predicted]) / 3))
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_annotators_leave_one_out(matches, expected):
    """2 of 10: eight subsets hold 2 matches (2/3), two hold 1 (1/3): (8 * 2/3 + 2 * 1/3) / 10 = 0.6."""
    answers = ["dog"] * matches + ["cat"] * (10 - matches)
    if matches == 10:
        answers = ["dog"] * 10
    assert vqa_accuracy("dog", answers) == pytest.approx(expected)


def test_fewer_annotators_average_over_their_own_subsets():
    assert vqa_accuracy("dog", ["dog", "cat", "cat", "cat"]) == pytest.approx((0 + 3 * 1 / 3) / 4)
    assert vqa_accuracy("dog", ["dog", "dog", "dog", "cat", "bird"]) == pytest.approx((3 * 2 / 3 + 2 * 1) / 5)
    assert vqa_accuracy("dog", ["dog"]) == 0.0  # one annotator: the only subset is empty


def test_answer_normalisation_when_annotators_disagree():
    assert vqa_accuracy("Two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("a dog", ["dog", "dog", "dog"] + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dont", ["don't", "don't"] + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("The Two Cats!", ["2 cats"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("none", ["0", "0", "zero"] + ["1"] * 7) == pytest.approx(0.9)  # 'none' -> '0' too


def test_when_all_annotators_agree_the_comparison_is_exact_as_in_the_official_code():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is always cleaned
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0


def test_punctuation_rules():
    assert process_punctuation("1,000") == "1000"  # a comma between digits: every mark is deleted
    assert process_punctuation("red,blue") == "red blue"  # touching no space: replaced by a space
    assert process_punctuation("red, blue") == "red blue"  # touching a space: deleted
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("2.5") == "2.5" and process_punctuation("yes.") == "yes"
    assert process_punctuation("it's 5:30") == "it's 5:30"  # apostrophes and colons are no marks here
    assert normalize_answer("The   Dog") == "dog" and normalize_answer("an apple") == "apple"
    assert normalize_answer("ten") == "10" and normalize_answer("isnt") == "isn't"


def test_matches_the_official_loop_on_random_cases():
    rng = random.Random(0)
    pool = ["yes", "Yes.", "no", "2", "two", "Two", "a dog", "dog", "dont", "don't", "1,000", "1000", "red-ish"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(rng.choice([1, 3, 9, 10]))]
        prediction = rng.choice(pool)
        assert vqa_accuracy(prediction, answers) == pytest.approx(official_loop(prediction, answers))


def test_bootstrap_intervals_hold_the_mean_and_pair_the_drops():
    rng = np.random.default_rng(1)
    base = rng.random(200)
    scores = np.stack([base, base, base - 0.1])  # the same answers, then 0.1 lower on every question
    out = bootstrap(scores)
    assert (out["ci_low"] <= scores.mean(1)).all() and (scores.mean(1) <= out["ci_high"]).all()
    assert out["drop_ci_low"][1] == out["drop_ci_high"][1] == 0.0  # paired: identical rows never differ
    assert out["drop_ci_low"][2] == pytest.approx(0.1) and out["drop_ci_high"][2] == pytest.approx(0.1)
    assert np.array_equal(bootstrap(scores)["ci_low"], out["ci_low"])  # seeded
    assert np.isnan(bootstrap(np.zeros((2, 0)))["ci_low"]).all()
