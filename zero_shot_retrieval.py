"""SIMLA image-text retrieval evaluation of a checkpoint without fine-tuning."""

from __future__ import annotations

import argparse
import datetime
import os
import time

import numpy as np
import torch

from dataset import create_dataset
from engine.checkpoint import load_checkpoint_into
from engine.cli import base_parser
from engine.metrics import append_log
from engine.retrieval_eval import RetrievalScores, evaluation, itm_eval
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.training import evaluation_loaders
from models.simla.retrieval import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer
from optim import create_optimizer
from scheduler import create_scheduler, epoch_end_step
from utils import barrier, is_main_process

SIMS_FILES = ("sims_matrix.npy", "score_matrix_i2t.npy", "score_matrix_t2i.npy")


def save_similarities(folder: str, scores: RetrievalScores) -> list[str]:
    """Write the ITC similarities ``(I, T)`` and the ITM score matrices ``(I, T)``, ``(T, I)``."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in SIMS_FILES]
    for path, matrix in zip(paths, (scores.sims, scores.score_i2t, scores.score_t2i)):
        np.save(path, matrix)
    return paths


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "zero_shot_retrieval")
    config, device = ctx.config, ctx.device

    print("Creating retrieval dataset")
    _train_dataset, _val_dataset, test_dataset = create_dataset("re", config)
    # every process reads the whole split and encodes its own share of it
    (test_loader,) = evaluation_loaders(args, [test_dataset], int(config["batch_size_test"]), sharded=False)

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer, idx_queue=False)
    if args.checkpoint:
        load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "zero_shot_retrieval.py",
                             trust=args.trust_checkpoint)
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx)
    optimizer = create_optimizer(config["optimizer"], model)  # only stepped between repeated evaluations
    scheduler, _ = create_scheduler(config["schedular"], optimizer)

    max_epoch = int(config["schedular"]["epochs"])
    warmup_epochs = int(config["schedular"]["warmup_epochs"] or 0)
    sims_folder = config["save_sims"] or args.output_dir
    start_time = time.time()
    for epoch in range(max_epoch):
        scores = evaluation(model_without_ddp, test_loader, tokenizer, device, config, amp=args.amp,
                            keep_sims=args.save_sims)
        if is_main_process():
            test_result = itm_eval(scores.score_i2t, scores.score_t2i, test_dataset.txt2img, test_dataset.img2txt)
            print(test_result)
            append_log(args.output_dir, {**{f"test_{k}": v for k, v in test_result.items()}, "epoch": epoch})
            if args.save_sims:
                print("similarity and score matrices saved to " + ", ".join(save_similarities(sims_folder, scores)))
        if args.evaluate:
            break
        epoch_end_step(scheduler, epoch, warmup_epochs)
        barrier()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"Time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def get_parser() -> argparse.ArgumentParser:
    parser = base_parser("SIMLA zero-shot image-text retrieval", "./configs/Retrieval_flickr.yaml",
                         "output/Retrieval_flickr", training=False)
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate once (without it the evaluation is repeated schedular.epochs times)")
    parser.add_argument("--save_sims", action="store_true",
                        help="also save the similarity and score matrices (.npy) to the config's save_sims "
                             "folder (output_dir if unset)")
    return parser


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
