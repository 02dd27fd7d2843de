"""Run set-up shared by every script: config, output folder, distributed init, device and seeds, and the
entry wrapper that makes a failing process of a multi-process run exit promptly."""

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
    """``--tf32``: float32 matrix products may use TF32 on GPUs that have it (cuDNN convolutions already
    do by PyTorch's default)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled


def use_deterministic_algorithms(enabled: bool) -> None:
    """``--deterministic``: only deterministic kernels (CPU and CUDA), cuDNN without autotuning, and the
    cuBLAS workspace size that deterministic CUDA matrix products need; otherwise cuDNN autotunes."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    cudnn.deterministic = enabled
    cudnn.benchmark = not enabled


def prepare_output_dir(path: str) -> None:
    """Create ``--output_dir`` (with its parents) and check that it is a writable folder; otherwise exit
    with a one-line error naming the flag, the path and the problem."""
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
    """Load and validate the config and fill in the schema's defaults, check that ``--checkpoint`` is a
    PyTorch checkpoint file, write ``output_dir/config.yaml`` (as written, see ``configs.as_written``),
    initialise distributed mode, pick the device and seed every generator with ``seed + rank`` (all
    before any data is read)."""
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
    """Global rank of this process when it is part of a multi-process run, None for a single process.

    Known from the process group once it exists, before that from the launcher's environment (torchrun:
    ``RANK``/``WORLD_SIZE``; SLURM: ``SLURM_PROCID``/``SLURM_NTASKS``), so that a failure during set-up
    is also reported with its rank.
    """
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
    """Report the failure of rank ``rank`` on stderr (message and traceback) and end the process now.

    The process group is deliberately not destroyed: ``destroy_process_group`` may wait for a
    collective that the peers never complete. ``os._exit`` skips that wait (and the interpreter's own
    clean-up, which can block in the same way); closing the process's connections is what makes the
    peers' pending collectives fail (gloo) or lets their watchdog time out (nccl), after which the
    launcher stops the remaining processes.
    """
    lines = [f"rank {rank} failed: {type(exc).__name__}: {exc}\n",
             *traceback.format_exception(type(exc), exc, exc.__traceback__)]
    try:
        sys.stdout.flush()
        sys.stderr.write("".join(lines))
        sys.stderr.flush()
    finally:
        os._exit(_exit_status(exc))


def run_entry(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Run a script's ``main(args)``; if it raises in a multi-process run, exit this process at once.

    A single process lets the exception propagate as usual (traceback, exit status 1). A process of a
    multi-process run (see :func:`job_rank`) prints ``rank R failed: <error>`` and its traceback and
    exits with status 1 (130 for Ctrl-C, the code of a non-zero ``SystemExit``) without waiting for
    its peers (see :func:`exit_after_failure`), so that no process is left blocked in a collective.
    After a successful multi-process run the process group is closed (:func:`close_process_group`).
    """
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
    """After a successful run, wait for every process and then shut the process group down.

    Left to the interpreter's exit, the group's background threads can be torn down in an order that
    aborts the process ("terminate called without an active exception") after all the work is done.
    """
    if is_dist_avail_and_initialized():
        barrier()
        torch.distributed.destroy_process_group()
