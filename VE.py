"""SNLI-VE fine-tuning and evaluation: entailment, neutral or contradiction of a hypothesis given an image.

python -m torch.distributed.launch --nproc_per_node=8 --use_env VE.py --config ./configs/VE.yaml \
    --output_dir output/VE --checkpoint [pretrained checkpoint]
python VE.py --config ./configs/VE.yaml --output_dir output/VE_eval --checkpoint output/VE/checkpoint_best.pth \
    --evaluate
(also torchrun, SLURM, or a plain single process on a CPU or GPU)

Training evaluates the val and test splits after every epoch and keeps ``checkpoint_best.pth`` (best
val accuracy). ``--evaluate`` loads a VE checkpoint as it is and evaluates once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

import torch

from dataset import create_dataset, create_loader, create_sampler
from dataset.resumable import create_train_loader
from engine.accuracy import evaluate_accuracy
from engine.checkpoint import (
    PRETRAINING_ONLY_KEYS,
    CheckpointFit,
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
from models.simla.ve import PRETRAIN_CHECKPOINT_MISSING, SIMLA, strip_bert_prefix
from models.tokenization import build_tokenizer
from scheduler import epoch_end_step
from utils import append_log, barrier, get_rank, get_world_size, is_main_process, str2bool

SPLIT_KEYS = ("train_file", "val_file", "test_file")
BEST_CHECKPOINT = "checkpoint_best.pth"


def tokenize(tokenizer: Any, sentences: Any, device: torch.device) -> Any:
    return tokenizer(list(sentences), padding="longest", return_tensors="pt").to(device)


def make_step(model: torch.nn.Module, tokenizer: Any, config: dict, device: torch.device, epoch: int):
    """One training iteration; alpha ramps up in epoch 0 only with ``warm_up: true``."""
    alpha_max = float(config["alpha"])
    ramp = epoch == 0 and bool(config["warm_up"])

    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        images, text, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        alpha = alpha_max * min(1.0, i / num_batches) if ramp else alpha_max
        return {"loss": model(images, tokenize(tokenizer, text, device), targets=targets, train=True, alpha=alpha)}

    return step


def make_predict(model: torch.nn.Module, tokenizer: Any, device: torch.device):
    def predict(batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, text, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        return model(images, tokenize(tokenizer, text, device), targets=targets, train=False), targets

    return predict


def load_ve_checkpoint(model: SIMLA, path: str, config: dict, evaluate: bool, trust: bool) -> dict[str, Any]:
    """A pretraining checkpoint (``bert.`` removed from its keys) or, with ``evaluate`` (also used to
    resume), a VE checkpoint loaded as it is; one that does not fit the model (beyond the new heads
    and the pretraining-only entries) is refused. Returns the checkpoint."""
    checkpoint = read_checkpoint(path, trust=trust)
    state_dict = dict(checkpoint["model"])
    interpolate_pos_embeds(state_dict, model, names=("visual_encoder",))
    fit = CheckpointFit("VE.py", "a VE.py checkpoint")
    if not evaluate:
        if config["distill"]:
            interpolate_pos_embeds(state_dict, model, names=("visual_encoder_m",))
        state_dict = strip_bert_prefix(state_dict)
        fit = CheckpointFit("VE.py", "a pretraining (or VE.py) checkpoint",
                            missing=PRETRAIN_CHECKPOINT_MISSING, unexpected=PRETRAINING_ONLY_KEYS)
    print(load_fitting_state(model, state_dict, path, fit))
    return checkpoint


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "ve")
    config, device = ctx.config, ctx.device

    print("Creating dataset")
    datasets = create_dataset("ve", config)
    for key, dataset in zip(SPLIT_KEYS, datasets):
        if len(dataset) == 0 and (key != "train_file" or not args.evaluate):
            raise ValueError(f"config key {key!r}: {config[key]} holds no examples")
    train_bs, test_bs = int(config["batch_size_train"]), int(config["batch_size_test"])
    train_loader, train_sampler = create_train_loader(datasets[0], train_bs, args.num_workers,
                                                      datasets[0].collate_fn, seed=args.seed,
                                                      num_replicas=get_world_size(), rank=get_rank())
    eval_samplers = (create_sampler(datasets[1:], [False, False], get_world_size(), get_rank())
                     if ctx.distributed else [None, None])
    val_loader, test_loader = create_loader(
        datasets[1:], eval_samplers, batch_size=[test_bs, test_bs], num_workers=[args.num_workers] * 2,
        is_trains=[False, False], collate_fns=[None, None])
    if not args.evaluate and len(train_loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(datasets[0])} examples give no full batch of "
                         f"{train_bs} per process")

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    checkpoint = None
    if args.checkpoint:
        checkpoint = load_ve_checkpoint(model, args.checkpoint, config, args.evaluate or args.resume,
                                        args.trust_checkpoint)
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx)
    optimizer, scheduler, scaler, checkpointer = training_parts(args, config, model, model_without_ddp, device,
                                                                train_sampler, train_bs)
    max_epoch, warmup_epochs = schedule_epochs(config)
    settings = EpochSettings.for_run(args, ("loss",), stats_format="{:.4f}", warmup_epochs=warmup_epochs,
                                     counted_batches=True)
    point = resume_point(checkpointer, checkpoint if not args.evaluate else None, args, len(train_loader),
                         epoch_end_warmup=warmup_epochs)
    del checkpoint
    best, best_epoch = float(point.extra.get("best", 0.0)), int(point.extra.get("best_epoch", 0))
    predict = make_predict(model_without_ddp, tokenizer, device)
    tracker = Tracker(args.log_backend, args.output_dir, config)
    print("Start training")
    start_time = time.time()
    checkpointer.start(point)
    for epoch in range(point.epoch, max_epoch):
        train_stats: dict[str, Any] = {}
        if not args.evaluate:
            step = make_step(model, tokenizer, config, device, epoch)
            train_stats = train_epoch(model, train_loader, optimizer, scheduler, epoch, device, step, settings,
                                      scaler=scaler, checkpointer=checkpointer, point=point, tracker=tracker,
                                      save_extra={"best": best, "best_epoch": best_epoch})
        val_stats = evaluate_accuracy(model_without_ddp, val_loader, predict, device, args.amp)
        test_stats = evaluate_accuracy(model_without_ddp, test_loader, predict, device, args.amp)
        tracker.log({"val_acc": float(val_stats["acc"]), "test_acc": float(test_stats["acc"])},
                    (epoch + 1) * len(train_loader))
        if is_main_process():
            append_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                         **{f"val_{k}": v for k, v in val_stats.items()},
                                         **{f"test_{k}": v for k, v in test_stats.items()},
                                         "epoch": epoch})
        if args.evaluate:
            break
        if float(val_stats["acc"]) > best:
            best, best_epoch = float(val_stats["acc"]), epoch
            checkpointer.save(os.path.join(args.output_dir, BEST_CHECKPOINT), epoch, best=best,
                              best_epoch=best_epoch)
        epoch_end_step(scheduler, epoch, warmup_epochs)
        checkpointer.finish_epoch(epoch, keep_last=args.save_every_steps > 0, best=best, best_epoch=best_epoch)
        barrier()
    tracker.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if is_main_process():
        append_log(args.output_dir, f"best epoch: {best_epoch}")


def get_parser() -> argparse.ArgumentParser:
    parser = base_parser("SIMLA SNLI-VE fine-tuning", "./configs/VE.yaml", "output/VE")
    parser.add_argument("--evaluate", nargs="?", const=True, default=False, type=str2bool,
                        help="only evaluate --checkpoint (a VE checkpoint, loaded without renaming)")
    return parser


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
