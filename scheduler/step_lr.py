"""Step-decay LR schedule with linear warm-up (``sched: step``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.scheduler import StepLRScheduler as _TimmStepLRScheduler

from scheduler._compat import BASE_STATE_KEYS, OriginalStateMixin

__all__ = ["StepLRScheduler"]


class StepLRScheduler(OriginalStateMixin, _TimmStepLRScheduler):
    """``lr = base * decay_rate**(t // decay_t)`` after a linear warm-up of ``warmup_t`` steps.

    As in the original, the decay counts ``t`` from 0, not from the end of warm-up (timm 1.x's
    default ``warmup_prefix=True`` is switched off). The state dict uses the original format, which
    has no ``warmup_prefix`` entry.
    """

    state_keys = BASE_STATE_KEYS + (
        "decay_t",
        "decay_rate",
        "warmup_t",
        "warmup_lr_init",
        "t_in_epochs",
        "warmup_steps",
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_t: float,
        decay_rate: float = 1.0,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        t_in_epochs: bool = True,
        noise_range_t: Sequence[float] | float | None = None,
        noise_pct: float = 0.67,
        noise_std: float = 1.0,
        noise_seed: int = 42,
        initialize: bool = True,
    ) -> None:
        super().__init__(
            optimizer,
            decay_t=decay_t,
            decay_rate=decay_rate,
            warmup_t=warmup_t,
            warmup_lr_init=warmup_lr_init,
            warmup_prefix=False,
            t_in_epochs=t_in_epochs,
            noise_range_t=noise_range_t,
            noise_pct=noise_pct,
            noise_std=noise_std,
            noise_seed=noise_seed,
            initialize=initialize,
        )
