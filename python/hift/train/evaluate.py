"""Held-out loss (and accuracy, for classification) of the model as it stands: in eval mode,
without gradients, and drawing no random numbers, so that evaluating in the middle of a run
changes nothing the run does next."""
from __future__ import annotations

import torch

from hift.batches import to_device
from hift.train.examples import IGNORE


def evaluate(model, loader, device: torch.device, classification: bool) -> dict[str, float]:
    """{"eval_loss": mean over the held-out tokens (examples, for classification), and
    "eval_accuracy" for classification}."""
    was_training = model.training
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in loader:
                batch = to_device(batch, device)
                output = model(**batch)
                labels = batch["labels"]
                if classification:
                    n = labels.numel()
                    correct += (output.logits.argmax(-1) == labels).sum()
                else:  # the loss is the mean over the tokens a causal LM predicts (labels shifted by one)
                    n = (labels[:, 1:] != IGNORE).sum()
                loss_sum += output.loss.double() * n
                count += n
    finally:
        model.train(was_training)
    metrics = {"eval_loss": (loss_sum / count).item()}
    if classification:
        metrics["eval_accuracy"] = (correct / count).item()
    return metrics
