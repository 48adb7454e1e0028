"""Evaluation metrics, written out from their definitions over a confusion matrix.

- accuracy: share of rows whose predicted class is the true one.
- macro-F1: the unweighted mean over classes of F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) (a class that never
  occurs and is never predicted scores 0, as in scikit-learn's ``zero_division=0``).
- Matthews correlation, multi-class (Gorodkin 2004): with C the confusion matrix, t_k the true counts,
  p_k the predicted counts, c = trace(C), s = total,
  MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), and 0 when a factor is 0.
- predicted_classes: how many classes the model predicts at all (1: it answers one class, usually the majority,
  whatever the input; `peftkit compare` flags it).
- language modelling: mean token cross-entropy and perplexity = exp(loss).
"""

from __future__ import annotations

import math

import torch


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    matrix = confusion(preds, labels, num_classes)
    total = matrix.sum()
    tp = matrix.diag()
    true_counts, pred_counts = matrix.sum(1), matrix.sum(0)
    denom = 2 * tp + (pred_counts - tp) + (true_counts - tp)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    cov_ytyp = tp.sum() * total - (pred_counts * true_counts).sum()
    cov_ypyp = total**2 - (pred_counts**2).sum()
    cov_ytyt = total**2 - (true_counts**2).sum()
    mcc = 0.0 if cov_ypyp == 0 or cov_ytyt == 0 else float(cov_ytyp / torch.sqrt(cov_ypyp * cov_ytyt))
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "mcc": mcc,
        "predicted_classes": float((pred_counts > 0).sum()),
    }


def lm_metrics(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# Which direction is better, for picking the best checkpoint and early stopping.
HIGHER_IS_BETTER = {
    "accuracy": True,
    "macro_f1": True,
    "mcc": True,
    "loss": False,
    "perplexity": False,
    "exact_match": True,  # --eval-generate (peftkit.train.generation_eval)
}
