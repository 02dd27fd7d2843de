"""Epoch-based LR schedulers with the original SIMLA semantics and checkpoint format."""

from scheduler.cosine_lr import CosineLRScheduler
from scheduler.plateau_lr import PlateauLRScheduler
from scheduler.scheduler_factory import SCHEDULER_NAMES, create_scheduler
from scheduler.step_lr import StepLRScheduler
from scheduler.stepping import STEP_SIZE, epoch_end_step, epoch_start_step, warmup_step
from scheduler.tanh_lr import TanhLRScheduler

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
