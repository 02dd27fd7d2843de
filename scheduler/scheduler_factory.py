"""Scheduler factory driven by the ``schedular:`` (sic) section of a SIMLA config."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.scheduler.scheduler import Scheduler

from configs.schema import section_values
from scheduler.schedulers import CosineLRScheduler, PlateauLRScheduler, StepLRScheduler, TanhLRScheduler

__all__ = ["SCHEDULER_NAMES", "create_scheduler"]

SCHEDULER_NAMES: tuple[str, ...] = ("cosine", "tanh", "step", "plateau")
#: Keys each schedule needs besides ``sched`` and ``epochs``.
_CYCLE_REQUIRED = ("min_lr", "decay_rate", "warmup_lr", "warmup_epochs", "cooldown_epochs")
_REQUIRED = {
    "cosine": _CYCLE_REQUIRED,
    "tanh": _CYCLE_REQUIRED,
    "step": ("decay_epochs", "decay_rate", "warmup_lr", "warmup_epochs"),
    "plateau": ("decay_rate", "patience_epochs", "min_lr", "warmup_lr", "warmup_epochs"),
}


def _noise_range(lr_noise: Any, num_epochs: int) -> float | list[float] | None:
    """Convert ``lr_noise`` (fractions of the run) into the epoch range where noise is applied."""
    if lr_noise is None:
        return None
    if isinstance(lr_noise, Sequence) and not isinstance(lr_noise, str):
        limits = [float(n) * num_epochs for n in lr_noise]
        return limits[0] if len(limits) == 1 else limits
    return float(lr_noise) * num_epochs


def create_scheduler(
    sched_config: Mapping[str, Any] | Any, optimizer: torch.optim.Optimizer
) -> tuple[Scheduler, int]:
    """The LR scheduler of a ``schedular:`` config section (peak LR: the optimizer's), and its epochs."""
    sched = str(section_values(sched_config, "schedular")["sched"]).lower()
    if sched not in SCHEDULER_NAMES:
        raise ValueError(f"Unknown scheduler sched={sched!r}; valid choices: {', '.join(SCHEDULER_NAMES)}")
    cfg = section_values(sched_config, "schedular", _REQUIRED[sched])
    num_epochs = int(cfg["epochs"])
    common: dict[str, Any] = {
        "warmup_lr_init": cfg["warmup_lr"], "warmup_t": cfg["warmup_epochs"],
        "noise_range_t": _noise_range(cfg["lr_noise"], num_epochs), "noise_pct": cfg["lr_noise_pct"],
        "noise_std": cfg["lr_noise_std"], "noise_seed": cfg["seed"],
    }
    scheduler: Scheduler
    if sched in ("cosine", "tanh"):
        cycles = dict(common, t_initial=num_epochs, cycle_mul=cfg["lr_cycle_mul"], lr_min=cfg["min_lr"],
                      cycle_decay=cfg["decay_rate"], cycle_limit=cfg["lr_cycle_limit"], t_in_epochs=True)
        if sched == "cosine":
            scheduler = CosineLRScheduler(optimizer, warmup_prefix=True, k_decay=1.0, **cycles)
        else:
            scheduler = TanhLRScheduler(optimizer, lb=-6.0, ub=4.0, warmup_prefix=False, **cycles)
        num_epochs = scheduler.get_cycle_length() + int(cfg["cooldown_epochs"])
    elif sched == "step":
        scheduler = StepLRScheduler(optimizer, decay_t=cfg["decay_epochs"], decay_rate=cfg["decay_rate"],
                                    warmup_prefix=False, **common)
    else:
        mode = "min" if "loss" in str(cfg["eval_metric"]) else "max"
        with warnings.catch_warnings():  # timm deprecates this class
            warnings.simplefilter("ignore", FutureWarning)
            scheduler = PlateauLRScheduler(optimizer, decay_rate=cfg["decay_rate"], patience_t=cfg["patience_epochs"],
                                           lr_min=cfg["min_lr"], mode=mode, cooldown_t=0, **common)
    return scheduler, num_epochs
