"""When the training scripts step the LR scheduler, as the original SIMLA scripts do."""

from __future__ import annotations

from timm.scheduler.scheduler import Scheduler

__all__ = ["STEP_SIZE", "epoch_end_step", "epoch_start_step", "warmup_step"]

#: Iterations per warm-up unit in epoch 0 (hard-coded in the original scripts).
STEP_SIZE = 100


def warmup_step(
    scheduler: Scheduler,
    epoch: int,
    iteration: int,
    warmup_epochs: int,
    step_size: int = STEP_SIZE,
) -> None:
    """Warm-up step; call right after ``optimizer.step()`` of ``iteration`` (0-based) of ``epoch``."""
    if epoch == 0 and iteration % step_size == 0 and iteration <= warmup_epochs * step_size:
        scheduler.step(iteration // step_size)


def epoch_start_step(scheduler: Scheduler, epoch: int, warmup_epochs: int) -> None:
    """Start-of-epoch step (Pretrain, VQA, Pretrain_NLVR): ``step(epoch + warmup_epochs)`` if ``epoch > 0``."""
    if epoch > 0:
        scheduler.step(epoch + warmup_epochs)


def epoch_end_step(scheduler: Scheduler, epoch: int, warmup_epochs: int) -> None:
    """End-of-epoch step (Retrieval, Grounding, NLVR, VE): ``step(epoch + warmup_epochs + 1)``."""
    scheduler.step(epoch + warmup_epochs + 1)
