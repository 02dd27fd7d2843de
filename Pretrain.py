"""SIMLA pretraining: ITA + ITM + MLM + MIM + PSL on image-caption pairs.

python -m torch.distributed.launch --nproc_per_node=8 --use_env Pretrain.py --config ./configs/Pretrain.yaml \
    --output_dir output/Pretrain
(also torchrun, SLURM, or a plain single process on a CPU or GPU)
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

import torch

from dataset import SafeCollate, create_dataset
from dataset.resumable import create_train_loader
from engine.checkpoint import checkpoint_path, interpolate_pos_embeds, load_model_state, read_checkpoint
from engine.cli import base_parser
from engine.consistency import check_replicas_agree
from engine.loop import EpochSettings, train_epoch
from engine.resume import ResumePoint
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_parts
from models.dvae import DalleVAE
from models.simla.pretrain import SIMLA
from models.tokenization import build_tokenizer
from scheduler import epoch_start_step
from utils import append_log, barrier, get_rank, get_world_size, is_main_process

LOSS_NAMES = ("loss_mlm", "loss_ita", "loss_itm", "loss_mim", "loss_pseudo")


def make_step(model: torch.nn.Module, tokenizer: Any, dvae: DalleVAE, config: dict, device: torch.device,
              epoch: int):
    """The pretraining iteration: tokenize, d-VAE codes of the masked patches, five losses."""
    alpha_max = float(config["alpha"])

    def step(batch, i: int, num_batches: int) -> dict[str, torch.Tensor]:
        image, caption, image_for_tokenization, masked_positions = batch
        image = image.to(device, non_blocking=True)
        image_for_tokenization = image_for_tokenization.to(device, non_blocking=True)
        text = tokenizer(list(caption), padding="longest", truncation=True, max_length=25,
                         return_tensors="pt").to(device)
        alpha = alpha_max if epoch > 0 else alpha_max * min(1.0, i / num_batches)
        with torch.no_grad():
            visual_token_ids = dvae.get_codebook_indices(image_for_tokenization).flatten(1)
            masked_pos = masked_positions.to(device).flatten(1).bool()
            labels = visual_token_ids[masked_pos]
        loss_mlm, loss_ita, loss_itm, loss_mim, loss_pseudo = model(
            image, text, visual_token_ids=visual_token_ids, masked_visual_token_pos=masked_pos,
            masked_visual_tok_labels=labels, alpha=alpha)
        return dict(zip(LOSS_NAMES, (loss_mlm, loss_ita, loss_itm, loss_mim, loss_pseudo)))

    return step


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "pretrain")
    config, device = ctx.config, ctx.device

    print("Creating dataset")
    dataset = create_dataset("pretrain", config)
    batch_size = int(config["batch_size"])
    loader, sampler = create_train_loader(dataset, batch_size, args.num_workers, SafeCollate(), seed=args.seed,
                                          num_replicas=get_world_size(), rank=get_rank())
    if len(loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(dataset)} samples give no full batch of "
                         f"{config['batch_size']} per process")

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(text_encoder=args.text_encoder, tokenizer=tokenizer, config=config)
    model = model.to(device)
    optimizer, scheduler, scaler, checkpointer = training_parts(args, config, model, model, device, sampler,
                                                                batch_size)
    point = ResumePoint()
    if args.checkpoint:
        checkpoint = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        state_dict = dict(checkpoint["model"])
        if args.resume:
            point = checkpointer.restore(checkpoint, args.checkpoint, len(loader))
        else:
            interpolate_pos_embeds(state_dict, model)
        load_model_state(model, state_dict, args.checkpoint, strict=True)
        del checkpoint

    model, model_without_ddp = wrap_ddp(model, ctx)

    print("Loading image tokenizer.")
    dvae = DalleVAE.load(config["image_tokenizer_path"], device)
    print(f"Loaded image tokenizer from {config['image_tokenizer_path']}")

    backend = "none" if args.log_backend == "wandb" and config.get("disable_wandb") else args.log_backend
    tracker = Tracker(backend, args.output_dir, config)
    max_epoch, warmup_epochs = schedule_epochs(config)
    settings = EpochSettings.for_run(args, LOSS_NAMES, warmup_epochs=warmup_epochs, counted_batches=True)

    print("Start training")
    start_time = time.time()
    checkpointer.start(point)
    for epoch in range(point.epoch, max_epoch):
        if point.start_step(epoch) == 0:
            epoch_start_step(scheduler, epoch, warmup_epochs)
        step = make_step(model, tokenizer, dvae, config, device, epoch)
        train_stats = train_epoch(model, loader, optimizer, scheduler, epoch, device, step, settings,
                                  scaler=scaler, checkpointer=checkpointer, point=point, tracker=tracker)
        checkpointer.finish_epoch(epoch, checkpoint_path(args.output_dir, epoch),
                                  keep_last=args.save_every_steps > 0)
        if is_main_process():
            log_stats = {f"train_{k}": v for k, v in train_stats.items()}
            log_stats["epoch"] = epoch
            append_log(args.output_dir, log_stats)
        barrier()
    # every process must end with the same weights, buffers and queues as the saved checkpoint
    fingerprint = check_replicas_agree(model_without_ddp)
    agreement = f" (identical on all {get_world_size()} processes)" if get_world_size() > 1 else ""
    print(f"Model state fingerprint: {fingerprint}{agreement}")
    tracker.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def get_parser() -> argparse.ArgumentParser:
    parser = base_parser("SIMLA pretraining", "./configs/Pretrain.yaml", "Pretrain/")
    return parser


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
