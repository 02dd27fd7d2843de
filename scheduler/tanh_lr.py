"""Hyperbolic-tangent LR schedule with warm-up and restarts (``sched: tanh``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.scheduler import TanhLRScheduler as _TimmTanhLRScheduler

from scheduler._compat import (
    BASE_STATE_KEYS,
    CycleAliasMixin,
    OriginalStateMixin,
    cycle_position,
    total_cycle_length,
)

__all__ = ["TanhLRScheduler"]


class TanhLRScheduler(OriginalStateMixin, CycleAliasMixin, _TimmTanhLRScheduler):
    """Tanh decay built on :class:`timm.scheduler.TanhLRScheduler` with the original's semantics.

    Inside cycle ``i`` (``g = decay_rate**i``, relative position ``r`` in the cycle):
    ``lr = lr_min*g + 0.5*(base*g - lr_min*g)*(1 - tanh(lb*(1 - r) + ub*r))``; once ``cycle_limit``
    (> 0) cycles are done the LR stays at ``lr_min * decay_rate**cycle_limit``. Defaults follow the
    original (``lb=-6``, ``ub=4``, ``cycle_limit=0`` = unlimited); the state dict uses its format.
    """

    state_keys = BASE_STATE_KEYS + (
        "lb",
        "ub",
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
        lb: float = -6.0,
        ub: float = 4.0,
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
            lb=lb,
            ub=ub,
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
            initialize=initialize,
        )

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        if self.warmup_prefix:
            t = t - self.warmup_t
        i, t_i, t_curr = cycle_position(t, self.t_initial, self.cycle_mul)
        if self.cycle_limit > 0 and i >= self.cycle_limit:
            floor = self.lr_min * (self.cycle_decay**self.cycle_limit)
            return [floor for _ in self.base_values]
        gamma = self.cycle_decay**i
        lr_min = self.lr_min * gamma
        r = t_curr / t_i
        tanh_term = 1 - math.tanh(self.lb * (1.0 - r) + self.ub * r)
        return [lr_min + 0.5 * (base * gamma - lr_min) * tanh_term for base in self.base_values]

    def get_cycle_length(self, cycles: int = 0) -> int:
        """Number of epochs covered by ``cycles`` cycles (warm-up not included, as in the original)."""
        return total_cycle_length(self.t_initial, self.cycle_mul, self.cycle_limit, cycles)
