"""Batch collation: the pretraining "safe" collate and the VQA training collate."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


def _fill_missing(batch: Sequence[Any]) -> tuple[list[Any] | None, int]:
    """Replace each ``None`` by a random valid sample; return (filled batch or None, number of Nones)."""
    valid = [sample for sample in batch if sample is not None]
    missing = len(batch) - len(valid)
    if not valid:
        return None, missing
    # One random.choice per None, in batch order, as the original does (keeps RNG parity).
    filled = [sample if sample is not None else random.choice(valid) for sample in batch]
    return filled, missing


def collate_safe(batch: Sequence[Any]) -> Any:
    """Default-collate, each ``None`` sample replaced by a random valid one; all failed: ``None``."""
    filled, _ = _fill_missing(batch)
    if filled is None:
        return None
    return default_collate(filled)


class SafeCollate:
    """:func:`collate_safe` returning ``(collated_or_None, num_failed_samples)`` (workers can't update counters)."""

    def __call__(self, batch: Sequence[Any]) -> tuple[Any, int]:
        filled, missing = _fill_missing(batch)
        if filled is None:
            return None, missing
        return default_collate(filled), missing

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def vqa_collate_fn(
    batch: Sequence[Any],
) -> tuple[torch.Tensor, list[str], list[str], torch.Tensor, list[int]] | None:
    """Collate VQA samples into ``(images, questions, answers, weights, n)``, ``n[b]`` answers of sample b."""
    images: list[torch.Tensor] = []
    questions: list[str] = []
    answers: list[str] = []
    weights: list[float] = []
    counts: list[int] = []
    for sample in batch:
        if sample is None:
            continue
        image, question, sample_answers, sample_weights = sample
        images.append(image)
        questions.append(question)
        answers.extend(sample_answers)
        weights.extend(sample_weights)
        counts.append(len(sample_answers))
    if not images:
        return None
    return torch.stack(images, dim=0), questions, answers, torch.tensor(weights, dtype=torch.float32), counts
