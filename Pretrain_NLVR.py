"""Text-assignment pretraining of the two-image NLVR model; each epoch's checkpoint starts ``NLVR.py``."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dataset import SafeCollate, create_dataset
from engine.checkpoint import load_checkpoint_into, resume_point
from engine.cli import base_parser
from engine.fit import FitPlan, fit
from engine.loop import EpochSettings
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_loader, training_parts
from models.simla.pretrain_nlvr import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer


def make_step(model: torch.nn.Module, tokenizer: Any, device: torch.device):
    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        image, caption = batch[0], batch[1]
        image = image.to(device, non_blocking=True)
        text = tokenizer(list(caption), padding="longest", truncation=True, max_length=25,
                         return_tensors="pt").to(device)
        return {"loss": model(image, text)}

    return step


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "nlvr_pretrain")
    config, device = ctx.config, ctx.device
    max_epoch, warmup_epochs = schedule_epochs(config)

    print("Creating dataset")
    dataset = create_dataset("pretrain", config)
    batch_size = int(config["batch_size"])
    loader, sampler = training_loader(args, config, dataset, batch_size, SafeCollate())

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    model = model.to(device)
    parts = training_parts(args, config, model, model, device, sampler, batch_size)
    checkpoint = None
    if args.checkpoint:
        checkpoint, _ = load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "Pretrain_NLVR.py",
                                             own=args.resume, trust=args.trust_checkpoint)
    point = resume_point(parts.checkpointer, checkpoint, args, len(loader))
    del checkpoint
    model, model_without_ddp = wrap_ddp(model, ctx, find_unused_parameters=True)

    step = make_step(model, tokenizer, device)
    plan = FitPlan(make_step=lambda epoch: step, loader=loader,
                   settings=EpochSettings.for_run(args, ("loss",), warmup_epochs=warmup_epochs, counted_batches=True),
                   epochs=max_epoch, schedule="epoch_start", save_each_epoch=True)
    fit(model, plan, parts, point, Tracker(args.log_backend, args.output_dir, config), args.output_dir, device,
        keep_last=args.save_every_steps > 0)


def get_parser() -> argparse.ArgumentParser:
    # the config loader matches file names case-insensitively (NLVR_Pretrain.yaml)
    return base_parser("SIMLA NLVR text-assignment pretraining", "./configs/NLVR_pretrain.yaml",
                       "output/NLVR_pretrain")


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
