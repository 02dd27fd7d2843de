"""The generic training epoch every script runs; tasks plug in their own step function."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.precision import autocast
from scheduler import warmup_step
from utils import MetricLogger, SmoothedValue


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite."""


@dataclass
class EpochSettings:
    """How one task's epoch is logged and scheduled (values of the original scripts by default)."""

    loss_names: tuple[str, ...]
    meter_window: int = 50
    stats_format: str = "{:.3f}"
    print_freq: int = 50
    step_size: int = 100
    warmup_epochs: int = 0
    amp: str = "none"
    header: str = "Train Epoch: [{epoch}]"
    extra_meters: dict[str, str] = field(default_factory=dict)
    counted_batches: bool = False  # the loader yields (batch, num_failed) from SafeCollate


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: Any,
                    epoch: int, device: torch.device,
                    step_fn: Callable[[Any, int, int], Mapping[str, torch.Tensor]], settings: EpochSettings,
                    scaler: torch.amp.GradScaler | None = None, sampler: Any = None,
                    on_step: Callable[[int, Mapping[str, float], torch.nn.Module], None] | None = None,
                    ) -> dict[str, str]:
    """Run one epoch: for each batch ``step_fn(batch, i, num_batches)`` returns the named losses,
    whose sum is back-propagated; the LR warm-up steps inside epoch 0 as the original.

    Loaders built with :class:`dataset.collate.SafeCollate` yield ``(batch, num_failed)``: failed
    samples are counted in the ``skipped`` meter and a batch in which every sample failed is skipped.
    """
    model.train()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=settings.meter_window, fmt="{value:.6f}"))
    for name in settings.loss_names:
        logger.add_meter(name, SmoothedValue(window_size=settings.meter_window, fmt="{value:.4f}"))
    for name, fmt in settings.extra_meters.items():
        logger.add_meter(name, SmoothedValue(window_size=settings.meter_window, fmt=fmt))
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    num_batches = len(loader)
    skipped_samples = 0
    header = settings.header.format(epoch=epoch)
    for i, item in enumerate(logger.log_every(loader, settings.print_freq, header)):
        batch = item
        if settings.counted_batches:
            batch, failed = item
            skipped_samples += failed
            if batch is None:
                print(f"warning: every sample of batch {i} of epoch {epoch} was unreadable; batch skipped")
                continue
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, settings.amp):
            losses = step_fn(batch, i, num_batches)
        total = sum(losses.values())
        values = {name: float(loss.detach()) for name, loss in losses.items()}
        if not math.isfinite(sum(values.values())):
            detail = ", ".join(f"{k}={v}" for k, v in values.items())
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, iteration {i}: {detail}")
        if scaler is not None and scaler.is_enabled():
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        logger.update(lr=optimizer.param_groups[0]["lr"], **values)
        if on_step is not None:
            on_step(i, values, model)
        if epoch == 0:
            warmup_step(scheduler, epoch, i, settings.warmup_epochs, settings.step_size)
    logger.synchronize_between_processes()
    if skipped_samples:
        print(f"{skipped_samples} unreadable samples were replaced by other samples of their batch this epoch")
    print("Averaged stats:", logger.global_avg())
    stats = {name: settings.stats_format.format(meter.global_avg) for name, meter in logger.meters.items()
             if meter.count}
    if skipped_samples:
        stats["skipped_samples"] = skipped_samples
    return stats
