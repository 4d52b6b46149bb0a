"""ROUGE-N and ROUGE-L F1 over token sequences (words or token ids), implemented here: no downloads.

Same definitions as the rouge_score package that TensorRT-LLM's summarize.py uses: n-gram overlap
counts clipped per n-gram (ROUGE-N) and the longest common subsequence (ROUGE-L), each as F1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _f1(overlap: int, n_candidate: int, n_reference: int) -> float:
    if n_candidate == 0 or n_reference == 0:
        return 1.0 if n_candidate == n_reference else 0.0
    p, r = overlap / n_candidate, overlap / n_reference
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def rouge_n(candidate: Sequence, reference: Sequence, n: int) -> float:
    c = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
    r = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
    return _f1(sum((c & r).values()), sum(c.values()), sum(r.values()))


def rouge_l(candidate: Sequence, reference: Sequence) -> float:
    prev = [0] * (len(reference) + 1)
    for a in candidate:
        cur = [0]
        for j, b in enumerate(reference):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return _f1(prev[-1], len(candidate), len(reference))
