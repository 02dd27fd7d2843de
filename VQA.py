"""SIMLA visual question answering: fine-tune the answer decoder, then rank answers for the test split.

python -m torch.distributed.launch --nproc_per_node=8 --use_env VQA.py --config ./configs/VQA.yaml \
    --output_dir output/vqa --checkpoint [Pretrained checkpoint]
(also torchrun, SLURM, or a plain single process on a CPU or GPU)

Writes ``checkpoint_%02d.pth`` and a ``log.txt`` line after every training epoch, then answers every
test question: ``result/vqa_result_epoch%d_rank%d.json`` per process and the merged
``result/vqa_result_epoch%d.json`` (``[{"question_id", "answer"}]``, each question once). When the
test annotations carry annotator answers (a validation split), the VQA accuracy is printed and logged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from dataset import create_dataset, create_loader, create_sampler
from dataset.resumable import create_train_loader
from dataset.vqa import CountedVQACollate, VQADataset
from dataset.vqa_eval import merge_rank_results, vqa_accuracy
from engine.checkpoint import (
    PRETRAINING_ONLY_KEYS,
    CheckpointFit,
    checkpoint_path,
    interpolate_pos_embeds,
    load_fitting_state,
    read_checkpoint,
)
from engine.cli import base_parser
from engine.loop import EpochSettings, train_epoch
from engine.precision import autocast
from engine.resume import ResumePoint, TrainingCheckpointer
from engine.runtime import RunContext, setup_run, wrap_ddp
from engine.tracking import Tracker
from engine.training import schedule_epochs, training_parts
from models.simla.vqa import PRETRAIN_CHECKPOINT_MISSING, SIMLA, map_pretrain_checkpoint
from models.tokenization import build_tokenizer
from scheduler import epoch_start_step
from utils import MetricLogger, append_log, barrier, get_rank, get_world_size, is_main_process

LOSS_NAMES = ("loss",)


def make_step(model: torch.nn.Module, tokenizer: Any, config: dict, device: torch.device, epoch: int):
    """The VQA iteration: tokenize questions and answers, alpha, weighted answer loss."""
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


@torch.no_grad()
def evaluation(model: torch.nn.Module, loader: torch.utils.data.DataLoader, tokenizer: Any, device: torch.device,
               config: dict, amp: str = "none") -> list[dict[str, Any]]:
    """Answer this process's share of the test questions: the top re-ranked answer of each."""
    model.eval()
    logger = MetricLogger(delimiter="  ")
    answer_list = loader.dataset.answer_list
    answer_input = tokenizer([answer + config["eos"] for answer in answer_list], padding="longest",
                             return_tensors="pt").to(device)
    k_test = int(config["k_test"])
    result = []
    for image, question, question_id in logger.log_every(loader, 50, "Generate VQA test result:"):
        image = image.to(device, non_blocking=True)
        question_input = tokenizer(list(question), padding="longest", return_tensors="pt").to(device)
        with autocast(device, amp):
            topk_ids, topk_probs = model(image, question_input, answer_input, train=False, k=k_test)
        for qid, ids, probs in zip(question_id, topk_ids, topk_probs):
            result.append({"question_id": int(qid), "answer": answer_list[int(ids[int(probs.argmax())])]})
    return result


