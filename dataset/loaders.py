"""Distributed samplers and DataLoaders with the settings of the original SIMLA scripts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def _check_lengths(**lists: Sequence[Any]) -> int:
    # the original silently drops the tail of longer lists; a mismatch is a caller bug
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-dataset argument lists differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def create_sampler(
    datasets: Sequence[Dataset], shuffles: Sequence[bool], num_tasks: int, global_rank: int
) -> list[DistributedSampler]:
    """One ``DistributedSampler`` per dataset (seed 0, ``drop_last=False``: short ranks get padded)."""
    _check_lengths(datasets=datasets, shuffles=shuffles)
    return [
        DistributedSampler(dataset, num_replicas=num_tasks, rank=global_rank, shuffle=bool(shuffle))
        for dataset, shuffle in zip(datasets, shuffles)
    ]


def create_loader(
    datasets: Sequence[Dataset],
    samplers: Sequence[Sampler | None],
    batch_size: Sequence[int],
    num_workers: Sequence[int],
    is_trains: Sequence[bool],
    collate_fns: Sequence[Callable[[list[Any]], Any] | None],
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
) -> list[DataLoader]:
    """Build one DataLoader per dataset.

    Training loaders shuffle (without a sampler) and drop the last batch; evaluation loaders do neither
    and seed workers from their own generator so global draws don't depend on ``num_workers``.
    ``pin_memory`` defaults to CUDA availability.
    """
    _check_lengths(
        datasets=datasets,
        samplers=samplers,
        batch_size=batch_size,
        num_workers=num_workers,
        is_trains=is_trains,
        collate_fns=collate_fns,
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loaders = []
    for dataset, sampler, bs, workers, is_train, collate_fn in zip(
        datasets, samplers, batch_size, num_workers, is_trains, collate_fns
    ):
        persistent = workers > 0 if persistent_workers is None else (persistent_workers and workers > 0)
        loaders.append(
            DataLoader(
                dataset,
                batch_size=bs,
                num_workers=workers,
                pin_memory=pin_memory,
                sampler=sampler,
                shuffle=(sampler is None) if is_train else False,
                collate_fn=collate_fn,
                drop_last=bool(is_train),
                persistent_workers=persistent,
                generator=None if is_train else torch.Generator().manual_seed(0),
            )
        )
    return loaders
