"""Metric logging: smoothed meters, the progress-printing :class:`MetricLogger` and ``log.txt`` lines."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from numbers import Real
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from utils import barrier, group_device, is_dist_avail_and_initialized

T = TypeVar("T")


def format_time(seconds: float) -> str:
    """Format a duration as ``H:MM:SS`` (fractions of a second are dropped)."""
    return str(datetime.timedelta(seconds=int(seconds)))


def append_log(output_dir: str | os.PathLike[str], stats: Mapping[str, Any] | str) -> None:
    """Append to ``output_dir/log.txt``: a dict as one JSON line; a string verbatim (no newline added)."""
    text = stats if isinstance(stats, str) else json.dumps(dict(stats)) + "\n"
    with open(os.path.join(os.fspath(output_dir), "log.txt"), "a") as handle:
        handle.write(text)


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
        stats = torch.tensor([self.count, self.total], dtype=torch.float64, device=group_device())
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
        return max(self.deque) if self.deque else float("nan")

    @property
    def value(self) -> float:
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
    """Named :class:`SmoothedValue` meters with a progress-printing iterator; ``clock``/``print_fn`` injectable."""

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
        """Yield from ``iterable`` with the original's progress lines; ``first_index``: a resumed epoch's."""
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
