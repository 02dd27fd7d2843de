"""Run set-up shared by every script: config, output folder, distributed init, device and seeds."""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.backends.cudnn as cudnn
from torch.nn.parallel import DistributedDataParallel

from configs import load_config, save_config
from utils import get_rank, get_world_size, init_distributed_mode, is_main_process, seed_everything


@dataclass
class RunContext:
    args: argparse.Namespace
    config: dict[str, Any]
    device: torch.device

    @property
    def distributed(self) -> bool:
        return bool(getattr(self.args, "distributed", False))

    @property
    def rank(self) -> int:
        return get_rank()

    @property
    def world_size(self) -> int:
        return get_world_size()


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"--device {requested} requested but CUDA is not available; running on the CPU",
                      stacklevel=2)
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def setup_run(args: argparse.Namespace, task: str, extra_config: dict[str, Any] | None = None) -> RunContext:
    """Load and validate the config, write ``output_dir/config.yaml``, initialise distributed mode,
    pick the device and seed every generator with ``seed + rank``."""
    config = load_config(args.config, args.overrides, task=task)
    if extra_config:
        config.update(extra_config)
    init_distributed_mode(args)
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        save_config(config, args.output_dir)
    local_rank = int(getattr(args, "gpu", 0) or 0)
    device = resolve_device(args.device, local_rank)
    seed_everything(args.seed + get_rank())
    cudnn.benchmark = True
    return RunContext(args=args, config=config, device=device)


def wrap_ddp(model: torch.nn.Module, ctx: RunContext, **kwargs: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model_for_training, model_without_ddp)``; DDP only when running distributed."""
    if not ctx.distributed:
        return model, model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    return ddp, model
