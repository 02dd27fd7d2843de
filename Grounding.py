"""SIMLA weakly supervised visual grounding on RefCOCO+: fine-tune ITA + ITM, rank boxes by Grad-CAM."""

from __future__ import annotations

import argparse
import os

from dataset import create_dataset
from engine.checkpoint import load_checkpoint_into, resume_point
from engine.cli import base_parser
from engine.fit import Evaluation, FitPlan, fit
from engine.grounding_eval import collect_result, grounding_eval, grounding_maps, load_evaluation_inputs
from engine.loop import EpochSettings
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import evaluation_loaders, schedule_epochs, training_loader, training_parts
from models.simla.gradcam import DEFAULT_BLOCK_NUM, GRADCAM_MODES, check_block_num
from models.simla.retrieval import SIMLA, checkpoint_filter_fn
from models.tokenization import build_tokenizer
from Retrieval import LOSS_NAMES, make_step  # the same model and iteration
from utils import is_main_process


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "grounding")
    config, device = ctx.config, ctx.device
    result_dir = os.path.join(args.output_dir, "result")
    os.makedirs(result_dir, exist_ok=True)

    print("Creating dataset")
    train_dataset, test_dataset = create_dataset("grounding", config)
    batch_size = int(config["batch_size"])
    train_loader, train_sampler = training_loader(args, config, train_dataset, batch_size, train_dataset.collate_fn,
                                                  "expressions", required=not args.evaluate)
    (test_loader,) = evaluation_loaders(args, [test_dataset], batch_size)

    tokenizer = build_tokenizer(args.text_encoder)
    refer, dets = load_evaluation_inputs(config, test_dataset.ref_ids)

    print("Creating model")
    model = SIMLA(config=config, text_encoder=args.text_encoder, tokenizer=tokenizer)
    check_block_num(model, args.gradcam_mode, args.block_num)
    checkpoint = None
    if args.checkpoint:
        checkpoint, _ = load_checkpoint_into(model, args.checkpoint, checkpoint_filter_fn, "Grounding.py",
                                             trust=args.trust_checkpoint)
    model = model.to(device)
    model, model_without_ddp = wrap_ddp(model, ctx, static_graph=True)  # the original's _set_static_graph()

    parts = training_parts(args, config, model, model_without_ddp, device, train_sampler, batch_size)
    epochs, warmup_epochs = schedule_epochs(config)
    point = resume_point(parts.checkpointer, checkpoint if not args.evaluate else None, args, len(train_loader),
                         epoch_end_warmup=warmup_epochs)
    del checkpoint

    def evaluate(epoch: int) -> Evaluation:
        maps = grounding_maps(model_without_ddp, test_loader, tokenizer, device, args.gradcam_mode, args.block_num,
                              amp=args.amp)
        results = collect_result(maps, result_dir, f"epoch{epoch}")
        if not is_main_process():
            return Evaluation()
        accuracy = grounding_eval(results, dets, refer, skip_empty_fix=config["grounding_skip_empty_fix"],
                                  det_file=config["det_file"])
        return Evaluation(log=accuracy, track={f"test/{k}": v for k, v in accuracy.items()}, score=accuracy["val_d"])

    plan = FitPlan(
        make_step=lambda epoch: make_step(model, tokenizer, config, device, epoch), loader=train_loader,
        settings=EpochSettings.for_run(args, LOSS_NAMES, meter_window=1, warmup_epochs=warmup_epochs,
                                       counted_batches=True),
        epochs=epochs, evaluate=evaluate, evaluate_only=args.evaluate, best_key="best", best_epoch=False)
    fit(model, plan, parts, point, Tracker(args.log_backend, args.output_dir, config), args.output_dir, device,
        keep_last=args.save_every_steps > 0)


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
