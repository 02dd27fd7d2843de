"""Epoch-based LR schedulers with the original SIMLA semantics and checkpoint format."""

from scheduler.scheduler_factory import SCHEDULER_NAMES, create_scheduler
from scheduler.schedulers import CosineLRScheduler, PlateauLRScheduler, StepLRScheduler, TanhLRScheduler
from scheduler.stepping import STEP_SIZE, epoch_end_step, epoch_start_step, warmup_step

__all__ = [
    "SCHEDULER_NAMES",
    "STEP_SIZE",
    "CosineLRScheduler",
    "PlateauLRScheduler",
    "StepLRScheduler",
    "TanhLRScheduler",
    "create_scheduler",
    "epoch_end_step",
    "epoch_start_step",
    "warmup_step",
]
