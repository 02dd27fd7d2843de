"""Reduce-on-plateau LR schedule with warm-up (``sched: plateau``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from timm.scheduler import PlateauLRScheduler as _TimmPlateauLRScheduler

from scheduler._compat import OriginalNoiseMixin

__all__ = ["PlateauLRScheduler"]


class PlateauLRScheduler(OriginalNoiseMixin, _TimmPlateauLRScheduler):
    """Thin wrapper of :class:`timm.scheduler.PlateauLRScheduler` (a ``ReduceLROnPlateau`` with warm-up).

    Its state dict is ``{"best", "last_epoch"}`` in both the original and timm 1.x, so no conversion is
    needed. ``step(epoch, metric)`` only reduces the LR when a metric is given. timm's deprecation
    warning for this class is silenced.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_rate: float = 0.1,
        patience_t: int = 10,
        threshold: float = 1e-4,
        cooldown_t: int = 0,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        lr_min: float = 0.0,
        mode: str = "max",
        noise_range_t: Sequence[float] | float | None = None,
        noise_type: str = "normal",
        noise_pct: float = 0.67,
        noise_std: float = 1.0,
        noise_seed: int | None = None,
        initialize: bool = True,
    ) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(
                optimizer,
                decay_rate=decay_rate,
                patience_t=patience_t,
                threshold=threshold,
                cooldown_t=cooldown_t,
                warmup_t=warmup_t,
                warmup_lr_init=warmup_lr_init,
                lr_min=lr_min,
                mode=mode,
                noise_range_t=noise_range_t,
                noise_type=noise_type,
                noise_pct=noise_pct,
                noise_std=noise_std,
                noise_seed=noise_seed,
                initialize=initialize,
            )
