"""Dev-set evaluation of a training run: accuracy, macro-F1 and MCC for classifiers; answer loss and perplexity
for causal LMs, plus exact match of generated answers under ``--eval-generate N``.

Every process computes the same numbers with the unwrapped model (no collective calls), so that decisions taken
from them (best checkpoint, early stopping) agree across a distributed run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftkit.train import data as D
from peftkit.train.generation_eval import generation_eval
from peftkit.train.metrics import classification_metrics, lm_metrics


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, tokens counted) over the positions whose label is not IGNORE.

    logits: (B, T, V), labels: (B, T); position t predicts label t + 1."""
    shifted = labels[:, 1:]
    loss = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum", ignore_index=D.IGNORE
    )
    return float(loss), int((shifted != D.IGNORE).sum())


@torch.no_grad()
def evaluate(trainer: Any) -> dict[str, float]:
    """``trainer``'s dev metrics; generated samples (``--eval-generate``) are kept in ``trainer.samples``."""
    pm, config = trainer.pm, trainer.config
    was_training = pm.training
    pm.eval()
    preds, golds, loss_sum, tokens = [], [], 0.0, 0
    batches = D.eval_batches(len(trainer.dev_set), config.eval_batch_size)
    for index in tqdm(batches, desc="eval", leave=False, disable=not trainer._bars()):
        batch = trainer._batch(trainer.dev_set, index)
        labels = batch.pop("labels")
        with trainer._autocast():
            logits = pm(**batch).logits.float()
        if trainer.task == "classification":
            preds.append(logits.argmax(-1).cpu())
            golds.append(labels.cpu())
        else:
            batch_loss, batch_tokens = lm_loss_sum(logits, labels)
            loss_sum, tokens = loss_sum + batch_loss, tokens + batch_tokens
    pm.train(was_training)
    if trainer.task == "classification":
        return classification_metrics(torch.cat(preds), torch.cat(golds), len(trainer.labels))
    metrics = lm_metrics(loss_sum, tokens)
    if config.eval_generate:
        with trainer._autocast():
            scores, samples = generation_eval(
                pm, trainer.tokenizer, trainer.dev_set, config.eval_generate, config.max_new_tokens
            )
        metrics.update(scores)
        trainer.samples[trainer.state["step"]] = samples
    return metrics
