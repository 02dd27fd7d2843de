"""The epoch loop every training script runs (train, evaluate, log, keep the best, save, step), from a :class:`FitPlan`."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.checkpoint import ResumePoint, checkpoint_path
from engine.loop import EpochSettings, train_epoch
from engine.metrics import append_log
from engine.training import TrainingParts
from scheduler import epoch_end_step, epoch_start_step
from utils import barrier, broadcast_object, is_main_process

BEST_CHECKPOINT = "checkpoint_best.pth"
StepFn = Callable[[Any, int, int], Mapping[str, torch.Tensor]]


@dataclass
class Evaluation:
    """``log.txt`` entries, tracker metrics and the best-checkpoint score (``None`` off the main process)."""

    log: dict[str, Any] = field(default_factory=dict)
    track: dict[str, float] = field(default_factory=dict)
    score: float | None = None


@dataclass
class FitPlan:
    """What a task trains and keeps (the original scripts' choices by default)."""

    make_step: Callable[[int], StepFn]  # the step function of an epoch
    loader: Any
    settings: EpochSettings
    epochs: int
    evaluate: Callable[[int], Evaluation] | None = None  # after every epoch
    evaluate_only: bool = False  # --evaluate: no training, one evaluation (or none), then stop
    schedule: str = "epoch_end"  # the LR schedule steps at the "epoch_start" or the "epoch_end"
    save_each_epoch: bool = False  # write checkpoint_%02d.pth after every epoch
    best_key: str | None = None  # checkpoint entry of the best score; None: no best checkpoint
    best_file: str | None = BEST_CHECKPOINT  # None: an improved epoch writes its checkpoint_%02d.pth
    best_epoch: bool = True  # also keep and log the best epoch
    best_epoch_default: int = 0


@dataclass
class FitResult:
    best: float | None
    best_epoch: int
    last_epoch: int


def fit(model: torch.nn.Module, plan: FitPlan, parts: TrainingParts, point: ResumePoint, tracker: Any,
        output_dir: str, device: torch.device, keep_last: bool = False,
        after: Callable[[int], None] | None = None) -> FitResult:
    """Run the epochs from ``point`` to ``plan.epochs``; ``after(last_epoch)`` runs once the loop is done."""
    optimizer, scheduler, scaler, checkpointer = parts
    warmup = plan.settings.warmup_epochs
    best = float(point.extra.get(plan.best_key, 0.0)) if plan.best_key else None
    best_epoch = int(point.extra.get("best_epoch", plan.best_epoch_default))

    def best_entries() -> dict[str, Any]:
        if plan.best_key is None:
            return {}
        return {plan.best_key: best, **({"best_epoch": best_epoch} if plan.best_epoch else {})}

    print("Start training")
    start_time = time.time()
    checkpointer.start(point)
    last_epoch = point.epoch if plan.evaluate_only else point.epoch - 1
    for epoch in range(point.epoch, plan.epochs):
        last_epoch = epoch
        if plan.schedule == "epoch_start" and point.start_step(epoch) == 0:
            epoch_start_step(scheduler, epoch, warmup)
        if plan.evaluate_only and plan.evaluate is None:
            break
        train_stats: dict[str, Any] = {}
        if not plan.evaluate_only:
            train_stats = train_epoch(model, plan.loader, optimizer, scheduler, epoch, device, plan.make_step(epoch),
                                      plan.settings, scaler=scaler, checkpointer=checkpointer, point=point,
                                      tracker=tracker, save_extra=best_entries())
        result = plan.evaluate(epoch) if plan.evaluate is not None else Evaluation()
        tracker.log(result.track, step=(epoch + 1) * len(plan.loader))
        if is_main_process():
            append_log(output_dir, {**{f"train_{k}": v for k, v in train_stats.items()}, **result.log,
                                    "epoch": epoch})
        if plan.evaluate_only:
            break
        if plan.best_key is not None:
            # the score may exist on the main process only; every process takes part in saving
            improved = result.score is not None and result.score > best
            if improved:
                best, best_epoch = result.score, epoch
            best, best_epoch, improved = broadcast_object((best, best_epoch, improved))
            if improved:
                path = checkpoint_path(output_dir, epoch) if plan.best_file is None else \
                    os.path.join(output_dir, plan.best_file)
                checkpointer.save(path, epoch, **best_entries())
        if plan.schedule == "epoch_end":
            epoch_end_step(scheduler, epoch, warmup)
        checkpointer.finish_epoch(epoch, checkpoint_path(output_dir, epoch) if plan.save_each_epoch else None,
                                  keep_last=keep_last, **best_entries())
        barrier()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if after is not None:
        after(last_epoch)
    tracker.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if plan.best_key is not None and plan.best_epoch and is_main_process():
        append_log(output_dir, f"best epoch: {best_epoch}")
    return FitResult(best=best, best_epoch=best_epoch, last_epoch=last_epoch)
