"""The original's LR schedulers (``cosine``, ``tanh``, ``step``, ``plateau``) over timm 1.x's."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from timm import scheduler as timm_scheduler

#: Keys written by the original base scheduler, in attribute-creation order.
BASE_STATE_KEYS: tuple[str, ...] = (
    "param_group_field", "_initial_param_group_field", "base_values", "metric", "noise_range_t", "noise_pct",
    "noise_type", "noise_std", "noise_seed",
)
_WARMUP_KEYS = ("warmup_t", "warmup_lr_init", "warmup_prefix", "t_in_epochs", "warmup_steps")
_CYCLE_KEYS = ("t_initial", "t_mul", "lr_min", "decay_rate", "cycle_limit", *_WARMUP_KEYS)


class OriginalNoiseMixin:
    """Noise seeded by ``noise_seed + t``; ``normal``: redrawn until ``|n| < noise_pct``, not scaled."""

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
    """``state_dict``/``load_state_dict`` in the original format (keys listed in ``state_keys``)."""

    state_keys: ClassVar[tuple[str, ...]] = BASE_STATE_KEYS

    def state_dict(self) -> dict[str, Any]:
        return {key: copy.copy(getattr(self, key)) for key in self.state_keys}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Update the scheduler from a state dict in the original or the timm 1.x format."""
        for key, value in state_dict.items():
            if key != "optimizer":
                setattr(self, key, copy.copy(value))


def cycle_position(t: float, t_initial: int, t_mul: float) -> tuple[int, float, float]:
    """``(cycle index, cycle length, time inside the cycle)`` for time ``t`` after warm-up."""
    if t_mul == 1:
        i = int(t // t_initial)
        return i, t_initial, t - t_initial * i
    i = math.floor(math.log(1 + t * (t_mul - 1) / t_initial, t_mul))
    start = t_initial * (t_mul**i - 1) / (t_mul - 1)
    return i, t_mul**i * t_initial, t - start


def _alias(name: str, doc: str) -> property:
    """The original's name for timm 1.x's attribute ``name``."""
    return property(lambda self: getattr(self, name), lambda self, value: setattr(self, name, value), doc=doc)


class CycleMixin(OriginalStateMixin):
    """Warm-up, then cycles; unlike timm 1.x, ``lr_min`` decays with ``decay_rate**cycle`` too."""

    cycle_mul: float
    cycle_decay: float
    t_mul = _alias("cycle_mul", "Cycle length multiplier (timm 1.x: ``cycle_mul``).")
    decay_rate = _alias("cycle_decay", "Per-cycle peak decay (timm 1.x: ``cycle_decay``).")

    def shape(self, t_curr: float, t_i: float) -> float:
        raise NotImplementedError

    def floor(self) -> float:
        return self.lr_min

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        if self.warmup_prefix:
            t = t - self.warmup_t
        i, t_i, t_curr = cycle_position(t, self.t_initial, self.cycle_mul)
        if self.cycle_limit > 0 and i >= self.cycle_limit:
            return [self.floor() for _ in self.base_values]
        gamma = self.cycle_decay**i
        lr_min = self.lr_min * gamma
        shape = self.shape(t_curr, t_i)
        return [lr_min + 0.5 * (base * gamma - lr_min) * shape for base in self.base_values]

    def get_cycle_length(self, cycles: int = 0) -> int:
        """Epochs covered by ``cycles`` cycles (default ``cycle_limit``, at least 1), warm-up excluded."""
        n = max(1, cycles or self.cycle_limit)
        if self.cycle_mul == 1.0:
            return self.t_initial * n
        return int(math.floor(self.t_initial * (self.cycle_mul**n - 1) / (self.cycle_mul - 1)))


class CosineLRScheduler(CycleMixin, timm_scheduler.CosineLRScheduler):
    """Cosine annealing with warm-up: ``shape = 1 + cos(pi * t_c / T)``; ``lr_min`` after the cycles."""

    state_keys = BASE_STATE_KEYS + _CYCLE_KEYS

    def shape(self, t_curr: float, t_i: float) -> float:
        return 1 + math.cos(math.pi * t_curr**self.k_decay / t_i**self.k_decay)


class TanhLRScheduler(CycleMixin, timm_scheduler.TanhLRScheduler):
    """Tanh decay ``1 - tanh(lb*(1 - r) + ub*r)``, ``r = t_c/T``, then ``lr_min*decay_rate**cycle_limit``."""

    state_keys = BASE_STATE_KEYS + ("lb", "ub") + _CYCLE_KEYS

    def shape(self, t_curr: float, t_i: float) -> float:
        r = t_curr / t_i
        return 1 - math.tanh(self.lb * (1.0 - r) + self.ub * r)

    def floor(self) -> float:
        return self.lr_min * (self.cycle_decay**self.cycle_limit)


class StepLRScheduler(OriginalStateMixin, timm_scheduler.StepLRScheduler):
    """``lr = base * decay_rate**(t // decay_t)`` after a linear warm-up, decay counted from ``t = 0``."""

    state_keys = BASE_STATE_KEYS + ("decay_t", "decay_rate", "warmup_t", "warmup_lr_init", "t_in_epochs",
                                    "warmup_steps")


class PlateauLRScheduler(OriginalNoiseMixin, timm_scheduler.PlateauLRScheduler):
    """timm's reduce-on-plateau with warm-up; its state dict (``best``, ``last_epoch``) is the original's."""
