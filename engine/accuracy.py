"""Classification accuracy over an evaluation loader (NLVR2, SNLI-VE), as the original computes it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine.precision import autocast
from utils import MetricLogger


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, loader: Iterable,
                      predict: Callable[[Any], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                      amp: str = "none", print_freq: int = 50) -> dict[str, str]:
    """Mean accuracy of ``argmax(logits)`` over the loader, all processes together.

    ``predict(batch)`` returns ``(logits, targets)``. Each batch contributes its accuracy weighted by
    its size; the totals are summed over processes (distributed samplers pad the last ranks with
    repeated samples, which count like the others, as in the original). Returns ``{"acc": "%.4f"}``
    (a fraction).
    """
    model.eval()
    logger = MetricLogger(delimiter="  ")
    for batch in logger.log_every(loader, print_freq, "Evaluation:"):
        with autocast(device, amp):
            logits, targets = predict(batch)
        _, predicted = logits.max(1)
        accuracy = (targets == predicted).sum() / targets.size(0)
        logger.meters["acc"].update(accuracy.item(), n=targets.size(0))
    if "acc" not in logger.meters:
        raise ValueError("the evaluation loader yielded no batch (empty evaluation split)")
    logger.synchronize_between_processes()
    print("Averaged stats:", logger.global_avg())
    return {name: f"{meter.global_avg:.4f}" for name, meter in logger.meters.items()}
