"""Behaviour shared by the epoch-based LR schedulers.

The schedulers subclass timm 1.x's classes but keep two properties of the original SIMLA code:

* ``state_dict()`` returns exactly the keys, in exactly the order, that the original schedulers wrote
  into checkpoints (the original stored every instance attribute except the optimizer), so
  checkpoints move freely between this code and the original;
* ``load_state_dict()`` accepts that format as well as the one timm 1.x writes (which spells some
  fields differently, e.g. ``cycle_mul`` for ``t_mul`` and ``cycle_decay`` for ``decay_rate``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

#: Keys written by the original base scheduler, in attribute-creation order.
BASE_STATE_KEYS: tuple[str, ...] = (
    "param_group_field",
    "_initial_param_group_field",
    "base_values",
    "metric",
    "noise_range_t",
    "noise_pct",
    "noise_type",
    "noise_std",
    "noise_seed",
)


class OriginalNoiseMixin:
    """LR noise exactly as the original draws it.

    The original samples one value per step from a generator seeded with ``noise_seed + t``; for
    ``noise_type == "normal"`` it redraws until ``|n| < noise_pct`` and does *not* scale by
    ``noise_std`` (timm 1.x does). No shipped config enables noise.
    """

    noise_seed: int
    noise_type: str
    noise_pct: float

    def _calculate_noise(self, t: int) -> float:
        gen = torch.Generator()
        gen.manual_seed(self.noise_seed + t)
        if self.noise_type == "normal":
            while True:
                value = torch.randn(1, generator=gen).item()
                if abs(value) < self.noise_pct:
                    return value
        return (torch.rand(1, generator=gen).item() * 2.0 - 1.0) * self.noise_pct


class OriginalStateMixin(OriginalNoiseMixin):
    """``state_dict``/``load_state_dict`` in the original checkpoint format.

    Subclasses list their keys in ``state_keys``. Keys that timm 1.x names differently are exposed
    as properties under the original name, so loading is a plain attribute update that works for
    both spellings.
    """

    state_keys: ClassVar[tuple[str, ...]] = BASE_STATE_KEYS

    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler state with the original key names and order."""
        return {key: copy.copy(getattr(self, key)) for key in self.state_keys}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Update the scheduler from a state dict in the original or the timm 1.x format."""
        for key, value in state_dict.items():
            if key == "optimizer":
                continue
            setattr(self, key, copy.copy(value))


class CycleAliasMixin:
    """Original attribute names for timm 1.x's cycle fields (``t_mul``, ``decay_rate``)."""

    cycle_mul: float
    cycle_decay: float

    @property
    def t_mul(self) -> float:
        """Cycle length multiplier (timm 1.x: ``cycle_mul``)."""
        return self.cycle_mul

    @t_mul.setter
    def t_mul(self, value: float) -> None:
        self.cycle_mul = value

    @property
    def decay_rate(self) -> float:
        """Per-cycle peak decay (timm 1.x: ``cycle_decay``)."""
        return self.cycle_decay

    @decay_rate.setter
    def decay_rate(self, value: float) -> None:
        self.cycle_decay = value


def cycle_position(t: float, t_initial: int, t_mul: float) -> tuple[int, float, float]:
    """Return ``(cycle index, cycle length, time inside the cycle)`` for time ``t`` after warm-up.

    Cycle ``i`` lasts ``t_initial * t_mul**i`` steps.
    """
    if t_mul == 1:
        i = int(t // t_initial)
        return i, t_initial, t - t_initial * i
    # Cycles 0..i-1 together last t_initial * (t_mul**i - 1) / (t_mul - 1) steps.
    i = math.floor(math.log(1 + t * (t_mul - 1) / t_initial, t_mul))
    start = t_initial * (t_mul**i - 1) / (t_mul - 1)
    return i, t_mul**i * t_initial, t - start


def total_cycle_length(t_initial: int, t_mul: float, cycle_limit: int, cycles: int = 0) -> int:
    """Length of the first ``cycles`` (default: ``cycle_limit``, at least 1) cycles, warm-up excluded."""
    n = max(1, cycles or cycle_limit)
    if t_mul == 1.0:
        return t_initial * n
    return int(math.floor(t_initial * (t_mul**n - 1) / (t_mul - 1)))
