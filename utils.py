"""Primitives: distributed queries/collectives (no-ops without a group), seeding, booleans, atomic writes."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_gather_tensor",
    "all_reduce_sum",
    "atomic_write",
    "barrier",
    "broadcast_object",
    "concat_all_gather",
    "get_rank",
    "get_world_size",
    "group_device",
    "is_dist_avail_and_initialized",
    "is_main_process",
    "remove_stale_partial_files",
    "seed_everything",
    "str2bool",
]


def str2bool(value: str | bool) -> bool:
    """Parse a boolean command-line value (``true/false``, ``1/0``, ``yes/no``) as an argparse ``type=``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r}: use one of true/false, 1/0, yes/no")


def seed_everything(seed: int) -> int:
    """Seed torch, numpy and ``random`` with ``seed`` and return it."""
    seed = int(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    return seed


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def group_device() -> torch.device:
    """Device on which tensors for collectives of the default group must live."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if not is_dist_avail_and_initialized():
        return
    if str(dist.get_backend()) == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` from every process along dim 0 (no gradient); unchanged without a process group."""
    if not is_dist_avail_and_initialized():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


all_gather_tensor = concat_all_gather


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (itself when not distributed)."""
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (identity without a group)."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None],
                 verify: Callable[[str], None] | None = None, sync_dir: bool = False) -> None:
    """Write ``path`` through ``write(handle)`` so that it is replaced whole or not at all."""
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    remove_stale_partial_files(directory, name)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not sync_dir:
        return
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_partial_files(directory: str, name: str) -> None:
    """Remove ``.<name>.<pid>.*.tmp`` files left in ``directory`` by dead processes' atomic writes."""
    prefix = f".{name}."
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            pid = entry[len(prefix):].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True
