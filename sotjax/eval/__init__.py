"""Evaluation with known contamination labels: metrics (:mod:`sotjax.eval.metrics`) and
baselines (:mod:`sotjax.eval.baselines`). Importing this package does not import JAX."""

from sotjax.eval.metrics import (
    auprc_harmful,
    auroc,
    average_precision,
    benign_recall,
    evaluate_scores,
    harmful_retention,
    harmful_weight_mass,
    mean_std,
    resolve_k,
    topk_inclusion,
)

__all__ = [
    "auprc_harmful",
    "auroc",
    "average_precision",
    "benign_recall",
    "evaluate_scores",
    "harmful_retention",
    "harmful_weight_mass",
    "mean_std",
    "resolve_k",
    "topk_inclusion",
]
