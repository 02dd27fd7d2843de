"""Training data order that a checkpoint can resume mid-epoch, bit for bit, independent of workers."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """The SplitMix64 finaliser: a cheap, well-spread 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the sample at ``position`` of the global order of ``epoch`` (fits in 63 bits)."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (position & _MASK64)) >> 1


class ResumableSampler(Sampler):
    """``DistributedSampler`` order yielding ``(index, sample_seed)``; ``len()`` is always the full epoch."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for {num_replicas} processes")
        self.num_samples_total = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0
        self._start = 0
        self.per_rank = -(-self.num_samples_total // self.num_replicas) if self.num_samples_total else 0
        self.total_size = self.per_rank * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_at(self, samples: int) -> None:
        """Skip the first ``samples`` samples of this rank in the next iteration only."""
        if not 0 <= samples <= self.per_rank:
            raise ValueError(f"cannot start at sample {samples} of an epoch of {self.per_rank}")
        self._start = int(samples)

    def global_order(self) -> list[int]:
        """Dataset indices of the whole epoch, for all ranks, in order."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples_total, generator=generator).tolist()
        else:
            order = list(range(self.num_samples_total))
        padding = self.total_size - len(order)
        if padding > 0 and order:
            repeats = -(-padding // len(order))
            order += (order * repeats)[:padding]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        order = self.global_order()
        for local in range(start, self.per_rank):
            position = self.rank + local * self.num_replicas
            yield order[position], sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.per_rank

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "num_replicas": self.num_replicas,
                "num_samples": self.num_samples_total}


class SeededSamples(Dataset):
    """``ds[(index, seed)]`` loads ``index`` under its own seed (random, NumPy, torch CPU; restored after)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed % (2**32))
            torch.manual_seed(seed)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


def create_train_loader(dataset: Dataset, batch_size: int, num_workers: int,
                        collate_fn: Callable[[Sequence[Any]], Any] | None, seed: int, num_replicas: int = 1,
                        rank: int = 0, pin_memory: bool | None = None) -> tuple[DataLoader, ResumableSampler]:
    """A resumable shuffling training loader; returns ``(loader, sampler)`` (same ``seed`` everywhere)."""
    sampler = ResumableSampler(len(dataset), num_replicas=num_replicas, rank=rank,  # type: ignore[arg-type]
                               shuffle=True, seed=seed)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator()  # creating the iterator must not draw from the global generator
    generator.manual_seed(seed)
    loader = DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, collate_fn=collate_fn, drop_last=True,
                        persistent_workers=num_workers > 0, generator=generator)
    return loader, sampler
