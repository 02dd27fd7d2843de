"""NLVR2 fine-tuning from a ``Pretrain_NLVR.py`` checkpoint: is a statement true of a pair of images?"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dataset import create_dataset
from engine.accuracy import accuracy_evaluation, classifier_predict, classifier_step
from engine.checkpoint import load_checkpoint_into, resume_point
from engine.cli import base_parser
from engine.fit import FitPlan, fit
from engine.loop import EpochSettings
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import evaluation_loaders, schedule_epochs, training_loader, training_parts
from models.simla.nlvr import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer

SPLIT_KEYS = ("train_file", "val_file", "test_file")


def unpack(batch: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Both images of every pair in one batch (first images, then second images), sentences, labels."""
    image0, image1, text, targets = batch
    return torch.cat([image0, image1], dim=0), text, targets


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "nlvr")
    config, device = ctx.config, ctx.device

    print("Creating dataset")
    datasets = create_dataset("nlvr", config)
    for key, dataset in zip(SPLIT_KEYS, datasets):
        if len(dataset) == 0:
            raise ValueError(f"config key {key!r}: {config[key]} holds no examples")
    batch_size = int(config["batch_size"])
    train_loader, train_sampler = training_loader(args, config, datasets[0], batch_size, datasets[0].collate_fn,
                                                  "examples")
    val_loader, test_loader = evaluation_loaders(args, datasets[1:], batch_size)

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    checkpoint = None
    if args.checkpoint:
        checkpoint, _ = load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "NLVR.py",
                                             trust=args.trust_checkpoint)
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx)
    parts = training_parts(args, config, model, model_without_ddp, device, train_sampler, batch_size)
    epochs, warmup_epochs = schedule_epochs(config)
    point = resume_point(parts.checkpointer, checkpoint, args, len(train_loader), epoch_end_warmup=warmup_epochs)
    del checkpoint
    predict = classifier_predict(model_without_ddp, tokenizer, device, unpack)
    plan = FitPlan(
        make_step=lambda epoch: classifier_step(model, tokenizer, config, device, epoch, unpack), loader=train_loader,
        settings=EpochSettings.for_run(args, ("loss",), stats_format="{:.4f}", warmup_epochs=warmup_epochs,
                                       counted_batches=True),
        epochs=epochs, best_key="best", best_file=None,
        evaluate=accuracy_evaluation(model_without_ddp, {"val": val_loader, "test": test_loader}, predict, device,
                                     args.amp))
    fit(model, plan, parts, point, Tracker(args.log_backend, args.output_dir, config), args.output_dir, device,
        keep_last=args.save_every_steps > 0)


def get_parser() -> argparse.ArgumentParser:
    return base_parser("SIMLA NLVR2 fine-tuning", "./configs/NLVR.yaml", "output/NLVR")


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
