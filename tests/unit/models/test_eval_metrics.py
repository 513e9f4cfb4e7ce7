"""evaluate's metrics (jobs.models.metrics) against scikit-learn on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from jobs.models.metrics import calibration_bins, classification_metrics, expected_calibration_error

CLASSES = ["a", "b", "c", "d", "e", "f"]


def _predictions(seed: int, n: int = 500):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, len(CLASSES)))
    labels = rng.integers(0, len(CLASSES) - 1, n)  # class f never occurs in the data
    logits[np.arange(n), labels] += rng.normal(1.0, 1.0, n)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn(seed: int) -> None:
    labels, probs = _predictions(seed)
    pred = probs.argmax(1)
    top3 = np.argsort(-probs, axis=1)[:, :3]
    m = classification_metrics(
        labels,
        pred,
        probs.max(1),
        (top3 == labels[:, None]).any(1),
        -np.log(probs[np.arange(len(labels)), labels]),
        CLASSES,
        k=3,
    )
    everything = list(range(len(CLASSES)))
    assert m["n"] == len(labels)
    assert m["top1"] == pytest.approx(sk.accuracy_score(labels, pred))
    assert m["top3"] == pytest.approx(
        sk.top_k_accuracy_score(labels, probs, k=3, labels=everything)
    )
    assert m["nll"] == pytest.approx(sk.log_loss(labels, probs, labels=everything))
    assert m["confusion"] == sk.confusion_matrix(labels, pred, labels=everything).tolist()
    p, r, f, s = sk.precision_recall_fscore_support(
        labels, pred, labels=everything, zero_division=0
    )
    for i, name in enumerate(CLASSES):
        row = m["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    present = list(range(len(CLASSES) - 1))  # macro over the classes the data has
    for key, fn in (("precision", sk.precision_score), ("recall", sk.recall_score)):
        assert m[key]["macro"] == pytest.approx(
            fn(labels, pred, labels=present, average="macro", zero_division=0)
        )
        assert m[key]["weighted"] == pytest.approx(
            fn(labels, pred, labels=everything, average="weighted", zero_division=0)
        )
    assert m["f1"]["weighted"] == pytest.approx(
        sk.f1_score(labels, pred, labels=everything, average="weighted", zero_division=0)
    )


def test_expected_calibration_error_by_hand() -> None:
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.05])
    correct = np.array([True, False, True, True, False])
    # bins of width 0.5: (0, .5] holds 0.05 (acc 0), (.5, 1] holds the rest (acc 3/4, conf .75)
    assert expected_calibration_error(confidence, correct, bins=2) == pytest.approx(
        1 / 5 * abs(0 - 0.05) + 4 / 5 * abs(0.75 - 0.75)
    )
    bins = calibration_bins(confidence, correct, bins=2)
    assert [b["count"] for b in bins] == [1, 4]
    perfect = expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True]))
    assert perfect == 0.0


def test_the_data_fingerprint_depends_on_relative_paths_and_bytes_only() -> None:
    from jobs.models.evaluate import fingerprint

    crcs = np.asarray([11, 22])
    local = fingerprint(
        "/data/test", np.asarray(["/data/test/a/1.png", "/data/test/b/2.png"]), crcs
    )
    remote = fingerprint(
        "s3://bucket/test/", np.asarray(["bucket/test/b/2.png", "bucket/test/a/1.png"]), crcs[::-1]
    )
    assert local == remote  # the same tree, wherever it lives and in any order
    changed = fingerprint(
        "/data/test", np.asarray(["/data/test/a/1.png", "/data/test/b/2.png"]), np.asarray([11, 23])
    )
    renamed = fingerprint(
        "/data/test", np.asarray(["/data/test/a/1.png", "/data/test/c/2.png"]), crcs
    )
    assert len({local, changed, renamed}) == 3
