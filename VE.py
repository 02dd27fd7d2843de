"""SNLI-VE fine-tuning and evaluation: entailment, neutral or contradiction of a hypothesis given an image."""

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
from models.simla.ve import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer
from utils import str2bool

SPLIT_KEYS = ("train_file", "val_file", "test_file")


def unpack(batch: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """``(images, hypotheses, labels)`` of a batch."""
    return batch


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "ve")
    config, device = ctx.config, ctx.device

    print("Creating dataset")
    datasets = create_dataset("ve", config)
    for key, dataset in zip(SPLIT_KEYS, datasets):
        if len(dataset) == 0 and (key != "train_file" or not args.evaluate):
            raise ValueError(f"config key {key!r}: {config[key]} holds no examples")
    train_bs, test_bs = int(config["batch_size_train"]), int(config["batch_size_test"])
    train_loader, train_sampler = training_loader(args, config, datasets[0], train_bs, datasets[0].collate_fn,
                                                  "examples", required=not args.evaluate)
    val_loader, test_loader = evaluation_loaders(args, datasets[1:], test_bs)

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    checkpoint = None
    if args.checkpoint:
        checkpoint, _ = load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "VE.py",
                                             own=args.evaluate or args.resume, trust=args.trust_checkpoint)
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx)
    parts = training_parts(args, config, model, model_without_ddp, device, train_sampler, train_bs)
    epochs, warmup_epochs = schedule_epochs(config)
    point = resume_point(parts.checkpointer, checkpoint if not args.evaluate else None, args, len(train_loader),
                         epoch_end_warmup=warmup_epochs)
    del checkpoint
    predict = classifier_predict(model_without_ddp, tokenizer, device, unpack)
    plan = FitPlan(
        make_step=lambda epoch: classifier_step(model, tokenizer, config, device, epoch, unpack), loader=train_loader,
        settings=EpochSettings.for_run(args, ("loss",), stats_format="{:.4f}", warmup_epochs=warmup_epochs,
                                       counted_batches=True),
        epochs=epochs, evaluate_only=bool(args.evaluate), best_key="best",
        evaluate=accuracy_evaluation(model_without_ddp, {"val": val_loader, "test": test_loader}, predict, device,
                                     args.amp))
    fit(model, plan, parts, point, Tracker(args.log_backend, args.output_dir, config), args.output_dir, device,
        keep_last=args.save_every_steps > 0)


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
