"""Classification accuracy over an evaluation loader (NLVR2, SNLI-VE), as the original computes it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from engine.fit import Evaluation
from engine.metrics import MetricLogger
from models.precision import autocast


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, loader: Iterable,
                      predict: Callable[[Any], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                      amp: str = "none", print_freq: int = 50) -> dict[str, str]:
    """Mean accuracy ``{"acc": "%.4f"}`` of ``argmax(logits)`` over all processes, as the original."""
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


def accuracy_evaluation(model: torch.nn.Module, splits: Mapping[str, Iterable],
                        predict: Callable[[Any], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                        amp: str = "none") -> Callable[[int], Evaluation]:
    """Every split's accuracy (``<split>_acc``) for :func:`engine.fit.fit`; the first split picks the best."""

    def evaluate(epoch: int) -> Evaluation:
        stats = {split: evaluate_accuracy(model, loader, predict, device, amp) for split, loader in splits.items()}
        return Evaluation(log={f"{split}_{k}": v for split, values in stats.items() for k, v in values.items()},
                          track={f"{split}_acc": float(values["acc"]) for split, values in stats.items()},
                          score=float(next(iter(stats.values()))["acc"]))

    return evaluate


Unpack = Callable[[Any], tuple[torch.Tensor, Any, torch.Tensor]]  # batch -> (images, sentences, targets)


def _tokenize(tokenizer: Any, sentences: Any, device: torch.device) -> Any:
    return tokenizer(list(sentences), padding="longest", return_tensors="pt").to(device)


def classifier_step(model: torch.nn.Module, tokenizer: Any, config: Mapping[str, Any], device: torch.device,
                    epoch: int, unpack: Unpack) -> Callable[[Any, int, int], dict[str, torch.Tensor]]:
    """Training step of a distilled classifier (NLVR2, SNLI-VE); alpha ramps in epoch 0 with ``warm_up``."""
    alpha_max = float(config["alpha"])
    ramp = epoch == 0 and bool(config["warm_up"])

    def step(batch: Any, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        images, sentences, targets = unpack(batch)
        alpha = alpha_max * min(1.0, i / num_batches) if ramp else alpha_max
        return {"loss": model(images.to(device, non_blocking=True), _tokenize(tokenizer, sentences, device),
                              targets=targets.to(device, non_blocking=True), train=True, alpha=alpha)}

    return step


def classifier_predict(model: torch.nn.Module, tokenizer: Any, device: torch.device, unpack: Unpack
                       ) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """``predict(batch) -> (logits, targets)`` of a distilled classifier, for :func:`evaluate_accuracy`."""

    def predict(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, sentences, targets = unpack(batch)
        targets = targets.to(device, non_blocking=True)
        logits = model(images.to(device, non_blocking=True), _tokenize(tokenizer, sentences, device),
                       targets=targets, train=False)
        return logits, targets

    return predict
