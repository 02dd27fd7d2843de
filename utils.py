"""Shared utilities: metric logging, distributed set-up, seeding, CLI parsing and checkpoint I/O.

The console format of :class:`MetricLogger` and the ``log.txt`` lines match the original SIMLA code.
Differences from the original (all of which leave its outputs unchanged):

* every collective (barrier, all-reduce, all-gather) is skipped when no process group is initialised,
  so single-process runs work;
* the metric all-reduce uses the process group's device (CPU for gloo, CUDA for nccl);
* ``init_distributed_mode`` also understands torchrun and chooses the gloo backend off-GPU;
* checkpoints are written atomically and read with ``weights_only=True``; the pickled OmegaConf
  config inside original pretraining checkpoints is converted to plain dicts without needing
  ``omegaconf``.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import datetime
import json
import math
import os
import pickle
import pickletools
import random
import re
import secrets
import struct
import time
import typing
import warnings
import zipfile
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from numbers import Real
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "MetricLogger",
    "SmoothedValue",
    "UnsafeCheckpointError",
    "all_gather_tensor",
    "all_reduce_sum",
    "append_log",
    "barrier",
    "check_checkpoint_format",
    "concat_all_gather",
    "dist_timeout",
    "enable_nccl_error_handling",
    "format_time",
    "get_rank",
    "get_world_size",
    "init_distributed_mode",
    "is_dist_avail_and_initialized",
    "is_main_process",
    "load_checkpoint",
    "omegaconf_safe_globals",
    "remove_stale_partial_files",
    "save_checkpoint",
    "save_on_master",
    "seed_everything",
    "setup_for_distributed",
    "str2bool",
]


# ---------------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------------


def format_time(seconds: float) -> str:
    """Format a duration as ``H:MM:SS`` (fractions of a second are dropped)."""
    return str(datetime.timedelta(seconds=int(seconds)))


def str2bool(value: str | bool) -> bool:
    """Parse a boolean command-line value (``true/false``, ``1/0``, ``yes/no``; case-insensitive).

    Meant as an argparse ``type=``. The original scripts used ``type=bool``, under which every
    non-empty string, ``False`` included, meant True.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(
        f"invalid boolean value {value!r}: use one of true/false, 1/0, yes/no"
    )