def save_result(result: list[dict[str, Any]], result_dir: str, filename: str,
                question_ids: Sequence[int] | None = None) -> tuple[str, list[dict[str, Any]] | None]:
    """Write this process's ``<filename>_rank<r>.json``; the main process then writes the merged
    ``<filename>.json`` with every question once and checks it against ``question_ids``.
    Returns the merged file's path and (main process) the merged list."""
    with open(os.path.join(result_dir, f"{filename}_rank{get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    barrier()
    final_file = os.path.join(result_dir, f"{filename}.json")
    merged = None
    if is_main_process():
        per_rank = []
        for rank in range(get_world_size()):
            with open(os.path.join(result_dir, f"{filename}_rank{rank}.json"), encoding="utf-8") as handle:
                per_rank.append(json.load(handle))
        merged = merge_rank_results(per_rank, key="question_id")
        if question_ids is not None:
            answered = {entry["question_id"] for entry in merged}
            missing = [qid for qid in question_ids if qid not in answered]
            extra = sorted(answered - set(question_ids))
            if missing or extra:
                raise RuntimeError(f"{final_file}: {len(missing)} test questions unanswered (e.g. {missing[:10]}) "
                                   f"and {len(extra)} unknown question ids (e.g. {extra[:10]})")
        tmp = final_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(merged, handle)
        os.replace(tmp, final_file)
        print(f"result file saved to {final_file}")
    barrier()
    return final_file, merged


def load_checkpoint_into(model: SIMLA, args: argparse.Namespace, checkpointer: TrainingCheckpointer,
                         num_batches: int) -> ResumePoint:
    """Load ``--checkpoint`` as the original: position embeddings resized; for training runs a
    pretraining checkpoint is renamed onto the encoder and decoder. A checkpoint that does not fit
    the model (other than by the pretraining-only entries) is refused. Returns where training starts."""
    checkpoint = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    state_dict = dict(checkpoint["model"])
    interpolate_pos_embeds(state_dict, model, names=("visual_encoder",))
    point = ResumePoint()
    if not args.evaluate:
        if model.distill:
            interpolate_pos_embeds(state_dict, model, names=("visual_encoder_m",))
        state_dict = map_pretrain_checkpoint(state_dict, model.decoder_depth)
    # a VQA checkpoint (--evaluate, --resume) must fit; a renamed pretraining one may add its own heads
    fit = CheckpointFit("VQA.py", "a VQA.py checkpoint")
    if not (args.evaluate or args.resume):
        fit = CheckpointFit("VQA.py", "a pretraining (or VQA.py) checkpoint",
                            missing=PRETRAIN_CHECKPOINT_MISSING, unexpected=PRETRAINING_ONLY_KEYS)
    message = load_fitting_state(model, state_dict, args.checkpoint, fit)
    if args.resume and not args.evaluate:
        point = checkpointer.restore(checkpoint, args.checkpoint, num_batches)
    print(message)
    if message.missing_keys:
        shown = ", ".join(message.missing_keys[:10])
        print(f"warning: {len(message.missing_keys)} model entries are not in {args.checkpoint} and keep their "
              f"initial values (e.g. {shown})" + (" ; --evaluate expects a VQA checkpoint" if args.evaluate else ""))
    return point


def main(args: argparse.Namespace) -> None:
    ctx: RunContext = setup_run(args, "vqa")
    config, device = ctx.config, ctx.device
    result_dir = os.path.join(args.output_dir, "result")
    os.makedirs(result_dir, exist_ok=True)

    print("Creating vqa datasets")
    datasets = create_dataset("vqa", config)
    train_dataset, test_dataset = datasets
    batch_size = int(config["batch_size_train"])
    train_loader, train_sampler = create_train_loader(train_dataset, batch_size, args.num_workers,
                                                      CountedVQACollate(), seed=args.seed,
                                                      num_replicas=get_world_size(), rank=get_rank())
    test_sampler = (create_sampler([test_dataset], [False], get_world_size(), get_rank())[0] if ctx.distributed
                    else None)
    test_loader = create_loader([test_dataset], [test_sampler], batch_size=[int(config["batch_size_test"])],
                                num_workers=[args.num_workers], is_trains=[False], collate_fns=[None])[0]
    if not args.evaluate and len(train_loader) == 0:
        raise ValueError(f"{config['train_file']}: {len(train_dataset)} questions give no full batch of "
                         f"{config['batch_size_train']} per process")

    tokenizer = build_tokenizer(args.text_encoder)
    print("Creating model")
    model = SIMLA(text_encoder=args.text_encoder, text_decoder=args.text_decoder, tokenizer=tokenizer,
                  config=config)
    model = model.to(device)
    optimizer, scheduler, scaler, checkpointer = training_parts(args, config, model, model, device, train_sampler,
                                                                batch_size)
    point = ResumePoint()
    if args.checkpoint:
        point = load_checkpoint_into(model, args, checkpointer, len(train_loader))
    start_epoch = point.epoch

    # an unused pretraining mask token would make DDP fail (the original configs set vit_mask_token: false)
    unused = model.visual_encoder.mask_token is not None
    model, model_without_ddp = wrap_ddp(model, ctx, find_unused_parameters=unused)

    tracker = Tracker(args.log_backend, args.output_dir, config)
    max_epoch, warmup_epochs = schedule_epochs(config)
    settings = EpochSettings.for_run(args, LOSS_NAMES, meter_window=1, warmup_epochs=warmup_epochs,
                                     counted_batches=True)

    print("Start training")
    start_time = time.time()
    last_epoch = start_epoch if args.evaluate else start_epoch - 1
    checkpointer.start(point)
    for epoch in range(start_epoch, max_epoch):
        last_epoch = epoch
        if point.start_step(epoch) == 0:
            epoch_start_step(scheduler, epoch, warmup_epochs)
        if args.evaluate:
            break
        step = make_step(model, tokenizer, config, device, epoch)
        train_stats = train_epoch(model, train_loader, optimizer, scheduler, epoch, device, step, settings,
                                  scaler=scaler, checkpointer=checkpointer, point=point, tracker=tracker)
        checkpointer.finish_epoch(epoch, checkpoint_path(args.output_dir, epoch),
                                  keep_last=args.save_every_steps > 0)
        if is_main_process():
            log_stats = {f"train_{k}": v for k, v in train_stats.items()}
            log_stats["epoch"] = epoch
            append_log(args.output_dir, log_stats)
        barrier()
    tracker.close()

    # every process answers its shard of the test split; the padded duplicates are merged away
    vqa_result = evaluation(model_without_ddp, test_loader, tokenizer, device, config, args.amp)
    _, merged = save_result(vqa_result, result_dir, f"vqa_result_epoch{last_epoch}",
                            question_ids=test_dataset.question_ids())
    if is_main_process() and merged is not None:
        report_accuracy(merged, test_dataset, args.output_dir, last_epoch)
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def report_accuracy(merged: list[dict[str, Any]], test_dataset: VQADataset, output_dir: str, epoch: int) -> None:
    """Print and log the VQA accuracy when the test annotations carry annotator answers."""
    if not test_dataset.answers_by_question_id:
        return
    scores = vqa_accuracy(merged, test_dataset.answers_by_question_id)
    print(f"VQA accuracy: {scores['accuracy']:.2f} ({scores['num_questions']} questions with answers)")
    append_log(output_dir, {"test_vqa_accuracy": scores["accuracy"],
                            "test_vqa_questions": scores["num_questions"], "epoch": epoch})


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
