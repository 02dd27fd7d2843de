"""Optimizer, LR schedule, grad scaler and checkpointer every training script builds around its model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from configs import as_written
from dataset import create_loader, create_sampler
from dataset.resumable import create_train_loader
from engine.checkpoint import TrainingCheckpointer
from models.compile import compile_regions
from models.precision import grad_scaler
from optim import create_optimizer
from scheduler import create_scheduler
from utils import get_rank, get_world_size


class TrainingParts(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    checkpointer: TrainingCheckpointer


def training_parts(args: Any, config: Mapping[str, Any], model: torch.nn.Module, state_model: torch.nn.Module,
                   device: torch.device, sampler: Any, batch_size: int) -> TrainingParts:
    """Optimizer, scheduler, grad scaler (``--amp``) and checkpointer of a training run; ``--compile`` compiles
    ``model``'s blocks in place.

    Parameters are grouped from ``model`` as the original (a DDP wrapper gets the original's wrapped
    grouping); ``state_model`` is what checkpoints hold; ``sampler``/``batch_size`` are for mid-epoch saves.
    """
    print(starting_weights(args, config, state_model))
    if args.compile:
        regions = compile_regions(model, args.compile_mode, args.compile_backend)
        print(f"--compile: {regions} regions (ViT blocks, BERT layers) compiled in place with torch.compile "
              f"(backend {args.compile_backend}, mode {args.compile_mode or 'default'})")
    optimizer = create_optimizer(config["optimizer"], model)
    scheduler, _ = create_scheduler(config["schedular"], optimizer)
    scaler = grad_scaler(device, args.amp)
    checkpointer = TrainingCheckpointer(args.output_dir, state_model, optimizer, scheduler, as_written(config), scaler,
                                        sampler, batch_size)
    return TrainingParts(optimizer, scheduler, scaler, checkpointer)


def starting_weights(args: Any, config: Mapping[str, Any], model: torch.nn.Module) -> str:
    """One line naming the starting weights: ``--checkpoint``, random, or the DeiT/BERT initialisation."""
    if args.checkpoint:
        resumed = " (resumed)" if getattr(args, "resume", False) else ""
        return f"Starting weights: checkpoint {args.checkpoint}{resumed}"
    if config["from_scratch"]:
        return "Starting weights: random (from_scratch: true, no --checkpoint)"
    deit = getattr(getattr(model, "visual_encoder", None), "init_source", None)
    parts = [f"ViT from DeiT {deit}" if deit else "random ViT",
             f"text encoder from BERT {args.text_encoder} (--text_encoder)"]
    if getattr(args, "text_decoder", None):
        parts.append(f"answer decoder from BERT {args.text_decoder} (--text_decoder)")
    return f"Starting weights: {', '.join(parts)}; no --checkpoint"


def schedule_epochs(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(epochs, warmup_epochs)`` of the config's ``schedular:`` section (no warm-up when null)."""
    schedule = config["schedular"]
    return int(schedule["epochs"]), int(schedule["warmup_epochs"] or 0)


def training_loader(args: Any, config: Mapping[str, Any], dataset: Any, batch_size: int, collate_fn: Any,
                    items: str = "samples", required: bool = True) -> tuple[DataLoader, Any]:
    """The run's resumable training loader and sampler; with ``required``, refuse less than one batch per process."""
    loader, sampler = create_train_loader(dataset, batch_size, args.num_workers, collate_fn, seed=args.seed,
                                          num_replicas=get_world_size(), rank=get_rank(), pin_memory=pins_memory(args))
    if required and len(loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(dataset)} {items} give no full batch of {batch_size} "
                         "per process")
    return loader, sampler


def evaluation_loaders(args: Any, datasets: Sequence[Any], batch_size: int, sharded: bool = True
                       ) -> list[DataLoader]:
    """Loaders over evaluation splits; ``sharded``: in a distributed run each process reads its share."""
    count = len(datasets)
    samplers = (create_sampler(datasets, [False] * count, get_world_size(), get_rank())
                if sharded and getattr(args, "distributed", False) else [None] * count)
    return create_loader(datasets, samplers, batch_size=[batch_size] * count, num_workers=[args.num_workers] * count,
                         is_trains=[False] * count, collate_fns=[None] * count, pin_memory=pins_memory(args))


def pins_memory(args: Any) -> bool:
    """Loaders pin their batches (for ``non_blocking`` copies) only when ``--device`` is an available GPU."""
    return torch.device(getattr(args, "device", "cpu")).type == "cuda" and torch.cuda.is_available()
