"""The loss of a model on tokenized examples: the one scorer behind `train`'s evaluation
(:meth:`qconvert.training.loop._Run.evaluate`) and `qconvert eval` (:func:`qconvert.run.evaluate.score`), so
the two report the same number for the same model and records.

The rule: next-token cross-entropy (logits in float32) summed over the positions whose label is not
:data:`~qconvert.training.data.IGNORE` (the loss mask train learns from: completions and assistant turns,
or every token with ``train_on_inputs``), divided by the number of such positions over all examples:
a token-weighted mean, not a mean of per-batch or per-example means, so the batch size does not
change it. The model is scored in eval mode (no dropout) and given back in the mode it was in.
Training steps use :func:`label_loss_sum` too (loop._step), with the same mask.
"""

from __future__ import annotations

import torch

from .data import IGNORE, collate


def label_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not IGNORE (-100)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def loss_sums(model, examples: list, pad_id: int, batch_size: int, device) -> tuple[float, int]:
    """(summed loss, labelled tokens) of ``model`` over ``examples``, batched ``batch_size`` at a time."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                b = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                total += label_loss_sum(logits, b["labels"]).item()
                count += int((b["labels"][:, 1:] != IGNORE).sum())
    finally:
        model.train(was_training)
    return total, count