def seed_everything(seed: int) -> int:
    """Seed torch, numpy and ``random`` with ``seed`` and return it."""
    seed = int(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    return seed


def append_log(output_dir: str | os.PathLike[str], stats: Mapping[str, Any] | str) -> None:
    """Append to ``output_dir/log.txt``: a dict as one ``json.dumps`` line plus newline.

    A string is written verbatim (the scripts' final ``best epoch: N`` has no newline).
    """
    text = stats if isinstance(stats, str) else json.dumps(dict(stats)) + "\n"
    with open(os.path.join(os.fspath(output_dir), "log.txt"), "a") as handle:
        handle.write(text)


# ---------------------------------------------------------------------------------------------------
# Distributed utilities
# ---------------------------------------------------------------------------------------------------


def is_dist_avail_and_initialized() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 without a group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """Global rank of this process (0 without a group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """True on global rank 0."""
    return get_rank() == 0


def _group_device() -> torch.device:
    """Device on which tensors for collectives of the default group must live."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Synchronise all processes; does nothing without a process group."""
    if not is_dist_avail_and_initialized():
        return
    if str(dist.get_backend()) == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Gather ``tensor`` from every process and concatenate along dim 0 (no gradient).

    Without a process group the input is returned unchanged.
    """
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


# Seconds a collective (and the rendezvous) may wait for the other processes when ``args`` carries no
# ``dist_timeout`` (the value of the --dist_timeout flag's default).
DEFAULT_DIST_TIMEOUT_S = 1800.0

# Environment variables that set what the NCCL watchdog does with a failed or timed-out collective;
# the first is read by current PyTorch, the second is its older spelling.
_NCCL_ERROR_HANDLING_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")


def dist_timeout(args: Any) -> datetime.timedelta:
    """The process-group timeout from ``args.dist_timeout`` (seconds; the default when absent or None).

    Every collective (and the rendezvous in ``init_process_group``) fails with an error after waiting
    this long for a peer, instead of blocking forever when a peer died or hangs.
    """
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
    """Make the NCCL watchdog tear the process down when a collective fails or times out.

    Without it a rank whose peer died could wait inside a CUDA kernel forever. Mode 3 aborts the
    process without the communicator clean-up (which can itself hang). An explicit setting by the user
    is kept; turning it off (0) is allowed, with a warning that timeouts then go unnoticed. Must run
    before the NCCL process group is created, which reads the variable.
    """
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
    """Initialise torch.distributed from the environment and record the result on ``args``.

    Sets ``args.rank``, ``args.world_size``, ``args.gpu``, ``args.distributed`` and
    ``args.dist_backend``. Recognised launchers: ``torchrun`` / ``torch.distributed.launch --use_env``
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``SLURM_LOCALID``). Without either, prints ``Not using distributed mode`` and runs single-process.
    The backend is nccl when CUDA is available and ``args.device`` is a CUDA device, gloo otherwise;
    ``torch.cuda.set_device`` is only called for nccl. Afterwards ``print`` is silenced on non-zero
    ranks (``print(..., force=True)`` still prints); in single-process mode the ``force`` keyword is
    accepted too. A one-process launch without a rendezvous address (``env://`` and no
    ``MASTER_ADDR``, e.g. a single SLURM task) runs without a process group.

    The process group gets the timeout ``args.dist_timeout`` (seconds, see :func:`dist_timeout`): a
    collective that waits longer for a peer raises instead of hanging. For nccl the watchdog's
    asynchronous error handling is switched on (:func:`enable_nccl_error_handling`) so that a timed-out
    collective aborts the process even while it is blocked in a CUDA kernel.
    """
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
        # one process and no rendezvous address (e.g. a single SLURM task): nothing to synchronise with
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


# ---------------------------------------------------------------------------------------------------
# Metric logging
# ---------------------------------------------------------------------------------------------------


class SmoothedValue:
    """Track a series of values: a sliding window (median/avg/max/value) and the global average."""

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt if fmt is not None else "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Record ``value`` (counted ``n`` times in the global average)."""
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over all processes (the window is not synchronised)."""
        if not is_dist_avail_and_initialized():
            return
        stats = torch.tensor([self.count, self.total], dtype=torch.float64, device=_group_device())
        barrier()
        dist.all_reduce(stats)
        values = stats.tolist()
        self.count = int(values[0])
        self.total = values[1]

    @property
    def median(self) -> float:
        """Median of the window (the lower middle value for even sizes; float32 for floats)."""
        if not self.deque:
            return float("nan")
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        """Mean of the window, computed in float32."""
        if not self.deque:
            return float("nan")
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        """Mean of every recorded value, weighted by ``n``."""
        return self.total / self.count if self.count else float("nan")

    @property
    def max(self) -> float:
        """Largest value in the window."""
        return max(self.deque) if self.deque else float("nan")

    @property
    def value(self) -> float:
        """Most recent value."""
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median,
            avg=self.avg,
            global_avg=self.global_avg,
            max=self.max,
            value=self.value,
        )


class MetricLogger:
    """A named collection of :class:`SmoothedValue` meters with a progress-printing iterator.

    ``clock`` (seconds, default ``time.time``) and ``print_fn`` (default ``print``) can be injected,
    e.g. to get reproducible timings in tests.
    """

    def __init__(
        self,
        delimiter: str = "\t",
        clock: Callable[[], float] | None = None,
        print_fn: Callable[[str], None] | None = None,
    ) -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self._clock = clock
        self._print_fn = print_fn

    def update(self, **kwargs: Any) -> None:
        """Record one value per meter; accepts Python numbers and one-element tensors."""
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            elif isinstance(value, np.generic):
                value = value.item()
            if not isinstance(value, Real):
                raise TypeError(f"meter {name!r} expects a number, got {type(value).__name__}")
            self.meters[name].update(value)

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters")
        if meters is not None and attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def global_avg(self) -> str:
        """Every meter's global average, formatted ``name: x.xxxx``."""
        return self.delimiter.join(
            f"{name}: {meter.global_avg:.4f}" for name, meter in self.meters.items()
        )

    def synchronize_between_processes(self) -> None:
        """Synchronise every meter's count and total across processes."""
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Register ``meter`` under ``name`` (to choose its window and format)."""
        self.meters[name] = meter

    def _emit(self, line: str) -> None:
        if self._print_fn is not None:
            self._print_fn(line)
        else:
            print(line)

    def log_every(
        self, iterable: Iterable[T], print_freq: int, header: str | None = None, first_index: int = 0
    ) -> Iterator[T]:
        """Yield from ``iterable``, printing progress every ``print_freq`` items and at the last one.

        A progress line for item ``i`` is printed after the loop body for that item has run, and
        reads (fields joined by the delimiter): header, ``[i/len]``, ``eta``, the meters, the mean
        iteration and data-loading times over the last 20 items, and ``max mem`` (MiB) on CUDA.
        ``first_index`` numbers the items from there (an epoch resumed part-way; ``len`` is the whole epoch).
        """
        clock = self._clock or time.time
        header = header or ""
        total = len(iterable)  # type: ignore[arg-type]
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        fields = [header, "[{index:>" + str(width) + "}/{total}]", "eta: {eta}", "{meters}",
                  "time: {time}", "data: {data}"]
        show_memory = torch.cuda.is_available()
        if show_memory:
            fields.append("max mem: {memory:.0f}")
        template = self.delimiter.join(fields)
        megabyte = 1024.0 * 1024.0

        start = clock()
        end = start
        for index, item in enumerate(iterable, start=first_index):
            data_time.update(clock() - end)
            yield item
            iter_time.update(clock() - end)
            if index % print_freq == 0 or index == total - 1:
                eta = format_time(iter_time.global_avg * (total - index))
                memory = torch.cuda.max_memory_allocated() / megabyte if show_memory else 0.0
                self._emit(
                    template.format(
                        index=index,
                        total=total,
                        eta=eta,
                        meters=str(self),
                        time=str(iter_time),
                        data=str(data_time),
                        memory=memory,
                    )
                )
            end = clock()
        elapsed = clock() - start
        self._emit(f"{header} Total time: {format_time(elapsed)} ({elapsed / max(total - first_index, 1):.4f} s / it)")


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs pickled globals that are not allowed for safe (weights-only) loading."""

    def __init__(self, path: str, unsafe_globals: list[str], detail: str = "") -> None:
        self.path = path
        self.unsafe_globals = list(unsafe_globals)
        names = ", ".join(self.unsafe_globals) if self.unsafe_globals else "unknown globals"
        message = (
            f"refusing to load checkpoint {path}: it requires the pickled global(s) {names}, which are "
            "not allowed when loading with weights_only=True. If you trust this file, load it with "
            "--trust_checkpoint (load_checkpoint(path, trust=True)), which runs the full unpickler."
        )
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written or did not read back intact."""


def remove_stale_partial_files(directory: str, name: str) -> None:
    """Remove the temporary files ``.<name>.<pid>.*.tmp`` that atomic writes of ``name`` by processes no
    longer alive (killed mid-write) left in ``directory``."""
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
    except PermissionError:
        return True
    return True


def verify_checkpoint_file(path: str) -> None:
    """Check that a zip-format checkpoint is complete: every member present and its CRC correct."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointWriteError(f"checkpoint {path} does not read back intact: {exc}") from None
    if bad is not None:
        raise CheckpointWriteError(f"checkpoint {path} does not read back intact: member {bad} is corrupt")


