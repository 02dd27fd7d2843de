"""Checkpoint files in the original format: ``{model, optimizer, lr_scheduler, config, epoch}``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from models.vit import interpolate_pos_embed
from utils import is_main_process, load_checkpoint, save_checkpoint

StateDictMapping = Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]]


def save_training_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                             config: Mapping[str, Any], epoch: int, **extra: Any) -> None:
    """Write a checkpoint (main process only, atomically)."""
    if not is_main_process():
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "config": dict(config),
        "epoch": epoch,
    }
    state.update(extra)
    save_checkpoint(state, path)


def read_checkpoint(path: str, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint file safely and check that it holds a ``model`` state_dict."""
    print(f"load checkpoint from {path}")
    checkpoint = load_checkpoint(path, trust=trust)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found a {type(checkpoint).__name__}")
    if "model" not in checkpoint:
        # a bare state_dict is accepted as well
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return {"model": checkpoint}
        raise KeyError(f"{path}: no 'model' entry (keys: {sorted(checkpoint)[:10]})")
    return checkpoint


def interpolate_pos_embeds(state_dict: dict[str, torch.Tensor], model: torch.nn.Module,
                           names: tuple[str, ...] = ("visual_encoder", "visual_encoder_m")) -> None:
    """Resize the checkpoint's ViT position embeddings to the model's patch grid, in place."""
    for name in names:
        key = f"{name}.pos_embed"
        encoder = getattr(model, name, None)
        if key in state_dict and encoder is not None:
            state_dict[key] = interpolate_pos_embed(state_dict[key], encoder)


def describe_mismatch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str) -> str:
    """A readable list of missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    lines = [f"checkpoint {path} does not fit the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            shown = items[:20]
            more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)
    return "\n".join(lines)


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str, strict: bool):
    """``load_state_dict`` with an error that lists the mismatching keys and shapes."""
    own = model.state_dict()
    wrong_shape = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if wrong_shape:
        raise ValueError(describe_mismatch(model, state_dict, path))
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError:
        raise ValueError(describe_mismatch(model, state_dict, path)) from None


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{epoch:02d}.pth")
