"""The generic training epoch every script runs; tasks plug in their own step function."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.metrics import MetricLogger, SmoothedValue
from models.precision import autocast
from optim.in_backward import StepInBackward
from scheduler import warmup_step
from utils import is_dist_avail_and_initialized


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
    skip_nonfinite: bool = False  # skip and count a step with a NaN/inf loss instead of stopping
    save_every_steps: int = 0  # call ``save_step`` after every N-th step of the epoch
    step_in_backward: bool = False  # apply the optimizer update during backward (optim.in_backward)

    @classmethod
    def for_run(cls, args: Any, loss_names: tuple[str, ...], **task: Any) -> EpochSettings:
        """The task's settings plus ``--amp``, ``--skip_nonfinite``, ``--save_every_steps``, ``--step_in_backward``."""
        return cls(loss_names=loss_names, amp=args.amp, skip_nonfinite=args.skip_nonfinite,
                   save_every_steps=args.save_every_steps, step_in_backward=args.step_in_backward, **task)


def _everyone(condition: bool, device: torch.device) -> bool:
    """Whether ``condition`` holds on every process (a collective call when distributed)."""
    if is_dist_avail_and_initialized():
        flag = torch.tensor([1.0 if condition else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return condition


def _job_total(count: int | torch.Tensor, device: torch.device) -> int:
    """``count`` summed over every process (a collective call when distributed)."""
    total = torch.as_tensor(count, dtype=torch.float64).reshape(1).to(device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(total)
    return int(total.item())


def _read_losses(pending: list[tuple[int, float, Mapping[str, torch.Tensor]]], logger: MetricLogger
                 ) -> list[tuple[int, str]]:
    """Read the pending steps' losses to the host in one transfer and log the steps finite on every process;
    returns ``(iteration, losses)`` of the others (a collective call when distributed)."""
    if not pending:
        return []
    rows = [torch.stack(list(losses.values())).reshape(-1).double() for _, _, losses in pending]
    finite = torch.stack([row.isfinite().all() for row in rows]).double()
    if is_dist_avail_and_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    flat = torch.cat([finite, *rows]).tolist()
    values = iter(flat[len(pending):])
    nonfinite = []
    for (i, lr, losses), ok in zip(pending, flat):
        read = {name: next(values) for name in losses}
        if ok:
            logger.update(lr=lr, **read)
        else:
            nonfinite.append((i, ", ".join(f"{k}={v}" for k, v in read.items())))
    pending.clear()
    return nonfinite


def _optimizer_stepper(optimizer: torch.optim.Optimizer, settings: EpochSettings,
                       scaler: torch.amp.GradScaler | None) -> StepInBackward | None:
    """The hooks of ``--step_in_backward`` (None when it is off); refuses the set-ups it cannot serve."""
    if not settings.step_in_backward:
        return None
    if is_dist_avail_and_initialized():
        raise ValueError("--step_in_backward needs a single process: with several, gradients are averaged "
                         "over processes after backward, before any update")
    if scaler is not None and scaler.is_enabled():
        raise ValueError("--step_in_backward cannot be combined with --amp fp16 (the loss scaler checks every "
                         "gradient before the update); use --amp bf16 or none")
    return StepInBackward(optimizer)


def _buffers_snapshot(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # queues and their pointers change in the forward pass; a skipped step must not keep what it enqueued
    module = getattr(model, "module", model)
    return [(buffer, buffer.detach().clone()) for buffer in module.buffers()]


def _run_steps(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: Any,
               epoch: int, device: torch.device, step_fn: Callable[[Any, int, int], Mapping[str, torch.Tensor]],
               settings: EpochSettings, scaler: torch.amp.GradScaler | None, stepper: StepInBackward | None,
               logger: MetricLogger, on_step: Callable[[int, Mapping[str, torch.Tensor], torch.nn.Module], None] | None,
               start_step: int, save_step: Callable[[int], None] | None, num_batches: int) -> tuple[int, int]:
    """The steps of one epoch; returns this process's unreadable samples and skipped steps."""
    skipped_samples = 0
    skipped_steps = 0
    header = settings.header.format(epoch=epoch)
    # losses stay on the device until a progress line, a save or the epoch end needs them (every step with
    # ``skip_nonfinite``), so the host never waits for the device in between
    pending: list[tuple[int, float, Mapping[str, torch.Tensor]]] = []

    def read_losses() -> None:
        nonfinite = _read_losses(pending, logger)
        if nonfinite:
            (i, detail), later = nonfinite[0], ", ".join(str(j) for j, _ in nonfinite[1:])
            raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, iteration {i} (on this or another process): "
                                     f"{detail}{'; also at iterations ' + later if later else ''}; "
                                     "--skip_nonfinite skips such steps instead")

    for i, item in enumerate(logger.log_every(loader, settings.print_freq, header, first_index=start_step),
                             start=start_step):
        batch = item
        if settings.counted_batches:
            batch, failed = item
            skipped_samples += failed
            # all processes skip together, or the others would wait for this one's gradients forever
            if not _everyone(batch is not None, device):
                where = "this process" if batch is None else "another process"
                print(f"warning: every sample of batch {i} of epoch {epoch} on {where} was unreadable; "
                      "step skipped")
                if epoch == 0:
                    warmup_step(scheduler, epoch, i, settings.warmup_epochs, settings.step_size)
                if i % settings.print_freq == 0 or i == num_batches - 1:
                    read_losses()
                continue
        optimizer.zero_grad(set_to_none=True)
        snapshot = _buffers_snapshot(model) if settings.skip_nonfinite else None
        with autocast(device, settings.amp):
            losses = step_fn(batch, i, num_batches)
        total = sum(losses.values())
        detached = {name: loss.detach() for name, loss in losses.items()}
        pending.append((i, optimizer.param_groups[0]["lr"], detached))
        nonfinite = _read_losses(pending, logger) if snapshot is not None else []
        if nonfinite:
            skipped_steps += 1
            print(f"warning: non-finite loss at epoch {epoch}, iteration {i}: {nonfinite[0][1]}; step skipped "
                  f"({skipped_steps} this epoch)")
            # every process runs backward so gradient hooks stay in step; buffers restored afterwards
            total.backward()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in snapshot:
                    buffer.copy_(saved)
            if epoch == 0:
                warmup_step(scheduler, epoch, i, settings.warmup_epochs, settings.step_size)
            continue
        del snapshot
        if scaler is not None and scaler.is_enabled():
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        elif stepper is not None:
            with stepper.active():
                total.backward()
        else:
            total.backward()
            optimizer.step()
        if on_step is not None:
            on_step(i, detached, model)
        if epoch == 0:
            warmup_step(scheduler, epoch, i, settings.warmup_epochs, settings.step_size)
        save = settings.save_every_steps > 0 and (i + 1) % settings.save_every_steps == 0 and i + 1 < num_batches
        if save or i % settings.print_freq == 0 or i == num_batches - 1:
            read_losses()
        if save and save_step is not None:
            save_step(i + 1)
    read_losses()
    return skipped_samples, skipped_steps


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: Any,
                    epoch: int, device: torch.device,
                    step_fn: Callable[[Any, int, int], Mapping[str, torch.Tensor]], settings: EpochSettings,
                    scaler: torch.amp.GradScaler | None = None, sampler: Any = None,
                    on_step: Callable[[int, Mapping[str, torch.Tensor], torch.nn.Module], None] | None = None,
                    start_step: int = 0, save_step: Callable[[int], None] | None = None,
                    ) -> dict[str, str]:
    """Run one epoch: ``step_fn(batch, i, num_batches)`` returns the named losses, their sum is
    back-propagated; the LR warm-up steps inside epoch 0 as the original.

    ``start_step`` resumes mid-epoch; ``save_step(next_step)`` every ``save_every_steps`` steps. A
    non-finite loss raises :class:`NonFiniteLossError` when the losses are next read (progress line, step
    save, epoch end) or, with ``skip_nonfinite`` (read every step), skips the step.
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
    stepper = _optimizer_stepper(optimizer, settings, scaler)
    try:
        skipped_samples, skipped_steps = _run_steps(
            model, loader, optimizer, scheduler, epoch, device, step_fn, settings, scaler, stepper, logger,
            on_step, start_step, save_step, num_batches)
    finally:
        if stepper is not None:
            stepper.remove()
    logger.synchronize_between_processes()
    skipped_samples = _job_total(skipped_samples, device)
    model_counts = getattr(getattr(model, "module", model), "epoch_counters", None)
    counted = {name: _job_total(value, device) for name, value in (model_counts() if model_counts else {}).items()}
    if skipped_samples:
        print(f"{skipped_samples} unreadable samples this epoch (replaced by other samples of their batch, or "
              "dropped from it)")
    print("Averaged stats:", logger.global_avg())
    stats = {name: settings.stats_format.format(meter.global_avg) for name, meter in logger.meters.items()
             if meter.count}
    if skipped_samples:
        stats["skipped_samples"] = skipped_samples
    if skipped_steps:
        print(f"{skipped_steps} steps with non-finite losses were skipped this epoch")
        stats["skipped_steps"] = skipped_steps
    for name, count in counted.items():
        if count:
            print(f"{name}: {count} this epoch")
            stats[name] = count
    return stats


def train_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: Any,
                epoch: int, device: torch.device, step_fn: Callable[[Any, int, int], Mapping[str, torch.Tensor]],
                settings: EpochSettings, *, scaler: torch.amp.GradScaler | None, checkpointer: Any, point: Any,
                tracker: Any, save_extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """:func:`train_one_epoch` with resume position, rolling checkpoint and per-step metrics."""
    extra = dict(save_extra or {})
    return train_one_epoch(model, loader, optimizer, scheduler, epoch, device, step_fn, settings, scaler=scaler,
                           sampler=checkpointer.sampler,
                           on_step=tracker.step_callback(epoch, len(loader), optimizer),  # type: ignore[arg-type]
                           start_step=point.start_step(epoch),
                           save_step=lambda next_step: checkpointer.save_last(epoch, next_step, **extra))
