"""Evaluation metrics of the paper: AUC, log loss, RMSE and RIG (numpy only)."""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic; tied scores get their average rank."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for lo, hi in zip(starts, ends, strict=True):
        ranks[order[lo:hi]] = (lo + hi + 1) / 2.0
    return float((ranks[labels > 0.5].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def rmse(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(probs, np.float64) - np.asarray(labels, np.float64)) ** 2)))


def rig(labels: np.ndarray, probs: np.ndarray) -> float:
    """Relative information gain: 1 - LogLoss / H(p̄), where H(p̄) is the entropy of the evaluated split's
    positive rate (the log loss of always predicting that rate). 0 = no better than the base rate."""
    base_rate = float(np.clip(np.mean(labels), EPS, 1 - EPS))
    entropy = -(base_rate * np.log(base_rate) + (1 - base_rate) * np.log(1 - base_rate))
    return float(1.0 - log_loss(labels, probs) / entropy)


def all_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, probs),
        "log_loss": log_loss(labels, probs),
        "rmse": rmse(labels, probs),
        "rig": rig(labels, probs),
        "n": int(len(labels)),
    }
