"""VQAv2 accuracy, as the official evaluation computes it (GT-Vision-Lab/VQA ``vqaEval.py``), written here because no
installed library offers it (the official code is a Python 2 script over its own annotation classes).

Per question, with the annotators' answers (10 in VQAv2) and one predicted answer:
1. newlines and tabs become spaces, both sides are stripped;
2. only when the annotators disagree (more than one distinct answer), every answer and the prediction are
   normalised: punctuation (``processPunctuation``) then digits and articles (``processDigitArticle``): lower case,
   number words to digits ('two' -> '2', also 'none' -> '0'), articles dropped, contractions restored ('dont' ->
   "don't"). When all annotators agree the comparison is exact, as in the official code;
3. accuracy = the mean over the n leave-one-out subsets of the annotators of min(#matches in the subset / 3, 1)
   (10 subsets of 9 for VQAv2); with one annotator the only subset is empty and the accuracy is 0, as there.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# The official pattern: its "(?!<=\d)" is a look-ahead (not the look-behind it reads as), so every period not
# followed by a digit goes ("yes." -> "yes", "2.5" stays). The official call passes re.UNICODE (32) where the count
# goes, so at most 32 periods are removed; kept, to score exactly alike.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = 32
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
SUBSET_MATCHES = 3  # an answer given by this many of the other annotators counts fully


def clean(text: str) -> str:
    """Newlines and tabs to spaces, stripped: what the official code does to every answer first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each punctuation mark is deleted where it touches a space (or where the
    answer has a comma between digits, '1,000'), else replaced by a space; then periods not before a digit go."""
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, articles dropped, contractions
    restored, words joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


@functools.lru_cache(maxsize=65536)
def normalize_answer(text: str) -> str:
    """An answer as the official evaluation compares it when the annotators disagree."""
    return process_digit_article(process_punctuation(text))


def prepared_answers(answers: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """The annotators' answers as compared, and whether predictions are normalised too (the annotators disagree)."""
    cleaned = tuple(clean(a) for a in answers)
    disagree = len(set(cleaned)) > 1
    return (tuple(normalize_answer(a) for a in cleaned) if disagree else cleaned), disagree


def leave_one_out_accuracy(matches: int, annotators: int) -> float:
    """Mean over the ``annotators`` leave-one-out subsets of min(matches in the subset / 3, 1), when ``matches``
    annotators gave the predicted answer: a subset without a matching annotator holds ``matches`` of them, one
    without a non-matching annotator ``matches - 1``."""
    if annotators <= 0:
        raise ValueError("VQA accuracy needs at least one annotator's answer.")
    left_out_match = matches * min(1.0, (matches - 1) / SUBSET_MATCHES) if matches else 0.0
    left_out_other = (annotators - matches) * min(1.0, matches / SUBSET_MATCHES)
    return (left_out_match + left_out_other) / annotators


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one predicted answer against the annotators' answers (0 to 1)."""
    return ScoredQuestion(answers).score(prediction)


class ScoredQuestion:
    """One question's annotators' answers, prepared once, scoring many predictions (every variant's)."""

    __slots__ = ("compared", "disagree")

    def __init__(self, answers: Sequence[str]) -> None:
        self.compared, self.disagree = prepared_answers(answers)

    def score(self, prediction: str) -> float:
        predicted = normalize_answer(clean(prediction)) if self.disagree else clean(prediction)
        return leave_one_out_accuracy(sum(a == predicted for a in self.compared), len(self.compared))
