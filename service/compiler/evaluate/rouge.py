"""ROUGE-N and ROUGE-L F1 over token sequences (words or token ids): Kiln's one ROUGE, no downloads.

The definitions of the rouge_score package that TensorRT-LLM's summarize.py uses: ROUGE-N counts
the n-grams the two sequences share, each clipped to its count in the other (multiset
intersection); ROUGE-L takes the length of their longest common subsequence. Either overlap m gives
precision m/|candidate| and recall m/|reference| (counted in n-grams for ROUGE-N), reported as F1 =
2PR/(P+R). A sequence with no n-grams (empty, or shorter than n) scores 0.0, as in rouge_score, even
against another such sequence.

Used by every report Kiln writes: the engine against the reference runtime, the quantized
checkpoint against the unquantized one (``quantization.report.compare``) and the worker's evaluate stage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def _f1(overlap: int, n_candidate: int, n_reference: int) -> float:
    """F1 = 2PR/(P+R) with P = m/c, R = m/r, which is 2m/(c+r) (one rounding)."""
    if overlap == 0:  # also every case with an empty side: nothing can overlap
        return 0.0
    return 2 * overlap / (n_candidate + n_reference)


def _ngrams(tokens: Sequence[Hashable], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(candidate: Sequence[Hashable], reference: Sequence[Hashable], n: int) -> float:
    """ROUGE-N F1 of ``candidate`` against ``reference``."""
    if n < 1:
        raise ValueError(f"ROUGE-N needs n >= 1, got {n}")
    c, r = _ngrams(candidate, n), _ngrams(reference, n)
    return _f1(sum((c & r).values()), sum(c.values()), sum(r.values()))


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence (one DP row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """ROUGE-L F1 (sentence level: one LCS over the whole sequences)."""
    return _f1(lcs_length(candidate, reference), len(candidate), len(reference))


def rouge_scores(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> dict[str, float]:
    """``{"rouge1", "rouge2", "rouge_l"}`` F1 of one candidate against its reference."""
    return {"rouge1": rouge_n(candidate, reference, 1), "rouge2": rouge_n(candidate, reference, 2),
            "rouge_l": rouge_l(candidate, reference)}


def mean_rouge(candidates: Sequence[Sequence[Hashable]], references: Sequence[Sequence[Hashable]]) -> dict[str, float]:
    """Per-pair ``rouge_scores`` averaged over the pairs (NaN for none)."""
    pairs = [rouge_scores(c, r) for c, r in zip(candidates, references, strict=True)]
    return {k: (sum(p[k] for p in pairs) / len(pairs) if pairs else float("nan"))
            for k in ("rouge1", "rouge2", "rouge_l")}


__all__ = ["lcs_length", "mean_rouge", "rouge_l", "rouge_n", "rouge_scores"]
