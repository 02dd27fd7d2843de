"""Cosine LR schedule with linear warm-up and restarts, as used by every SIMLA config."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.scheduler import CosineLRScheduler as _TimmCosineLRScheduler

from scheduler._compat import (
    BASE_STATE_KEYS,
    CycleAliasMixin,
    OriginalStateMixin,
    cycle_position,
    total_cycle_length,
)

__all__ = ["CosineLRScheduler"]


class CosineLRScheduler(OriginalStateMixin, CycleAliasMixin, _TimmCosineLRScheduler):
    """Cosine annealing with warm-up, built on :class:`timm.scheduler.CosineLRScheduler`.

    Time ``t`` is whatever integer the caller passes to ``step(t)``:

    * ``t < warmup_t``: ``lr = warmup_lr_init + t * (base - warmup_lr_init) / warmup_t``;
    * otherwise (``t`` shifted by ``warmup_t`` when ``warmup_prefix``) cycle ``i`` at offset ``t_c`` of
      a cycle of length ``T`` gives, with ``g = decay_rate**i``,
      ``lr = lr_min*g + 0.5*(base*g - lr_min*g)*(1 + cos(pi*t_c/T))`` while ``i < cycle_limit``
      (``cycle_limit == 0`` means unlimited), and ``lr_min`` afterwards.

    This is the original SIMLA formula; timm 1.x does not scale ``lr_min`` by ``g`` (identical for
    ``decay_rate == 1`` or a single cycle, i.e. every shipped config). Constructor arguments use the
    original names and defaults. ``state_dict()`` uses the original checkpoint format.
    """

    state_keys = BASE_STATE_KEYS + (
        "t_initial",
        "t_mul",
        "lr_min",
        "decay_rate",
        "cycle_limit",
        "warmup_t",
        "warmup_lr_init",
        "warmup_prefix",
        "t_in_epochs",
        "warmup_steps",
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        t_initial: int,
        t_mul: float = 1.0,
        lr_min: float = 0.0,
        decay_rate: float = 1.0,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        warmup_prefix: bool = False,
        cycle_limit: int = 0,
        t_in_epochs: bool = True,
        noise_range_t: Sequence[float] | float | None = None,
        noise_pct: float = 0.67,
        noise_std: float = 1.0,
        noise_seed: int = 42,
        initialize: bool = True,
    ) -> None:
        super().__init__(
            optimizer,
            t_initial=t_initial,
            lr_min=lr_min,
            cycle_mul=t_mul,
            cycle_decay=decay_rate,
            cycle_limit=cycle_limit,
            warmup_t=warmup_t,
            warmup_lr_init=warmup_lr_init,
            warmup_prefix=warmup_prefix,
            t_in_epochs=t_in_epochs,
            noise_range_t=noise_range_t,
            noise_pct=noise_pct,
            noise_std=noise_std,
            noise_seed=noise_seed,
            k_decay=1.0,
            initialize=initialize,
        )

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        if self.warmup_prefix:
            t = t - self.warmup_t
        i, t_i, t_curr = cycle_position(t, self.t_initial, self.cycle_mul)
        if self.cycle_limit > 0 and i >= self.cycle_limit:
            return [self.lr_min for _ in self.base_values]
        gamma = self.cycle_decay**i
        lr_min = self.lr_min * gamma
        # k_decay is a timm 1.x extension (always 1 here unless loaded from a timm 1.x state dict).
        k = self.k_decay
        cos_term = 1 + math.cos(math.pi * t_curr**k / t_i**k)
        return [lr_min + 0.5 * (base * gamma - lr_min) * cos_term for base in self.base_values]

    def get_cycle_length(self, cycles: int = 0) -> int:
        """Number of epochs covered by ``cycles`` cycles (warm-up not included, as in the original)."""
        return total_cycle_length(self.t_initial, self.cycle_mul, self.cycle_limit, cycles)
