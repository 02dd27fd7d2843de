"""Command-line flags common to every entry script (the original's, plus a few options of our own)."""

from __future__ import annotations

import argparse
import os

from models.compile import MODES as COMPILE_MODES
from utils import str2bool


def default_num_workers() -> int:
    """Data-loading workers per process: at most 4, and no more than the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


def base_parser(description: str, default_config: str, default_output_dir: str,
                training: bool = True) -> argparse.ArgumentParser:
    """The original flags with their defaults; boolean flags accept true/false/1/0/yes/no.
    ``training`` adds ``--resume``, ``--save_every_steps``, ``--skip_nonfinite``, ``--step_in_backward``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=default_config, help="YAML config file")
    parser.add_argument("--checkpoint", default="", help="checkpoint to start from ('' for none)")
    parser.add_argument("--output_dir", default=default_output_dir, help="folder for config.yaml, log.txt, checkpoints")
    parser.add_argument("--text_encoder", default="bert-base-uncased",
                        help="Hugging Face BERT name or folder (tokenizer and BERT initialisation), "
                             "or a vocab.txt file")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu is used when CUDA is absent)")
    parser.add_argument("--seed", default=42, type=int, help="base seed; each process adds its global rank")
    parser.add_argument("--world_size", default=1, type=int, help="number of processes (SLURM launches)")
    parser.add_argument("--dist_url", default="env://", help="torch.distributed init method")
    parser.add_argument("--distributed", default=True, type=str2bool,
                        help="kept for compatibility; decided by the launcher's environment")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="config overrides: key=value, a.b=value, +new_key=value, ~key")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                        help="autocast precision for training and evaluation")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow arbitrary pickled objects in --checkpoint (only for files you trust)")
    parser.add_argument("--num_workers", default=default_num_workers(), type=int,
                        help="data-loading worker processes per rank (min(4, usable cores) unless given)")
    parser.add_argument("--log_backend", default="none", choices=("none", "tensorboard", "wandb"),
                        help="extra metric logging (off by default; wandb runs offline)")
    parser.add_argument("--dist_timeout", default=1800, type=float,
                        help="seconds a collective may wait for the other processes before the run fails")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 matrix products on TF32 tensor cores (Ampere and newer GPUs), as the "
                             "original's torch 1.9 did by default; off: full float32 products")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN without "
                             "autotuning, the cuBLAS workspace setting): repeated runs with the same number "
                             "of threads give bitwise the same weights, at some cost in speed")
    if not training:
        return parser
    parser.add_argument("--fused_dropout", action="store_true",
                        help="attention dropout inside PyTorch's fused attention kernel (flash / memory-efficient "
                             "on GPUs): other random draws than the original's explicit softmax dropout")
    parser.add_argument("--compile", action="store_true",
                        help="compile every ViT block and BERT layer with torch.compile (regional: a short "
                             "compilation, unchanged state_dict keys)")
    parser.add_argument("--compile_mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile mode with --compile (default: torch's default)")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument("--resume", default=False, type=str2bool,
                        help="with --checkpoint (a checkpoint of this script): restore optimizer, scheduler, "
                             "random generators and data position and continue where it stopped")
    parser.add_argument("--save_every_steps", default=0, type=int,
                        help="also write a rolling mid-epoch checkpoint (checkpoint_last.pth) every N steps; "
                             "--resume from it continues at the next step with the same data order")
    parser.add_argument("--skip_nonfinite", action="store_true",
                        help="skip (and count) a step whose loss is NaN or infinite instead of stopping")
    parser.add_argument("--step_in_backward", action="store_true",
                        help="update each parameter as soon as backward has its gradient and free that gradient "
                             "(same updates, less memory; one process, AdamW/Adam/SGD, not with --amp fp16)")
    return parser
