"""Distributed set-up: torchrun/SLURM init, timeout, NCCL errors, rank-aware ``print``."""

from __future__ import annotations

import builtins
import datetime
import math
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from utils import barrier

_builtin_print = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master processes; ``print(..., force=True)`` always prints."""

    def rank_aware_print(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


DEFAULT_DIST_TIMEOUT_S = 1800.0

# NCCL watchdog error-handling variables (current and older spelling).
_NCCL_ERROR_HANDLING_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")


def dist_timeout(args: Any) -> datetime.timedelta:
    """Process-group timeout from ``args.dist_timeout`` (seconds; default when absent or None)."""
    value = getattr(args, "dist_timeout", None)
    raw = DEFAULT_DIST_TIMEOUT_S if value is None else value
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"--dist_timeout must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"--dist_timeout must be a positive, finite number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def enable_nccl_error_handling() -> None:
    """Make the NCCL watchdog abort on a failed collective (unless set by the user); call before init."""
    for name in _NCCL_ERROR_HANDLING_VARS:
        value = os.environ.get(name, "").strip()
        if value == "":
            continue
        if value == "0":
            warnings.warn(f"{name}=0: a timed-out NCCL collective will hang instead of failing the run",
                          RuntimeWarning, stacklevel=2)
        return
    os.environ[_NCCL_ERROR_HANDLING_VARS[0]] = "3"


def init_distributed_mode(args: Any) -> None:
    """Initialise torch.distributed (torchrun/SLURM); set ``args.rank``, ``world_size``, ``gpu``, etc."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")
    if rank is not None and world_size is not None:
        local_rank = _env_int("LOCAL_RANK")
        gpu = local_rank if local_rank is not None else rank % max(cuda_count, 1)
    elif _env_int("SLURM_PROCID") is not None:
        rank = _env_int("SLURM_PROCID")
        assert rank is not None
        world_size = _env_int("SLURM_NTASKS") or int(getattr(args, "world_size", 1) or 1)
        local_id = _env_int("SLURM_LOCALID")
        gpu = local_id if local_id is not None else rank % max(cuda_count, 1)
    else:
        rank, world_size, gpu = None, None, None

    dist_url = getattr(args, "dist_url", "env://") or "env://"
    if (
        rank is not None
        and world_size == 1
        and dist_url == "env://"
        and "MASTER_ADDR" not in os.environ
    ):
        rank = None

    if rank is None or world_size is None or gpu is None:
        print("Not using distributed mode")
        args.distributed = False
        args.rank = 0
        args.gpu = 0
        if not hasattr(args, "world_size") or args.world_size is None:
            args.world_size = 1
        setup_for_distributed(True)
        return

    timeout = dist_timeout(args)
    args.rank, args.world_size, args.gpu = rank, world_size, gpu
    args.distributed = True
    device = torch.device(getattr(args, "device", "cuda") or "cuda")
    use_cuda = torch.cuda.is_available() and device.type == "cuda"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        enable_nccl_error_handling()
        torch.cuda.set_device(gpu)
    print(f"| distributed init (rank {rank}): {dist_url}", flush=True)
    dist.init_process_group(
        backend=args.dist_backend, init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    barrier()
    setup_for_distributed(rank == 0)
