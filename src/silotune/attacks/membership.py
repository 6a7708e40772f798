"""Membership inference: was this record in some client's training data?

The adversary holds the shared adapter and the public base model. A record's score is its
response loss under the tuned model divided by its loss under the base model (the reference):
a record the tuning made unusually easy is called a member. Dividing by the base loss removes
what makes a text easy for any model (short, templated, common), which the raw loss would mistake
for membership; both are reported. Scores: ROC AUC (0.5 = chance) and the true-positive rate
at a 1 % false-positive rate (the low-error regime that matters for a real attacker).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from silotune.evaluation.evaluator import response_nll


def example_losses(
    model: nn.Module, examples: list[tuple[list[int], list[int]]], pad: int, batch_size: int = 8
) -> list[float]:
    """Mean next-token loss over each example's response tokens."""
    model.eval()
    return [total / max(n, 1) for total, n in response_nll(model, examples, pad, batch_size)]


def roc_summary(member_scores: list[float], other_scores: list[float]) -> dict[str, Any]:
    """AUC, TPR at 1 % FPR and a thinned ROC curve; a higher score means 'member'."""
    y = np.array([1] * len(member_scores) + [0] * len(other_scores))
    s = np.array(member_scores + other_scores, dtype=float)
    fpr, tpr, _ = roc_curve(y, s)
    at_1pct = float(tpr[fpr <= 0.01].max()) if (fpr <= 0.01).any() else 0.0
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 50)).astype(int))
    return {
        "auc": round(float(roc_auc_score(y, s)), 4),
        "tpr_at_1pct_fpr": round(at_1pct, 4),
        "roc": {"fpr": fpr[keep].round(4).tolist(), "tpr": tpr[keep].round(4).tolist()},
    }


def membership_attack(
    model: nn.Module,
    adapters_off: Callable[[], AbstractContextManager[Any]],
    members: list[tuple[list[int], list[int]]],
    non_members: list[tuple[list[int], list[int]]],
    pad: int,
) -> dict[str, Any]:
    """Loss and loss-ratio attacks; inside `adapters_off()` the model is the base model."""
    tuned_m = example_losses(model, members, pad)
    tuned_n = example_losses(model, non_members, pad)
    with adapters_off():
        base_m = example_losses(model, members, pad)
        base_n = example_losses(model, non_members, pad)
    ratio_m = [-t / max(b, 1e-6) for t, b in zip(tuned_m, base_m, strict=True)]
    ratio_n = [-t / max(b, 1e-6) for t, b in zip(tuned_n, base_n, strict=True)]
    return {
        "members": len(members),
        "non_members": len(non_members),
        "loss_ratio": roc_summary(ratio_m, ratio_n),
        "loss": roc_summary([-x for x in tuned_m], [-x for x in tuned_n]),
        "mean_loss": {
            "members": round(float(np.mean(tuned_m)), 4),
            "non_members": round(float(np.mean(tuned_n)), 4),
            "members_base": round(float(np.mean(base_m)), 4),
            "non_members_base": round(float(np.mean(base_n)), 4),
        },
    }
