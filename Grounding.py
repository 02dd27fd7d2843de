"""SIMLA weakly supervised visual grounding on RefCOCO+: fine-tune ITA + ITM on (image, referring
expression) pairs, then rank the detector boxes of each test expression with a Grad-CAM map.

python -m torch.distributed.launch --nproc_per_node=8 --use_env Grounding.py --config ./configs/Grounding.yaml \
    --output_dir output/RefCOCO --gradcam_mode itm --block_num 8 --checkpoint [pretrained checkpoint]
(also torchrun, SLURM, or a plain single process on a CPU or GPU)

Writes ``config.yaml``, ``result/epoch%d_rank%d.pth`` (the Grad-CAM map of every test expression of
each process), one ``log.txt`` line per epoch with ``val_d``, ``testA_d``, ``testB_d`` and
``checkpoint_best.pth`` (best ``val_d``, training runs only). ``--evaluate`` evaluates once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

import torch

from dataset import create_dataset, create_loader, create_sampler
from dataset.annotations import read_json
from dataset.grounding import ReferAnnotations
from dataset.resumable import create_train_loader
from engine.checkpoint import read_checkpoint
from engine.cli import base_parser
from engine.grounding_eval import check_evaluation_inputs, collect_result, grounding_eval, grounding_maps
from engine.loop import EpochSettings, train_epoch
from engine.resume import resume_point
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_parts
from models.simla.gradcam import DEFAULT_BLOCK_NUM, GRADCAM_MODES, check_block_num
from models.simla.retrieval import SIMLA, load_retrieval_checkpoint
from models.tokenization import build_tokenizer
from scheduler import epoch_end_step
from utils import append_log, barrier, broadcast_object, get_rank, get_world_size, is_main_process

SCRIPT = "Grounding.py"
LOSS_NAMES = ("loss_itm", "loss_ita")
BEST_CHECKPOINT = "checkpoint_best.pth"
# the REFER annotations the original evaluates on
REFER_DATASET, REFER_SPLIT_BY = "refcoco+", "unc"


def make_step(model: torch.nn.Module, tokenizer: Any, config: dict, device: torch.device, epoch: int):
    """The fine-tuning iteration: tokenize (no truncation, as the original), alpha ramp, two losses."""
    alpha_max = float(config["alpha"])
    ramp = bool(config["warm_up"]) and epoch == 0

    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        image, text, idx = batch
        image = image.to(device, non_blocking=True)
        idx = idx.to(device, non_blocking=True)
        text_input = tokenizer(list(text), padding="longest", max_length=30, return_tensors="pt").to(device)
        alpha = alpha_max * min(1.0, i / num_batches) if ramp else alpha_max
        loss_ita, loss_itm = model(image, text_input, alpha=alpha, idx=idx)
        return {"loss_itm": loss_itm, "loss_ita": loss_ita}

    return step


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "grounding")
    config, device = ctx.config, ctx.device
    result_dir = os.path.join(args.output_dir, "result")
    os.makedirs(result_dir, exist_ok=True)

    print("Creating dataset")
    train_dataset, test_dataset = create_dataset("grounding", config)
    batch_size = int(config["batch_size"])
    train_loader, train_sampler = create_train_loader(train_dataset, batch_size, args.num_workers,
                                                      train_dataset.collate_fn, seed=args.seed,
                                                      num_replicas=get_world_size(), rank=get_rank())
    test_sampler = create_sampler([test_dataset], [False], get_world_size(), get_rank())[0] if ctx.distributed \
        else None
    test_loader = create_loader([test_dataset], [test_sampler], batch_size=[batch_size],
                                num_workers=[args.num_workers], is_trains=[False], collate_fns=[None])[0]
    if not args.evaluate and len(train_loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(train_dataset)} expressions give no full batch of "
                         f"{batch_size} per process")

    tokenizer = build_tokenizer(args.text_encoder)
    refer = ReferAnnotations.load(config["refcoco_data"], REFER_DATASET, REFER_SPLIT_BY)
    dets = read_json(config["det_file"])
    if not isinstance(dets, dict):
        raise ValueError(f"{config['det_file']}: expected a JSON object {{image id: [[x, y, w, h, ...], ...]}}")
    # coco_file is read by the original but never used
    counts = check_evaluation_inputs(test_dataset.ref_ids, refer, dets, config["test_file"], config["det_file"])
    print(f"referring expressions to evaluate per split: {counts}")

    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    check_block_num(model, args.gradcam_mode, args.block_num)
    checkpoint = None
    if args.checkpoint:
        checkpoint = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        load_retrieval_checkpoint(model, checkpoint["model"], args.checkpoint, SCRIPT)
    model = model.to(device)
    # every parameter takes part in each step (momentum copies need no gradient), as the original's
    # _set_static_graph() declares
    model, model_without_ddp = wrap_ddp(model, ctx, static_graph=True)

    optimizer, scheduler, scaler, checkpointer = training_parts(args, config, model, model_without_ddp, device,
                                                                train_sampler, batch_size)
    tracker = Tracker(args.log_backend, args.output_dir, config)
    max_epoch, warmup_epochs = schedule_epochs(config)
    settings = EpochSettings.for_run(args, LOSS_NAMES, meter_window=1, warmup_epochs=warmup_epochs,
                                     counted_batches=True)
    skip_empty_fix = bool(config.get("grounding_skip_empty_fix", False))
    point = resume_point(checkpointer, checkpoint if not args.evaluate else None, args, len(train_loader),
                         epoch_end_warmup=warmup_epochs)
    del checkpoint
    best = float(point.extra.get("best", 0.0))

    print("Start training")
    start_time = time.time()
    checkpointer.start(point)
    for epoch in range(point.epoch, max_epoch):
        train_stats: dict[str, Any] = {}
        if not args.evaluate:
            step = make_step(model, tokenizer, config, device, epoch)
            train_stats = train_epoch(model, train_loader, optimizer, scheduler, epoch, device, step, settings,
                                      scaler=scaler, checkpointer=checkpointer, point=point, tracker=tracker,
                                      save_extra={"best": best})
        result = grounding_maps(model_without_ddp, test_loader, tokenizer, device, args.gradcam_mode,
                                args.block_num, amp=args.amp)
        results = collect_result(result, result_dir, f"epoch{epoch}")
        improved = False
        if is_main_process():
            grounding_acc = grounding_eval(results, dets, refer, skip_empty_fix=skip_empty_fix,
                                           det_file=config["det_file"])
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, **grounding_acc, "epoch": epoch}
            improved = not args.evaluate and grounding_acc["val_d"] > best
            if improved:
                best = grounding_acc["val_d"]
            append_log(args.output_dir, log_stats)
            tracker.log({f"test/{k}": v for k, v in grounding_acc.items()}, step=(epoch + 1) * len(train_loader))
        if args.evaluate:
            break
        # the scores exist on the main process; every process takes part in saving
        best, improved = broadcast_object((best, improved))
        if improved:
            checkpointer.save(os.path.join(args.output_dir, BEST_CHECKPOINT), epoch, best=best)
        epoch_end_step(scheduler, epoch, warmup_epochs)
        checkpointer.finish_epoch(epoch, keep_last=args.save_every_steps > 0, best=best)
        barrier()

    tracker.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def get_parser() -> argparse.ArgumentParser:
    parser = base_parser("SIMLA weakly supervised grounding (RefCOCO+)", "./configs/Grounding.yaml",
                         "output/RefCOCO")
    parser.add_argument("--gradcam_mode", default="itm", choices=GRADCAM_MODES,
                        help="itm: cross-attention of a text-encoder layer; itc: attention of a ViT block")
    parser.add_argument("--block_num", default=DEFAULT_BLOCK_NUM, type=int,
                        help="layer (itm) or ViT block (itc) whose attention gives the Grad-CAM map")
    parser.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint once and stop")
    return parser


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
