"""NLVR2 fine-tuning: is a statement true of a pair of images?

python -m torch.distributed.launch --nproc_per_node=8 --use_env NLVR.py --config ./configs/NLVR.yaml \
    --output_dir output/NLVR --checkpoint [Pretrain_NLVR.py checkpoint]
(also torchrun, SLURM, or a plain single process on a CPU or GPU)

Every epoch trains, then evaluates the val and test splits; a checkpoint ``checkpoint_%02d.pth`` is
written whenever the val accuracy improves. As in the original there is no ``--evaluate``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

import torch

from dataset import create_dataset, create_loader, create_sampler
from dataset.resumable import create_train_loader
from engine.accuracy import evaluate_accuracy
from engine.checkpoint import (
    CheckpointFit,
    checkpoint_path,
    interpolate_pos_embeds,
    load_fitting_state,
    read_checkpoint,
)
from engine.cli import base_parser
from engine.loop import EpochSettings, train_epoch
from engine.resume import resume_point
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_parts
from models.simla.nlvr import PRETRAIN_NLVR_CHECKPOINT_MISSING, PRETRAIN_NLVR_CHECKPOINT_UNEXPECTED, SIMLA
from models.tokenization import build_tokenizer
from scheduler import epoch_end_step
from utils import append_log, barrier, get_rank, get_world_size, is_main_process

SPLIT_KEYS = ("train_file", "val_file", "test_file")


def tokenize(tokenizer: Any, sentences: Any, device: torch.device) -> Any:
    return tokenizer(list(sentences), padding="longest", return_tensors="pt").to(device)


def make_step(model: torch.nn.Module, tokenizer: Any, config: dict, device: torch.device, epoch: int):
    """One training iteration: both images of every pair in one batch, the sentence, alpha ramp."""
    alpha_max = float(config["alpha"])
    ramp = epoch == 0 and bool(config["warm_up"])

    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        image0, image1, text, targets = batch
        images = torch.cat([image0, image1], dim=0).to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        alpha = alpha_max * min(1.0, i / num_batches) if ramp else alpha_max
        return {"loss": model(images, tokenize(tokenizer, text, device), targets=targets, train=True, alpha=alpha)}

    return step


def make_predict(model: torch.nn.Module, tokenizer: Any, device: torch.device):
    def predict(batch) -> tuple[torch.Tensor, torch.Tensor]:
        image0, image1, text, targets = batch
        images = torch.cat([image0, image1], dim=0).to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        return model(images, tokenize(tokenizer, text, device), targets=targets, train=False), targets

    return predict


def load_nlvr_checkpoint(model: SIMLA, path: str, config: dict, trust: bool) -> dict[str, Any]:
    """Load a ``Pretrain_NLVR.py`` (or ``NLVR.py``) checkpoint without renaming keys.

    The original makes the momentum models copies of the freshly built online models *before*
    loading, so momentum weights absent from the checkpoint stay at their initial values;
    ``copy_momentum_after_load: true`` copies the loaded weights instead. Any other difference
    from the model than those of a ``Pretrain_NLVR.py`` checkpoint is refused.
    """
    checkpoint = read_checkpoint(path, trust=trust)
    state_dict = dict(checkpoint["model"])
    interpolate_pos_embeds(state_dict, model, names=("visual_encoder",))
    after = bool(config.get("copy_momentum_after_load", False))
    if not after:
        model.copy_params()
    # a Pretrain_NLVR.py checkpoint lacks the classifiers and momentum models; an NLVR.py one fits as it is
    fit = CheckpointFit("NLVR.py", "a Pretrain_NLVR.py or NLVR.py checkpoint",
                        missing=PRETRAIN_NLVR_CHECKPOINT_MISSING, unexpected=PRETRAIN_NLVR_CHECKPOINT_UNEXPECTED)
    print(load_fitting_state(model, state_dict, path, fit))
    if after:
        model.copy_params()
    return checkpoint


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "nlvr")
    config, device = ctx.config, ctx.device

    print("Creating dataset")
    datasets = create_dataset("nlvr", config)
    for key, dataset in zip(SPLIT_KEYS, datasets):
        if len(dataset) == 0:
            raise ValueError(f"config key {key!r}: {config[key]} holds no examples")
    batch_size = int(config["batch_size"])
    train_loader, train_sampler = create_train_loader(datasets[0], batch_size, args.num_workers,
                                                      datasets[0].collate_fn, seed=args.seed,
                                                      num_replicas=get_world_size(), rank=get_rank())
    eval_samplers = (create_sampler(datasets[1:], [False, False], get_world_size(), get_rank())
                     if ctx.distributed else [None, None])
    val_loader, test_loader = create_loader(
        datasets[1:], eval_samplers, batch_size=[batch_size] * 2, num_workers=[args.num_workers] * 2,
        is_trains=[False, False], collate_fns=[None, None])
    if len(train_loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(datasets[0])} examples give no full batch of "
                         f"{batch_size} per process")

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    checkpoint = load_nlvr_checkpoint(model, args.checkpoint, config, args.trust_checkpoint) if args.checkpoint \
        else None
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx)
    optimizer, scheduler, scaler, checkpointer = training_parts(args, config, model, model_without_ddp, device,
                                                                train_sampler, batch_size)
    max_epoch, warmup_epochs = schedule_epochs(config)
    settings = EpochSettings.for_run(args, ("loss",), stats_format="{:.4f}", warmup_epochs=warmup_epochs,
                                     counted_batches=True)
    point = resume_point(checkpointer, checkpoint, args, len(train_loader), epoch_end_warmup=warmup_epochs)
    del checkpoint
    best, best_epoch = float(point.extra.get("best", 0.0)), int(point.extra.get("best_epoch", 0))
    predict = make_predict(model_without_ddp, tokenizer, device)
    tracker = Tracker(args.log_backend, args.output_dir, config)
    print("Start training")
    start_time = time.time()
    checkpointer.start(point)
    for epoch in range(point.epoch, max_epoch):
        step = make_step(model, tokenizer, config, device, epoch)
        train_stats = train_epoch(model, train_loader, optimizer, scheduler, epoch, device, step, settings,
                                  scaler=scaler, checkpointer=checkpointer, point=point, tracker=tracker,
                                  save_extra={"best": best, "best_epoch": best_epoch})
        val_stats = evaluate_accuracy(model_without_ddp, val_loader, predict, device, args.amp)
        test_stats = evaluate_accuracy(model_without_ddp, test_loader, predict, device, args.amp)
        tracker.log({"val_acc": float(val_stats["acc"]), "test_acc": float(test_stats["acc"])},
                    (epoch + 1) * len(train_loader))
        improved = float(val_stats["acc"]) > best
        if improved:
            best, best_epoch = float(val_stats["acc"]), epoch
            checkpointer.save(checkpoint_path(args.output_dir, epoch), epoch, best=best, best_epoch=best_epoch)
        if is_main_process():
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"val_{k}": v for k, v in val_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()},
                         "epoch": epoch}
            append_log(args.output_dir, log_stats)
        epoch_end_step(scheduler, epoch, warmup_epochs)
        checkpointer.finish_epoch(epoch, keep_last=args.save_every_steps > 0, best=best, best_epoch=best_epoch)
        barrier()
    tracker.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if is_main_process():
        append_log(args.output_dir, f"best epoch: {best_epoch}")


def get_parser() -> argparse.ArgumentParser:
    return base_parser("SIMLA NLVR2 fine-tuning", "./configs/NLVR.yaml", "output/NLVR")


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
