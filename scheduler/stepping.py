"""When the training scripts step the LR scheduler.

The original SIMLA scripts drive the epoch-based scheduler with two kinds of calls:

* **warm-up inside epoch 0** (:func:`warmup_step`): after ``optimizer.step()`` of iteration ``i``
  (0-based) of epoch 0, if ``i % step_size == 0`` and ``i <= warmup_epochs * step_size``, they call
  ``scheduler.step(i // step_size)``. So a "warm-up epoch" is really ``step_size`` (100) iterations,
  and the LR set after iteration ``i`` applies from iteration ``i + 1``. If epoch 0 is shorter than
  ``warmup_epochs * step_size`` iterations the warm-up never reaches the peak LR.
* **once per epoch**, in one of two equivalent placements:

  - :func:`epoch_start_step` (Pretrain, VQA, Pretrain_NLVR): at the top of epoch ``e > 0``,
    ``scheduler.step(e + warmup_epochs)``;
  - :func:`epoch_end_step` (Retrieval, zero-shot retrieval, Grounding, NLVR, VE): after the
    evaluation of epoch ``e``, ``scheduler.step(e + warmup_epochs + 1)``.

  Either way epoch ``e >= 1`` of a cosine schedule runs at
  ``min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * e / epochs))``.

``warmup_epochs`` is the ``schedular.warmup_epochs`` config value.
"""

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
