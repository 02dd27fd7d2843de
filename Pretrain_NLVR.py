"""Text-assignment pretraining of the two-image NLVR model, starting from a SIMLA pretraining checkpoint.

python -m torch.distributed.launch --nproc_per_node=8 --use_env Pretrain_NLVR.py \
    --config ./configs/NLVR_pretrain.yaml --output_dir output/NLVR_pretrain --checkpoint [pretrained checkpoint]
(also torchrun, SLURM, or a plain single process on a CPU or GPU)

The checkpoint's text-encoder layers 0-5 keep their index and layers 6-11 are each copied into two
consecutive layers (6-17) of the 18-layer NLVR encoder. Every epoch writes ``checkpoint_%02d.pth``,
the starting point of ``NLVR.py``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

import torch

from dataset import SafeCollate, create_dataset
from dataset.resumable import create_train_loader
from engine.checkpoint import (
    PRETRAINING_ONLY_KEYS,
    CheckpointFit,
    checkpoint_path,
    interpolate_pos_embeds,
    load_fitting_state,
    load_model_state,
    read_checkpoint,
)
from engine.cli import base_parser
from engine.loop import EpochSettings, train_epoch
from engine.resume import ResumePoint
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_parts
from models.simla.nlvr import nlvr_layout
from models.simla.pretrain_nlvr import PRETRAIN_CHECKPOINT_MISSING, SIMLA, pretrain_to_nlvr_state_dict
from models.tokenization import build_tokenizer
from scheduler import epoch_start_step
from utils import append_log, barrier, get_rank, get_world_size, is_main_process


def make_step(model: torch.nn.Module, tokenizer: Any, device: torch.device):
    """One iteration: tokenize the captions (at most 25 tokens) and compute the assignment loss."""

    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        # the pretraining dataset also yields the d-VAE view and the patch mask, unused here
        image, caption = batch[0], batch[1]
        image = image.to(device, non_blocking=True)
        text = tokenizer(list(caption), padding="longest", truncation=True, max_length=25,
                         return_tensors="pt").to(device)
        return {"loss": model(image, text)}

    return step


def load_pretraining_checkpoint(model: SIMLA, path: str, config: dict, trust: bool) -> None:
    """Load a SIMLA pretraining checkpoint with the layer duplication of the original script; only the
    text-assignment head and token-type embeddings may be missing, only pretraining-only entries extra."""
    checkpoint = read_checkpoint(path, trust=trust)
    state_dict = dict(checkpoint["model"])
    interpolate_pos_embeds(state_dict, model, names=("visual_encoder",))
    num_layers, split = nlvr_layout(config)
    state_dict = pretrain_to_nlvr_state_dict(state_dict, num_layers, split)
    fit = CheckpointFit("Pretrain_NLVR.py", "a pretraining checkpoint", missing=PRETRAIN_CHECKPOINT_MISSING,
                        unexpected=PRETRAINING_ONLY_KEYS)
    print(load_fitting_state(model, state_dict, path, fit))


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "nlvr_pretrain")
    config, device = ctx.config, ctx.device
    max_epoch, warmup_epochs = schedule_epochs(config)

    print("Creating dataset")
    dataset = create_dataset("pretrain", config)
    batch_size = int(config["batch_size"])
    # the original used the default collate, which fails on an unreadable image; replace it instead
    loader, sampler = create_train_loader(dataset, batch_size, args.num_workers, SafeCollate(), seed=args.seed,
                                          num_replicas=get_world_size(), rank=get_rank())
    if len(loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(dataset)} samples give no full batch of "
                         f"{config['batch_size']} per process")

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    model = model.to(device)
    optimizer, scheduler, scaler, checkpointer = training_parts(args, config, model, model, device, sampler,
                                                                batch_size)
    point = ResumePoint()
    if args.checkpoint and args.resume:
        # a checkpoint of this script: same keys, nothing to convert
        checkpoint = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        point = checkpointer.restore(checkpoint, args.checkpoint, len(loader))
        load_model_state(model, dict(checkpoint["model"]), args.checkpoint, strict=True)
        del checkpoint
    elif args.checkpoint:
        load_pretraining_checkpoint(model, args.checkpoint, config, args.trust_checkpoint)
    # vision_proj, text_proj and temp get no gradient
    model, model_without_ddp = wrap_ddp(model, ctx, find_unused_parameters=True)

    settings = EpochSettings.for_run(args, ("loss",), warmup_epochs=warmup_epochs, counted_batches=True)
    step = make_step(model, tokenizer, device)
    tracker = Tracker(args.log_backend, args.output_dir, config)
    print("Start training")
    start_time = time.time()
    checkpointer.start(point)
    for epoch in range(point.epoch, max_epoch):
        if point.start_step(epoch) == 0:
            epoch_start_step(scheduler, epoch, warmup_epochs)
        train_stats = train_epoch(model, loader, optimizer, scheduler, epoch, device, step, settings,
                                  scaler=scaler, checkpointer=checkpointer, point=point, tracker=tracker)
        checkpointer.finish_epoch(epoch, checkpoint_path(args.output_dir, epoch),
                                  keep_last=args.save_every_steps > 0)
        if is_main_process():
            append_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch})
        barrier()
    tracker.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def get_parser() -> argparse.ArgumentParser:
    # the original's default names configs/NLVR_pretrain.yaml; the file is NLVR_Pretrain.yaml, and the
    # config loader matches file names case-insensitively, so both spellings work
    return base_parser("SIMLA NLVR text-assignment pretraining", "./configs/NLVR_pretrain.yaml",
                       "output/NLVR_pretrain")


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
