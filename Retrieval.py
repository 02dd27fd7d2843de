"""SIMLA image-text retrieval fine-tuning (ITA + ITM) on COCO or Flickr30k, evaluated after every epoch."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dataset import create_dataset
from engine.checkpoint import load_checkpoint_into, resume_point
from engine.cli import base_parser
from engine.fit import Evaluation, FitPlan, fit
from engine.loop import EpochSettings
from engine.retrieval_eval import evaluation, itm_eval
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import evaluation_loaders, schedule_epochs, training_loader, training_parts
from models.simla.retrieval import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer
from utils import is_main_process, str2bool

LOSS_NAMES = ("loss_itm", "loss_ita")


def make_step(model: torch.nn.Module, tokenizer: Any, config: dict, device: torch.device, epoch: int):
    """The fine-tuning iteration; captions are not truncated, as in the original."""
    alpha_max = float(config["alpha"])
    ramp = bool(config["warm_up"]) and epoch == 0

    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        image, caption, idx = batch
        image = image.to(device, non_blocking=True)
        idx = idx.to(device, non_blocking=True)
        text = tokenizer(list(caption), padding="longest", max_length=30, return_tensors="pt").to(device)
        alpha = alpha_max * min(1.0, i / num_batches) if ramp else alpha_max
        loss_ita, loss_itm = model(image, text, alpha=alpha, idx=idx)
        return {"loss_itm": loss_itm, "loss_ita": loss_ita}

    return step


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "retrieval", extra_config={"freeze_visual_encoder": args.freeze_visual_encoder})
    config, device = ctx.config, ctx.device

    print("Creating retrieval dataset")
    train_dataset, _val_dataset, test_dataset = create_dataset("re", config)
    train_bs = int(config["batch_size_train"])
    train_loader, train_sampler = training_loader(args, config, train_dataset, train_bs, train_dataset.collate_fn,
                                                  "captions", required=not args.evaluate)
    # every process reads the whole split; the evaluation shares out the work itself
    (test_loader,) = evaluation_loaders(args, [test_dataset], int(config["batch_size_test"]), sharded=False)

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    checkpoint = None
    if args.checkpoint:
        checkpoint, _ = load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "Retrieval.py",
                                             trust=args.trust_checkpoint)
    elif args.resume:
        raise ValueError("--resume needs --checkpoint (the checkpoint_best.pth of the run to continue)")
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx)

    parts = training_parts(args, config, model, model_without_ddp, device, train_sampler, train_bs)
    epochs, warmup_epochs = schedule_epochs(config)
    point = resume_point(parts.checkpointer, checkpoint, args, len(train_loader), epoch_end_warmup=warmup_epochs)
    del checkpoint

    def evaluate(epoch: int) -> Evaluation:
        scores = evaluation(model_without_ddp, test_loader, tokenizer, device, config, amp=args.amp)
        if not is_main_process():
            return Evaluation()
        result = itm_eval(scores.score_i2t, scores.score_t2i, test_dataset.txt2img, test_dataset.img2txt)
        print(result)
        return Evaluation(log={f"test_{k}": v for k, v in result.items()},
                          track={f"test/{k}": v for k, v in result.items()}, score=result["r_mean"])

    plan = FitPlan(
        make_step=lambda epoch: make_step(model, tokenizer, config, device, epoch), loader=train_loader,
        settings=EpochSettings.for_run(args, LOSS_NAMES, meter_window=1, warmup_epochs=warmup_epochs,
                                       counted_batches=True),
        epochs=epochs, evaluate=evaluate, evaluate_only=args.evaluate, best_key="best_r_mean",
        best_epoch_default=point.epoch - 1 if args.resume else 0)
    fit(model, plan, parts, point, Tracker(args.log_backend, args.output_dir, config), args.output_dir, device,
        keep_last=args.save_every_steps > 0)


def get_parser() -> argparse.ArgumentParser:
    parser = base_parser("SIMLA image-text retrieval fine-tuning", "./configs/Retrieval_flickr.yaml",
                         "output/Retrieval_flickr")
    parser.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint on test_file and stop")
    parser.add_argument("--freeze_visual_encoder", default=False, type=str2bool,
                        help="keep the image encoder fixed (its momentum copy still follows it)")
    return parser


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
