"""Checkpoints that continue a run exactly: training state, random generators and data position."""

from __future__ import annotations

import os
import random
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint.io import save_checkpoint
from scheduler import epoch_end_step
from utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process

LAST_CHECKPOINT = "checkpoint_last.pth"


class NonFiniteWeightsError(RuntimeError):
    """The model holds NaN or infinite values; nothing is saved."""


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states, as plain lists and tensors (loadable with ``weights_only``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(f"checkpoint has CUDA generator states for {len(cuda_states)} devices, this machine "
                          f"has {torch.cuda.device_count()}; CUDA generators keep their fresh seeds", stacklevel=2)


def gather_rng_states() -> list[dict[str, Any]]:
    """Every process's generator states, indexed by rank (a collective call)."""
    mine = capture_rng_state()
    if not is_dist_avail_and_initialized():
        return [mine]
    states: list[Any] = [None] * get_world_size()
    dist.all_gather_object(states, mine)
    return states


def non_finite_tensors(module: torch.nn.Module, limit: int = 10) -> list[str]:
    """Names of parameters and floating buffers holding NaN or inf (at most ``limit``)."""
    bad: list[str] = []
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


@dataclass
class ResumePoint:
    """Where a run continues: the first epoch and batch to train, plus the checkpoint's extra entries."""

    epoch: int = 0
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def start_step(self, epoch: int) -> int:
        """The first batch to train in ``epoch`` (non-zero only for the resumed epoch)."""
        return self.step if epoch == self.epoch else 0


class TrainingCheckpointer:
    """Save and restore everything a run needs to continue; ``output_dir`` gets ``checkpoint_last.pth``."""

    def __init__(self, output_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 config: Mapping[str, Any], scaler: torch.amp.GradScaler | None = None, sampler: Any = None,
                 batch_size: int = 1) -> None:
        self.output_dir = output_dir
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = config
        self.scaler = scaler
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self._pending_rng: Any = None

    @property
    def last_path(self) -> str:
        return os.path.join(self.output_dir, LAST_CHECKPOINT)

    def save(self, path: str, epoch: int, next_step: int | None = None, **extra: Any) -> None:
        """Write a checkpoint of ``epoch`` (complete, or up to batch ``next_step``). Every process calls it."""
        bad = non_finite_tensors(self.model)
        if bad:
            raise NonFiniteWeightsError(f"not saving {path}: the model has non-finite values in {', '.join(bad)}; "
                                        "the previous checkpoint is kept")
        rng_states = gather_rng_states()
        if not is_main_process():
            return
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "config": dict(self.config),
            "epoch": int(epoch),
            "rng_states": rng_states,
            "world_size": get_world_size(),
        }
        if next_step is not None:
            state["next_step"] = int(next_step)
        if self.sampler is not None and hasattr(self.sampler, "state_dict"):
            state["sampler"] = self.sampler.state_dict()
        if self.scaler is not None and self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        state.update(extra)
        save_checkpoint(state, path)

    def save_last(self, epoch: int, next_step: int | None = None, **extra: Any) -> None:
        self.save(self.last_path, epoch, next_step, **extra)

    def restore(self, checkpoint: Mapping[str, Any], path: str, num_batches: int) -> ResumePoint:
        """Load optimizer, scheduler, scaler and RNG states (not the model); return where to continue."""
        for key in ("optimizer", "lr_scheduler", "epoch"):
            if key not in checkpoint:
                raise KeyError(f"{path}: --resume needs a '{key}' entry in the checkpoint")
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{path}: the optimizer state does not fit this model's parameter groups: "
                             f"{exc}") from None
        self.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if self.scaler is not None and self.scaler.is_enabled() and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        epoch = int(checkpoint["epoch"])
        next_step = checkpoint.get("next_step")
        if next_step is not None and 0 < int(next_step) < num_batches:
            point = ResumePoint(epoch=epoch, step=int(next_step))
            self._check_sampler(checkpoint.get("sampler"), path)
        else:
            point = ResumePoint(epoch=epoch + 1, step=0)
        self._pending_rng = (checkpoint.get("rng_states"), path)
        known = {"model", "optimizer", "lr_scheduler", "config", "epoch", "next_step", "rng_states", "sampler",
                 "scaler", "world_size"}
        point.extra = {k: v for k, v in checkpoint.items() if k not in known}
        where = f"epoch {point.epoch}" + (f", batch {point.step}" if point.step else "")
        print(f"resuming from {path} at {where}")
        return point

    def _check_sampler(self, saved: Mapping[str, Any] | None, path: str) -> None:
        if self.sampler is None or not hasattr(self.sampler, "state_dict"):
            return
        current = self.sampler.state_dict()
        if saved is None:
            warnings.warn(f"{path} has no data-order record; the rest of the epoch may repeat or miss samples",
                          stacklevel=3)
            return
        differing = [k for k in ("seed", "num_replicas", "num_samples") if k in saved and saved[k] != current[k]]
        if differing:
            detail = ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in differing)
            warnings.warn(f"{path}: the data order changed since the checkpoint ({detail}); the rest of the "
                          "epoch may repeat or miss samples", stacklevel=3)

    def _restore_rng(self, states: Any, path: str) -> None:
        if not states:
            return
        if len(states) != get_world_size():
            warnings.warn(f"{path} holds random generator states of {len(states)} processes, this run has "
                          f"{get_world_size()}; continuing with fresh generator states", stacklevel=3)
            return
        restore_rng_state(states[get_rank()])

    def start(self, point: ResumePoint) -> None:
        """Call right before the first epoch: position the sampler and restore the RNG states."""
        check_queue = getattr(self.model, "check_queue_fits", None)
        if check_queue is not None:
            check_queue(self.batch_size, get_world_size())
        if self.sampler is not None and point.step:
            self.sampler.set_epoch(point.epoch)
            self.sampler.start_at(point.step * self.batch_size)
        if self._pending_rng is not None:
            self._restore_rng(*self._pending_rng)
            self._pending_rng = None

    def finish_epoch(self, epoch: int, epoch_path: str | None = None, keep_last: bool = False,
                     **extra: Any) -> None:
        """End-of-epoch saving to ``epoch_path`` and, with ``keep_last``, the rolling file."""
        if epoch_path is not None:
            self.save(epoch_path, epoch, **extra)
            if keep_last and is_main_process():
                link_or_copy(epoch_path, self.last_path)
        elif keep_last:
            self.save_last(epoch, **extra)


def link_or_copy(source: str, target: str) -> None:
    """Make ``target`` an atomic hard link to ``source`` (a copy where links are not supported)."""
    tmp = f"{target}.{os.getpid()}.link.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def resume_point(checkpointer: TrainingCheckpointer, checkpoint: Mapping[str, Any] | None, args: Any,
                 num_batches: int, epoch_end_warmup: int | None = None) -> ResumePoint:
    """Where training starts: epoch 0 unless ``args.resume`` continues ``checkpoint``."""
    if checkpoint is None or not getattr(args, "resume", False):
        if getattr(args, "resume", False):
            raise ValueError("--resume needs --checkpoint (a checkpoint written by this script)")
        return ResumePoint()
    point = checkpointer.restore(checkpoint, args.checkpoint, num_batches)
    if epoch_end_warmup is not None and point.step == 0 and point.epoch > 0:
        epoch_end_step(checkpointer.scheduler, point.epoch - 1, epoch_end_warmup)
    return point
