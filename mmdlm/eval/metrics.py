"""The metric arithmetic of `mmdlm evaluate`: caption normalisation, precision / recall / F1 from counts, CIDEr-D,
key-wise means and rates. Pure functions of numbers and strings (CIDEr-D loads pycocoevalcap when called).
"""

from __future__ import annotations

from collections.abc import Sequence


def normalize(text: str) -> str:
    """Lower case, single spaces, no final period: how captions are compared for exact match."""
    return " ".join(text.lower().split()).rstrip(" .")


def prf(tp: float, n_pred: float, n_true: float) -> dict[str, float]:
    """Precision, recall, F1 from counts (0 where a denominator is 0)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def mean_dicts(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of numeric dicts (all with the same keys)."""
    if not rows:
        return {}
    return {k: float(sum(float(r[k]) for r in rows) / len(rows)) for k in rows[0]}


def rate(flags: Sequence[bool]) -> float:
    """The share of true flags (0 for none)."""
    return sum(flags) / max(len(flags), 1)


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (Vedantam et al. 2015) of the candidates against their references, as the COCO caption
    evaluation computes it (pycocoevalcap), on `normalize`d text."""
    from pycocoevalcap.cider.cider import Cider

    res = {i: [normalize(c) or "."] for i, c in enumerate(candidates)}  # an empty caption scores 0, not a crash
    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)
