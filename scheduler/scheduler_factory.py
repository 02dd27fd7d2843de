"""Scheduler factory driven by the ``schedular:`` (sic) section of a SIMLA config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.scheduler.scheduler import Scheduler

from scheduler.cosine_lr import CosineLRScheduler
from scheduler.plateau_lr import PlateauLRScheduler
from scheduler.step_lr import StepLRScheduler
from scheduler.tanh_lr import TanhLRScheduler

__all__ = ["SCHEDULER_NAMES", "create_scheduler"]

#: Values of ``sched`` accepted by :func:`create_scheduler`.
SCHEDULER_NAMES: tuple[str, ...] = ("cosine", "tanh", "step", "plateau")

_MISSING = object()


def _cfg_get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """Read ``key`` from a mapping or an attribute-style config; ``None`` counts as absent."""
    if isinstance(cfg, Mapping):
        value = cfg.get(key, None)
    else:
        value = getattr(cfg, key, None)
    if value is None:
        if default is _MISSING:
            raise KeyError(f"schedular config is missing the required key '{key}'")
        return default
    return value


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
    """Build the LR scheduler described by a ``schedular:`` config section.

    Keys: ``sched`` (``cosine``/``tanh``/``step``/``plateau``), ``epochs``, ``min_lr``, ``decay_rate``,
    ``warmup_lr``, ``warmup_epochs``, ``cooldown_epochs`` (cosine/tanh); ``decay_epochs`` (step);
    ``patience_epochs`` and optional ``eval_metric`` (plateau); optional ``lr_noise``,
    ``lr_noise_pct`` (0.67), ``lr_noise_std`` (1.0), ``seed`` (42), ``lr_cycle_mul`` (1.0),
    ``lr_cycle_limit`` (1). The section's ``lr`` key is ignored, as in the original: the peak LR is
    the optimizer's LR.

    Returns ``(scheduler, num_epochs)``: for cosine/tanh ``num_epochs`` is the length of the
    scheduled cycles plus ``cooldown_epochs`` (``epochs + cooldown_epochs`` for the shipped
    single-cycle configs), for step/plateau it is ``epochs``. The training scripts ignore it.

    The cosine schedule is the original's: ``t_initial=epochs``, ``warmup_t=warmup_epochs``,
    ``warmup_prefix=True``, ``t_in_epochs=True``. Right after construction every param group's LR is
    ``warmup_lr`` (when ``warmup_epochs > 0``) and carries ``initial_lr`` = the optimizer LR.
    """
    sched = str(_cfg_get(sched_config, "sched")).lower()
    num_epochs = int(_cfg_get(sched_config, "epochs"))
    noise_args: dict[str, Any] = {
        "noise_range_t": _noise_range(_cfg_get(sched_config, "lr_noise", None), num_epochs),
        "noise_pct": _cfg_get(sched_config, "lr_noise_pct", 0.67),
        "noise_std": _cfg_get(sched_config, "lr_noise_std", 1.0),
        "noise_seed": _cfg_get(sched_config, "seed", 42),
    }

    scheduler: Scheduler
    if sched in ("cosine", "tanh"):
        common: dict[str, Any] = {
            "t_initial": num_epochs,
            "t_mul": _cfg_get(sched_config, "lr_cycle_mul", 1.0),
            "lr_min": _cfg_get(sched_config, "min_lr"),
            "decay_rate": _cfg_get(sched_config, "decay_rate"),
            "warmup_lr_init": _cfg_get(sched_config, "warmup_lr"),
            "warmup_t": _cfg_get(sched_config, "warmup_epochs"),
            "cycle_limit": _cfg_get(sched_config, "lr_cycle_limit", 1),
            "t_in_epochs": True,
            **noise_args,
        }
        if sched == "cosine":
            scheduler = CosineLRScheduler(optimizer, warmup_prefix=True, **common)
        else:
            scheduler = TanhLRScheduler(optimizer, lb=-6.0, ub=4.0, warmup_prefix=False, **common)
        num_epochs = scheduler.get_cycle_length() + int(_cfg_get(sched_config, "cooldown_epochs"))
    elif sched == "step":
        scheduler = StepLRScheduler(
            optimizer,
            decay_t=_cfg_get(sched_config, "decay_epochs"),
            decay_rate=_cfg_get(sched_config, "decay_rate"),
            warmup_lr_init=_cfg_get(sched_config, "warmup_lr"),
            warmup_t=_cfg_get(sched_config, "warmup_epochs"),
            **noise_args,
        )
    elif sched == "plateau":
        mode = "min" if "loss" in str(_cfg_get(sched_config, "eval_metric", "")) else "max"
        scheduler = PlateauLRScheduler(
            optimizer,
            decay_rate=_cfg_get(sched_config, "decay_rate"),
            patience_t=_cfg_get(sched_config, "patience_epochs"),
            lr_min=_cfg_get(sched_config, "min_lr"),
            mode=mode,
            warmup_lr_init=_cfg_get(sched_config, "warmup_lr"),
            warmup_t=_cfg_get(sched_config, "warmup_epochs"),
            cooldown_t=0,
            **noise_args,
        )
    else:
        raise ValueError(f"Unknown scheduler sched={sched!r}; valid choices: {', '.join(SCHEDULER_NAMES)}")
    return scheduler, num_epochs
