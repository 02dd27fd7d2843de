"""Run set-up shared by every script and the entry wrapper that ends a failing process promptly."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.backends.cudnn as cudnn
from torch.nn.parallel import DistributedDataParallel

from configs import load_config, save_config, with_defaults
from engine.checkpoint import check_checkpoint_format
from engine.distributed import init_distributed_mode
from models.attention import use_fused_dropout
from utils import (
    barrier,
    get_rank,
    get_world_size,
    is_dist_avail_and_initialized,
    is_main_process,
    seed_everything,
)


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


def use_tf32(enabled: bool) -> None:
    """``--tf32``: float32 matrix products may use TF32."""
    torch.backends.cuda.matmul.allow_tf32 = enabled


def use_deterministic_algorithms(enabled: bool) -> None:
    """``--deterministic``: deterministic kernels and cuBLAS workspace; otherwise cuDNN autotunes."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    cudnn.deterministic = enabled
    cudnn.benchmark = not enabled


def prepare_output_dir(path: str) -> None:
    """Create ``--output_dir`` and check it is writable; otherwise exit with a one-line error."""
    if os.path.exists(path) and not os.path.isdir(path):
        problem = "exists and is not a folder"
    else:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            problem = f"cannot be created ({exc.strerror or exc})"
        else:
            if os.access(path, os.W_OK | os.X_OK):
                return
            problem = "is not writable"
    raise SystemExit(f"error: --output_dir {path}: {problem}")


def setup_run(args: argparse.Namespace, task: str, extra_config: dict[str, Any] | None = None) -> RunContext:
    """Config, ``--checkpoint`` check, ``config.yaml``, distributed init, device, ``seed + rank`` seeding."""
    config = load_config(args.config, args.overrides, task=task)
    checkpoint = getattr(args, "checkpoint", "")
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(2, "--checkpoint file not found", checkpoint)
    if checkpoint:
        try:
            check_checkpoint_format(checkpoint)
        except ValueError as exc:
            raise SystemExit(f"error: --checkpoint {exc}") from None
    if extra_config:
        config.update(extra_config)
    config = with_defaults(config, task)
    init_distributed_mode(args)
    if is_main_process():
        prepare_output_dir(args.output_dir)
        save_config(config, args.output_dir)
    local_rank = int(getattr(args, "gpu", 0) or 0)
    device = resolve_device(args.device, local_rank)
    seed_everything(args.seed + get_rank())
    use_deterministic_algorithms(bool(getattr(args, "deterministic", False)))
    use_tf32(bool(getattr(args, "tf32", False)))
    use_fused_dropout(bool(getattr(args, "fused_dropout", False)))
    return RunContext(args=args, config=config, device=device)


def wrap_ddp(model: torch.nn.Module, ctx: RunContext, **kwargs: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model_for_training, model_without_ddp)``; DDP only when running distributed."""
    if not ctx.distributed:
        return model, model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    return ddp, model


def _env_rank(rank_var: str, size_var: str) -> int | None:
    """The rank a launcher gave this process through ``rank_var``, if its job has several processes."""
    rank, size = os.environ.get(rank_var, "").strip(), os.environ.get(size_var, "").strip()
    if not rank.isdigit() or not size.isdigit() or int(size) < 2:
        return None
    return int(rank)


def job_rank(args: argparse.Namespace) -> int | None:
    """Global rank in a multi-process run (from the process group or launcher env), else None."""
    if is_dist_avail_and_initialized():
        return get_rank()
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        rank = _env_rank(rank_var, size_var)
        if rank is not None:
            return rank
    return None


def _exit_status(exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code != 0:
        return exc.code
    return 1


def exit_after_failure(rank: int, exc: BaseException) -> NoReturn:
    """Report ``rank``'s failure and ``os._exit`` now; destroying the group could wait on dead peers."""
    lines = [f"rank {rank} failed: {type(exc).__name__}: {exc}\n",
             *traceback.format_exception(type(exc), exc, exc.__traceback__)]
    try:
        sys.stdout.flush()
        sys.stderr.write("".join(lines))
        sys.stderr.flush()
    finally:
        os._exit(_exit_status(exc))


def run_entry(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Run ``main(args)``; in a multi-process run a failure prints ``rank R failed`` and exits at once."""
    try:
        main(args)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            raise
        rank = job_rank(args)
        if rank is None:
            raise
        exit_after_failure(rank, exc)
    close_process_group()


def close_process_group() -> None:
    """After a successful run, wait for every process and shut the group down (avoids an abort at exit)."""
    if is_dist_avail_and_initialized():
        barrier()
        torch.distributed.destroy_process_group()
