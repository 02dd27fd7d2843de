"""Checkpoint files in the original format: ``{model, optimizer, lr_scheduler, config, epoch}``."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.vit import interpolate_pos_embed
from utils import load_checkpoint

StateDictMapping = Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]]


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


#: ViT entries only masked-image pretraining uses. Whether a checkpoint holds them depends on the
#: ``vit_mask_token`` setting of the model that wrote it, so every fine-tuning load lets them be missing
#: or unexpected.
MASK_TOKEN_KEYS: tuple[str, ...] = ("visual_encoder.mask_token", "visual_encoder_m.mask_token")

#: Entries of a SIMLA pretraining checkpoint that fine-tuning models do not build (glob patterns): the
#: ITM, MIM and concept heads, the contrastive projections, temperature and feature queues, and the
#: masked-LM heads of the text encoders. A model that has one of them loads it; the others are ignored.
PRETRAINING_ONLY_KEYS: tuple[str, ...] = (
    "itm_head.*", "mim_head.*", "mim_head_m.*", "concept_head.*", "concept_head_m.*",
    "vision_proj.*", "vision_proj_m.*", "text_proj.*", "text_proj_m.*", "temp",
    "image_queue", "text_queue", "queue_ptr",
    "text_encoder.cls.*", "text_encoder_m.cls.*",
)


@dataclass(frozen=True)
class CheckpointFit:
    """The differences between a checkpoint and the model that ``script`` accepts when loading it.

    ``missing`` matches model keys the checkpoint may lack (modules the task adds, left as built);
    ``unexpected`` matches checkpoint keys the model may have no place for (modules of the source
    model the task drops). Both are glob patterns over state_dict keys (``*`` also spans dots).
    ``source`` names the checkpoint the script expects, for the error message. Any other missing or
    unexpected key, and any shape mismatch, means the checkpoint belongs to another model.
    """

    script: str
    source: str
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


@dataclass
class KeyDifferences:
    """How a checkpoint's state differs from a model's: keys in one only, and keys of different shape."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Whether a key fully matches one of the glob ``patterns``."""
    if not patterns:
        return lambda key: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda key: regex.match(key) is not None


def absent_momentum_twins(model: torch.nn.Module) -> tuple[str, ...]:
    """``<name>_m.*`` for every top-level module of ``model`` built without its momentum twin: a model
    built without distillation has no place for the momentum weights of a distilling checkpoint."""
    names = [name for name, _ in model.named_children()]
    return tuple(f"{name}_m.*" for name in names if not name.endswith("_m") and f"{name}_m" not in names)


def key_differences(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> KeyDifferences:
    """The model keys the state lacks, the state keys the model lacks, and the shared keys whose
    shapes differ (as ``key: checkpoint (..) vs model (..)``)."""
    own = model.state_dict()
    return KeyDifferences(
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
        wrong_shape=[f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                     for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)])


def _listing(title: str, items: Sequence[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def describe_mismatch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str) -> str:
    """A readable list of missing, unexpected and wrongly shaped keys."""
    diff = key_differences(model, state_dict)
    lines = [f"checkpoint {path} does not fit the model:"]
    for title, items in (("missing keys", diff.missing), ("unexpected keys", diff.unexpected),
                         ("shape mismatches", diff.wrong_shape)):
        if items:
            lines.append(_listing(title, items))
    return "\n".join(lines)


def check_checkpoint_fit(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str,
                         fit: CheckpointFit) -> KeyDifferences:
    """Raise ``ValueError`` unless ``state_dict`` differs from ``model`` only as ``fit`` allows.

    Besides ``fit``'s patterns, the ViT mask tokens may be missing or unexpected and the momentum
    weights of modules the model builds without a twin may be unexpected. The error names the script
    and the checkpoint and lists the other missing and unexpected keys and every shape mismatch (the
    first 20 of each, with their number). Returns the differences (all allowed).
    """
    diff = key_differences(model, state_dict)
    may_miss = _matcher((*fit.missing, *MASK_TOKEN_KEYS))
    may_add = _matcher((*fit.unexpected, *MASK_TOKEN_KEYS, *absent_momentum_twins(model)))
    missing = [k for k in diff.missing if not may_miss(k)]
    unexpected = [k for k in diff.unexpected if not may_add(k)]
    if missing or unexpected or diff.wrong_shape:
        allowed = (len(diff.missing) - len(missing), len(diff.unexpected) - len(unexpected))
        lines = [f"{fit.script}: checkpoint {path} does not fit the model "
                 f"({fit.script} expects {fit.source}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", diff.wrong_shape)):
            if items:
                lines.append(_listing(title, items))
        if any(allowed):
            lines.append(f"  (not counted: {allowed[0]} missing and {allowed[1]} unexpected keys that "
                         f"{fit.script} accepts from {fit.source})")
        raise ValueError("\n".join(lines))
    return diff


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


def load_fitting_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str,
                       fit: CheckpointFit):
    """Check ``state_dict`` against ``fit`` (:func:`check_checkpoint_fit`), then load every key it
    shares with ``model``; the other model entries keep their values. Returns ``load_state_dict``'s
    report of the (accepted) missing and unexpected keys."""
    check_checkpoint_fit(model, state_dict, path, fit)
    return model.load_state_dict(state_dict, strict=False)


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{epoch:02d}.pth")
