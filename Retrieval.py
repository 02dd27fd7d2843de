"""SIMLA image-text retrieval fine-tuning (ITA + ITM) on COCO or Flickr30k, evaluated after every epoch.

python -m torch.distributed.launch --nproc_per_node=8 --use_env Retrieval.py --config ./configs/Retrieval_flickr.yaml \
    --output_dir output/Retrieval_flickr --checkpoint [pretrained checkpoint]
(also torchrun, SLURM, or a plain single process on a CPU or GPU)

Writes ``config.yaml``, one ``log.txt`` line per epoch, ``checkpoint_best.pth`` (best test ``r_mean``,
training runs only) and a final ``best epoch: N``. ``--evaluate`` evaluates the checkpoint once.
``--resume true`` continues a run from its ``checkpoint_best.pth`` (optimizer, scheduler, next epoch).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

import torch

from dataset import create_dataset, create_loader
from dataset.resumable import create_train_loader
from engine.checkpoint import read_checkpoint
from engine.cli import base_parser
from engine.loop import EpochSettings, train_epoch
from engine.resume import resume_point
from engine.retrieval_eval import evaluation, itm_eval
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_parts
from models.simla.retrieval import SIMLA, load_retrieval_checkpoint
from models.tokenization import build_tokenizer
from scheduler import epoch_end_step
from utils import append_log, barrier, broadcast_object, get_rank, get_world_size, is_main_process, str2bool

SCRIPT = "Retrieval.py"
LOSS_NAMES = ("loss_itm", "loss_ita")
BEST_CHECKPOINT = "checkpoint_best.pth"


def make_step(model: torch.nn.Module, tokenizer: Any, config: dict, device: torch.device, epoch: int):
    """The fine-tuning iteration: tokenize (no truncation, as the original), alpha ramp, two losses."""
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
    train_loader, train_sampler = create_train_loader(train_dataset, train_bs, args.num_workers,
                                                      train_dataset.collate_fn,
                                                      seed=args.seed, num_replicas=get_world_size(), rank=get_rank())
    test_loader = create_loader([test_dataset], [None], batch_size=[int(config["batch_size_test"])],
                                num_workers=[args.num_workers], is_trains=[False], collate_fns=[None])[0]
    if not args.evaluate and len(train_loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(train_dataset)} captions give no full batch of "
                         f"{config['batch_size_train']} per process")

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    checkpoint = None
    if args.checkpoint:
        checkpoint = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        load_retrieval_checkpoint(model, checkpoint["model"], args.checkpoint, SCRIPT)
    elif args.resume:
        raise ValueError("--resume needs --checkpoint (the checkpoint_best.pth of the run to continue)")
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx)

    optimizer, scheduler, scaler, checkpointer = training_parts(args, config, model, model_without_ddp, device,
                                                                train_sampler, train_bs)
    max_epoch, warmup_epochs = schedule_epochs(config)
    point = resume_point(checkpointer, checkpoint, args, len(train_loader), epoch_end_warmup=warmup_epochs)
    # checkpoint_best.pth is written when r_mean improves; its value is needed to go on comparing
    best = float(point.extra.get("best_r_mean", 0.0))
    best_epoch = int(point.extra.get("best_epoch", point.epoch - 1 if args.resume else 0))
    del checkpoint

    tracker = Tracker(args.log_backend, args.output_dir, config)
    settings = EpochSettings.for_run(args, LOSS_NAMES, meter_window=1, warmup_epochs=warmup_epochs,
                                     counted_batches=True)

    print("Start training")
    start_time = time.time()
    checkpointer.start(point)
    for epoch in range(point.epoch, max_epoch):
        train_stats: dict[str, Any] = {}
        if not args.evaluate:
            step = make_step(model, tokenizer, config, device, epoch)
            train_stats = train_epoch(model, train_loader, optimizer, scheduler, epoch, device, step, settings,
                                      scaler=scaler, checkpointer=checkpointer, point=point, tracker=tracker,
                                      save_extra={"best_r_mean": best, "best_epoch": best_epoch})
        scores = evaluation(model_without_ddp, test_loader, tokenizer, device, config, amp=args.amp)
        improved = False
        if is_main_process():
            test_result = itm_eval(scores.score_i2t, scores.score_t2i, test_dataset.txt2img, test_dataset.img2txt)
            print(test_result)
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_result.items()}, "epoch": epoch}
            append_log(args.output_dir, log_stats)
            tracker.log({f"test/{k}": v for k, v in test_result.items()}, step=(epoch + 1) * len(train_loader))
            improved = not args.evaluate and test_result["r_mean"] > best
            if improved:
                best, best_epoch = test_result["r_mean"], epoch
        if args.evaluate:
            break
        # the metrics are computed on the main process; every process takes part in saving
        best, best_epoch, improved = broadcast_object((best, best_epoch, improved))
        if improved:
            checkpointer.save(os.path.join(args.output_dir, BEST_CHECKPOINT), epoch, best_r_mean=best,
                              best_epoch=best_epoch)
        epoch_end_step(scheduler, epoch, warmup_epochs)
        checkpointer.finish_epoch(epoch, keep_last=args.save_every_steps > 0, best_r_mean=best,
                                  best_epoch=best_epoch)
        barrier()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    tracker.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if is_main_process():
        append_log(args.output_dir, f"best epoch: {best_epoch}")


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