def save_checkpoint(obj: Any, path: str | os.PathLike[str], verify: bool = True) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically.

    The data goes to a temporary file in the same directory, is flushed, fsynced and (``verify``)
    read back and checked, and only then renamed over ``path``: an interrupted or failed write
    leaves any previous file untouched. Partial files left by killed earlier saves are removed.
    """
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    remove_stale_partial_files(directory, os.path.basename(target))
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if verify:
            verify_checkpoint_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_on_master(obj: Any, path: str | os.PathLike[str]) -> None:
    """:func:`save_checkpoint` on global rank 0 only."""
    if is_main_process():
        save_checkpoint(obj, path)


# --- OmegaConf stand-ins -----------------------------------------------------------------------------
# Original pretraining checkpoints store the Hydra/OmegaConf config object itself. The classes below
# are inert stand-ins registered under OmegaConf's import paths for weights-only unpickling: they only
# receive the pickled attribute dicts, and are converted to plain dicts/lists right after loading.
# A DictConfig/ListConfig keeps its children in ``_content``; a leaf node keeps its value in ``_val``.


class _OmegaConfStub:
    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _DictConfigStub(_OmegaConfStub):
    pass


class _ListConfigStub(_OmegaConfStub):
    pass


class _ValueNodeStub(_OmegaConfStub):
    pass


class _MetadataStub(_OmegaConfStub):
    pass


def _plain_defaultdict(*_args: Any) -> dict:
    """Stand-in for ``collections.defaultdict`` (OmegaConf's resolver cache): a plain dict.

    The weights-only unpickler only fills plain dicts, and the cache is discarded anyway.
    """
    return {}


_OMEGACONF_GLOBALS: list[tuple[Any, str]] = [
    (_DictConfigStub, "omegaconf.dictconfig.DictConfig"),
    (_ListConfigStub, "omegaconf.listconfig.ListConfig"),
    (_ValueNodeStub, "omegaconf.nodes.AnyNode"),
    (_ValueNodeStub, "omegaconf.nodes.StringNode"),
    (_ValueNodeStub, "omegaconf.nodes.IntegerNode"),
    (_ValueNodeStub, "omegaconf.nodes.FloatNode"),
    (_ValueNodeStub, "omegaconf.nodes.BooleanNode"),
    (_MetadataStub, "omegaconf.base.ContainerMetadata"),
    (_MetadataStub, "omegaconf.base.Metadata"),
    (typing.Any, "typing.Any"),
    (_plain_defaultdict, "collections.defaultdict"),
    (dict, "builtins.dict"),
    (list, "builtins.list"),
    (str, "builtins.str"),
    (int, "builtins.int"),
    (float, "builtins.float"),
    (bool, "builtins.bool"),
]
_OMEGACONF_NAMES = {name: cls for cls, name in _OMEGACONF_GLOBALS}


def omegaconf_safe_globals() -> list[tuple[Any, str]]:
    """The ``(object, "module.name")`` pairs allowed on top of torch's weights-only defaults."""
    return list(_OMEGACONF_GLOBALS)


def _omegaconf_to_plain(node: Any) -> Any:
    """Convert one stand-in (and everything below it) to plain Python values."""
    if isinstance(node, _ValueNodeStub):
        return _omegaconf_to_plain(node.__dict__.get("_val"))
    if isinstance(node, (_DictConfigStub, _ListConfigStub)):
        content = node.__dict__.get("_content")
        if isinstance(content, Mapping):
            return {key: _omegaconf_to_plain(value) for key, value in content.items()}
        if isinstance(content, (list, tuple)):
            return [_omegaconf_to_plain(value) for value in content]
        return content  # None, or the "???" / "${...}" strings of missing and interpolated values
    if isinstance(node, Mapping):
        return {key: _omegaconf_to_plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_omegaconf_to_plain(value) for value in node)
    return node


def _replace_stubs(obj: Any, seen: set[int] | None = None) -> Any:
    """Replace stand-ins inside ``obj``; containers without stand-ins are kept as they are."""
    if isinstance(obj, _OmegaConfStub):
        return _omegaconf_to_plain(obj)
    if isinstance(obj, torch.Tensor) or not isinstance(obj, (dict, list, tuple)):
        return obj
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            new = _replace_stubs(value, seen)
            if new is not value:
                obj[key] = new
        return obj
    if isinstance(obj, list):
        for index, value in enumerate(obj):
            new = _replace_stubs(value, seen)
            if new is not value:
                obj[index] = new
        return obj
    items = [_replace_stubs(value, seen) for value in obj]
    if all(new is old for new, old in zip(items, obj)):
        return obj
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


class _StubUnpickler(pickle.Unpickler):
    """Full unpickler that maps OmegaConf classes to the stand-ins (used with ``trust=True``)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("omegaconf."):
            stub = _OMEGACONF_NAMES.get(f"{module}.{name}")
            if stub is not None:
                return stub
        return super().find_class(module, name)


class _StubPickleModule:
    """A ``pickle_module`` for ``torch.load`` that uses :class:`_StubUnpickler`."""

    __name__ = "simla_stub_pickle"
    Unpickler = _StubUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _StubUnpickler(file, **kwargs).load()


def _is_zip_file(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def check_checkpoint_format(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` starts as a PyTorch checkpoint does: a zip archive
    (``torch.save``), a legacy pickle (protocol marker 0x80) or the legacy tar format."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[257:262] == b"ustar":
        return
    found = "the file is empty" if not head else f"it starts with {head[:24]!r}"
    raise ValueError(f"{path} is not a PyTorch checkpoint ({found}; expected the zip archive torch.save writes, "
                     "or a legacy pickle or tar file)")


_GLOBAL_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ALLOWED_PICKLE_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                           "torch.FloatStorage", "torch.LongStorage", "torch.DoubleStorage", "torch.HalfStorage",
                           "torch.IntStorage", "torch.BFloat16Storage", "torch.ByteStorage", "torch.BoolStorage",
                           "torch.storage.UntypedStorage", "torch._tensor._rebuild_from_type_v2"}


def _scan_pickles(path: str, count: int = 5) -> tuple[list[str], bool]:
    """The globals the pickles of a checkpoint refer to, read with ``pickletools`` (nothing is
    executed), and whether those pickles are complete (each reaches its STOP opcode).

    The legacy format starts with five pickles in a row (magic number, protocol, system info, the
    object, the storage keys); the zip format holds them as ``*.pkl`` members. Used to name what a
    refused file needs when the weights-only unpickler stops before reaching a global, and to tell a
    cut file from one that asks for a global.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            streams = [data]
    except (OSError, zipfile.BadZipFile, EOFError):
        return [], False
    found: list[str] = []
    complete = True
    for stream in streams:
        position = 0
        for index in range(count if len(streams) == 1 else 1):
            if index and position >= len(stream):
                break  # a plain pickle file: one pickle and nothing after it
            strings: list[str] = []
            memo: dict[int, Any] = {}
            stopped = False
            try:
                for opcode, arg, offset in pickletools.genops(stream[position:]):
                    name = opcode.name
                    if name in ("GLOBAL", "INST") and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
                    elif name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                        strings.append(memo[arg])
                    if name == "STOP":
                        position += offset + 1
                        stopped = True
                        break
            except Exception:  # damaged or foreign bytes
                stopped = False
            if not stopped:
                complete = False
                break
    unsafe = sorted({g for g in found if g not in _ALLOWED_PICKLE_GLOBALS and _GLOBAL_NAME.fullmatch(g)})
    return unsafe, complete


def _unsafe_globals(path: str, message: str) -> list[str]:
    found: list[str] = []
    try:
        with torch.serialization.safe_globals(omegaconf_safe_globals()):
            found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files or unreadable pickles: fall back to the message
        found = []
    if not found:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
    if not found and "Unsupported operand" in message:
        found = _scan_pickles(path)[0]
    return found


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only error message that says what was rejected."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line or "Can only" in line:
            return line.strip()[:300]
    return ""


def load_checkpoint(path: str | os.PathLike[str], trust: bool = False) -> Any:
    """Load a checkpoint on the CPU without running pickled code (unless ``trust`` is set).

    Reads with ``torch.load(map_location="cpu", weights_only=True)`` (memory-mapped for zip-format
    files). OmegaConf configs pickled into original pretraining checkpoints are returned as plain
    dicts/lists without importing ``omegaconf``. Raises ``FileNotFoundError`` for a missing file,
    :class:`UnsafeCheckpointError` when the pickle needs other globals, and ``RuntimeError`` for a
    truncated or corrupt file. ``trust=True`` loads with ``weights_only=False`` (full unpickling).
    """
    file = os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(2, "checkpoint file not found", file)
    use_mmap = _is_zip_file(file)
    try:
        if trust:
            obj = torch.load(
                file,
                map_location="cpu",
                weights_only=False,
                mmap=use_mmap,
                pickle_module=_StubPickleModule,
            )
        else:
            with torch.serialization.safe_globals(omegaconf_safe_globals()):
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = [] if trust else _unsafe_globals(file, message)
        unsafe = [name for name in found if _GLOBAL_NAME.fullmatch(name)]
        if (found and not unsafe) or (not trust and not _scan_pickles(file)[1]):
            # a "global" whose name is not a dotted identifier, or a pickle that ends before its STOP
            # opcode, is a cut or damaged file rather than one that asks for code
            raise RuntimeError(f"failed to read checkpoint {file}: the file is truncated or corrupt "
                               f"({_unpickler_reason(message) or message[:200]})") from None
        if not trust and (unsafe or "GLOBAL" in message or "allowlist" in message or "Unsupported" in message):
            reason = "" if unsafe else _unpickler_reason(message)
            raise UnsafeCheckpointError(file, unsafe, reason) from None
        raise RuntimeError(f"failed to read checkpoint {file}: {message}") from exc
    except PermissionError:
        raise
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            ImportError, OSError, struct.error, OverflowError, MemoryError) as exc:
        raise RuntimeError(f"failed to read checkpoint {file}: the file is truncated or corrupt "
                           f"({type(exc).__name__}: {exc})") from exc
    return _replace_stubs(obj)
