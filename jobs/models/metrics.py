"""Classification metrics from per-image predictions: what `tlctl evaluate` reports.

Pure numpy over exact counts (no sampling, no padding): the same predictions give the same
numbers everywhere. tests/unit/models/test_eval_metrics.py checks them against scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15


def classification_metrics(
    labels: np.ndarray,
    predictions: np.ndarray,
    confidence: np.ndarray,
    topk_hit: np.ndarray,
    nll: np.ndarray,
    classes: list[str],
    *,
    k: int,
    bins: int = ECE_BINS,
) -> dict[str, Any]:
    """`labels`, `predictions`: class indices; `confidence`: the predicted class's
    probability; `topk_hit`: the label is among the top `k`; `nll`: -log p(label)."""
    n = int(labels.shape[0])
    c = len(classes)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
    present = support > 0  # classes of the model the data has no image of are not averaged
    weights = support / max(n, 1)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }

    def averages(values: np.ndarray) -> dict[str, float]:
        return {
            "macro": float(values[present].mean()) if present.any() else 0.0,
            "weighted": float((values * weights).sum()),
        }

    return {
        "n": n,
        "top1": float((labels == predictions).mean()) if n else 0.0,
        f"top{k}": float(topk_hit.mean()) if n else 0.0,
        "k": k,
        "nll": float(nll.mean()) if n else 0.0,
        "ece": expected_calibration_error(confidence, labels == predictions, bins),
        "ece_bins": bins,
        "per_class": per_class,
        "precision": averages(precision),
        "recall": averages(recall),
        "f1": averages(f1),
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Equal-width confidence bins (0, 1/b], …: count, mean confidence and accuracy."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": count,
                "confidence": float(confidence[mask].mean()) if count else 0.0,
                "accuracy": float(correct[mask].mean()) if count else 0.0,
            }
        )
    return out


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Σ_b |B_b|/n · |acc(B_b) − conf(B_b)| over equal-width bins."""
    n = max(int(confidence.shape[0]), 1)
    return float(
        sum(
            b["count"] / n * abs(b["accuracy"] - b["confidence"])
            for b in calibration_bins(confidence, correct, bins)
        )
    )
