"""The one ROUGE (service.compiler.evaluate.rouge), against values worked out by hand from the definition:
ROUGE-N F1 = 2PR/(P+R), P = clipped n-gram overlap / candidate n-grams, R = overlap / reference n-grams;
ROUGE-L the same with the longest common subsequence as the overlap and tokens as the counts."""

from __future__ import annotations

import math

import pytest

from service.compiler.evaluate.rouge import lcs_length, mean_rouge, rouge_l, rouge_n, rouge_scores


def f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_rouge1_counts_shared_unigrams_clipped_to_the_other_side():
    # a b c d vs a b e: shared {a, b} -> P = 2/4, R = 2/3
    assert rouge_n("a b c d".split(), "a b e".split(), 1) == pytest.approx(f1(2 / 4, 2 / 3))  # = 4/7
    assert rouge_n("a b c d".split(), "a b e".split(), 1) == pytest.approx(4 / 7)
    # a a a vs a b: "a" counts once (min(3, 1)) -> P = 1/3, R = 1/2
    assert rouge_n(["a", "a", "a"], ["a", "b"], 1) == pytest.approx(f1(1 / 3, 1 / 2))  # = 2/5
    # order does not matter for unigrams
    assert rouge_n([1, 2, 3, 4], [4, 3, 2, 1], 1) == 1.0
    # asymmetric lengths: P = 2/2, R = 2/6
    assert rouge_n([7, 8], [1, 7, 2, 8, 3, 4], 1) == pytest.approx(f1(1.0, 1 / 3)) == pytest.approx(0.5)


def test_rouge2_counts_shared_bigrams():
    # bigrams (a b)(b c) vs (a b)(b d): one shared -> P = R = 1/2
    assert rouge_n("a b c".split(), "a b d".split(), 2) == pytest.approx(0.5)
    # the cat sat on the mat / the cat lay on the mat: (the cat)(on the)(the mat) shared of 5 each
    cand, ref = "the cat sat on the mat".split(), "the cat lay on the mat".split()
    assert rouge_n(cand, ref, 2) == pytest.approx(3 / 5)
    assert rouge_n(cand, ref, 1) == pytest.approx(5 / 6)
    # reversed: no bigram in common
    assert rouge_n([1, 2, 3, 4], [4, 3, 2, 1], 2) == 0.0


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    assert lcs_length("abcde", "aceb") == 3  # a c e
    assert rouge_l(list("abcde"), list("aceb")) == pytest.approx(f1(3 / 5, 3 / 4))  # = 2/3
    assert lcs_length([1, 2, 3, 4], [4, 3, 2, 1]) == 1
    assert rouge_l([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(0.25)
    cand, ref = "the cat sat on the mat".split(), "the cat lay on the mat".split()
    assert lcs_length(cand, ref) == 5 and rouge_l(cand, ref) == pytest.approx(5 / 6)
    # a subsequence, not a substring: gaps are allowed
    assert lcs_length([1, 9, 2, 9, 3], [1, 2, 3]) == 3 and rouge_l([1, 9, 2, 9, 3], [1, 2, 3]) == pytest.approx(0.75)


def test_identical_sequences_score_one():
    seq = [5, 1, 5, 2, 7]
    assert rouge_scores(seq, seq) == {"rouge1": 1.0, "rouge2": 1.0, "rouge_l": 1.0}
    assert rouge_scores(list(seq), tuple(seq)) == {"rouge1": 1.0, "rouge2": 1.0, "rouge_l": 1.0}


def test_sequences_without_ngrams_score_zero_as_in_rouge_score():
    """rouge_score (summarize.py's package) gives F1 0 when either side has no n-grams, even both."""
    assert rouge_n([], [], 1) == 0.0 and rouge_l([], []) == 0.0
    assert rouge_n([1, 2], [], 1) == 0.0 and rouge_n([], [1, 2], 1) == 0.0
    assert rouge_l([1, 2], []) == 0.0 and rouge_l([], [1, 2]) == 0.0
    # one token each: identical unigrams, but neither side has a bigram
    assert rouge_scores([3], [3]) == {"rouge1": 1.0, "rouge2": 0.0, "rouge_l": 1.0}
    assert rouge_scores([1, 2], [3, 4]) == {"rouge1": 0.0, "rouge2": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError):
        rouge_n([1], [1], 0)


def test_mean_rouge_averages_the_pairs():
    m = mean_rouge([[1, 2, 3, 4], [1, 2]], [[4, 3, 2, 1], [1, 2]])
    assert m["rouge1"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["rouge2"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["rouge_l"] == pytest.approx((0.25 + 1.0) / 2)
    assert all(math.isnan(v) for v in mean_rouge([], []).values())
    with pytest.raises(ValueError):  # the pairs must line up
        mean_rouge([[1]], [[1], [2]])
