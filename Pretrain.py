"""SIMLA pretraining: ITA + ITM + MLM + MIM + PSL on image-caption pairs.

python -m torch.distributed.launch --nproc_per_node=8 --use_env Pretrain.py --config ./configs/Pretrain.yaml \
    --output_dir output/Pretrain
(also torchrun, SLURM, or a plain single process on a CPU or GPU)
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dataset import SafeCollate, create_dataset
from engine.checkpoint import load_checkpoint_into, resume_point
from engine.cli import base_parser
from engine.consistency import check_replicas_agree
from engine.fit import FitPlan, fit
from engine.loop import EpochSettings
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_loader, training_parts
from models.dvae import DalleVAE
from models.simla.pretrain import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer
from utils import get_world_size

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
            masked_pos = masked_positions.to(device, non_blocking=True).flatten(1).bool()
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
    loader, sampler = training_loader(args, config, dataset, batch_size, SafeCollate())

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(text_encoder=args.text_encoder, tokenizer=tokenizer, config=config)
    model = model.to(device)
    parts = training_parts(args, config, model, model, device, sampler, batch_size)
    checkpoint = None
    if args.checkpoint:
        checkpoint, _ = load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "Pretrain.py",
                                             own=args.resume, trust=args.trust_checkpoint)
    point = resume_point(parts.checkpointer, checkpoint, args, len(loader))
    del checkpoint
    model, model_without_ddp = wrap_ddp(model, ctx)

    print("Loading image tokenizer.")
    dvae = DalleVAE.load(config["image_tokenizer_path"], device)
    print(f"Loaded image tokenizer from {config['image_tokenizer_path']}")

    def check_replicas(last_epoch: int) -> None:
        # every process must end with the same weights, buffers and queues as the saved checkpoint
        fingerprint = check_replicas_agree(model_without_ddp)
        agreement = f" (identical on all {get_world_size()} processes)" if get_world_size() > 1 else ""
        print(f"Model state fingerprint: {fingerprint}{agreement}")

    backend = "none" if args.log_backend == "wandb" and config["disable_wandb"] else args.log_backend
    epochs, warmup_epochs = schedule_epochs(config)
    plan = FitPlan(make_step=lambda epoch: make_step(model, tokenizer, dvae, config, device, epoch), loader=loader,
                   settings=EpochSettings.for_run(args, LOSS_NAMES, warmup_epochs=warmup_epochs,
                                                  counted_batches=True),
                   epochs=epochs, schedule="epoch_start", save_each_epoch=True)
    fit(model, plan, parts, point, Tracker(backend, args.output_dir, config), args.output_dir, device,
        keep_last=args.save_every_steps > 0, after=check_replicas)


def get_parser() -> argparse.ArgumentParser:
    parser = base_parser("SIMLA pretraining", "./configs/Pretrain.yaml", "Pretrain/")
    return parser


if __name__ == "__main__":
    from engine.runtime import prepare_output_dir, run_entry

    cli_args = get_parser().parse_args()
    prepare_output_dir(cli_args.output_dir)
    run_entry(main, cli_args)
