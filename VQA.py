"""SIMLA visual question answering: fine-tune the answer decoder, then rank answers for the test split."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from dataset import create_dataset
from dataset.vqa import CountedVQACollate
from engine.checkpoint import ResumePoint, load_checkpoint_into, resume_point
from engine.cli import base_parser
from engine.fit import FitPlan, fit
from engine.loop import EpochSettings
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import evaluation_loaders, schedule_epochs, training_loader, training_parts
from engine.vqa_eval import evaluation, report_accuracy, save_result
from models.simla.vqa import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer
from utils import is_main_process

LOSS_NAMES = ("loss",)


def make_step(model: torch.nn.Module, tokenizer: Any, config: dict, device: torch.device, epoch: int):
    alpha_max = float(config["alpha"])
    warm_up = bool(config["warm_up"])

    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        image, question, answer, weights, counts = batch
        image = image.to(device, non_blocking=True)
        weights = weights.to(device, non_blocking=True)
        question_input = tokenizer(list(question), padding="longest", truncation=True, max_length=25,
                                   return_tensors="pt").to(device)
        answer_input = tokenizer(list(answer), padding="longest", return_tensors="pt").to(device)
        alpha = alpha_max if epoch > 0 or not warm_up else alpha_max * min(1.0, i / num_batches)
        loss = model(image, question_input, answer_input, train=True, alpha=alpha, k=counts, weights=weights)
        return {"loss": loss}

    return step


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "vqa")
    config, device = ctx.config, ctx.device
    result_dir = os.path.join(args.output_dir, "result")
    os.makedirs(result_dir, exist_ok=True)

    print("Creating vqa datasets")
    datasets = create_dataset("vqa", config)
    train_dataset, test_dataset = datasets
    batch_size = int(config["batch_size_train"])
    train_loader, train_sampler = training_loader(args, config, train_dataset, batch_size, CountedVQACollate(),
                                                  "questions", required=not args.evaluate)
    (test_loader,) = evaluation_loaders(args, [test_dataset], int(config["batch_size_test"]))

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(text_encoder=args.text_encoder, text_decoder=args.text_decoder, tokenizer=tokenizer,
                  config=config)
    model = model.to(device)
    parts = training_parts(args, config, model, model, device, train_sampler, batch_size)
    checkpoint = None
    if args.checkpoint:
        checkpoint, _ = load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "VQA.py",
                                             own=args.evaluate or args.resume, trust=args.trust_checkpoint)
    point = ResumePoint() if args.evaluate else resume_point(parts.checkpointer, checkpoint, args, len(train_loader))
    del checkpoint
    unused = model.visual_encoder.mask_token is not None  # an unused mask token would make DDP fail
    model, model_without_ddp = wrap_ddp(model, ctx, find_unused_parameters=unused)

    def answer_test_questions(last_epoch: int) -> None:
        vqa_result = evaluation(model_without_ddp, test_loader, tokenizer, device, config, args.amp)
        _, merged = save_result(vqa_result, result_dir, f"vqa_result_epoch{last_epoch}",
                                question_ids=test_dataset.question_ids())
        if is_main_process() and merged is not None:
            report_accuracy(merged, test_dataset, args.output_dir, last_epoch)

    epochs, warmup_epochs = schedule_epochs(config)
    plan = FitPlan(make_step=lambda epoch: make_step(model, tokenizer, config, device, epoch), loader=train_loader,
                   settings=EpochSettings.for_run(args, LOSS_NAMES, meter_window=1, warmup_epochs=warmup_epochs,
                                                  counted_batches=True),
                   epochs=epochs, evaluate_only=args.evaluate, schedule="epoch_start", save_each_epoch=True)
    fit(model, plan, parts, point, Tracker(args.log_backend, args.output_dir, config), args.output_dir, device,
        keep_last=args.save_every_steps > 0, after=answer_test_questions)


def get_parser() -> argparse.ArgumentParser:
    parser = base_parser("SIMLA visual question answering", "./configs/VQA.yaml", "output/vqa")
    parser.add_argument("--evaluate", action="store_true",
                        help="only answer the test questions with --checkpoint (a VQA checkpoint)")
    parser.add_argument("--text_decoder", default="bert-base-uncased",
                        help="Hugging Face BERT name or folder initialising the answer decoder")
    return parser


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    os.makedirs(os.path.join(cli_args.output_dir, "result"), exist_ok=True)
    run_entry(main, cli_args)
