"""Loading a checkpoint into a task model: read, filter, resize position embeddings, check, load, report."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.checkpoint.io import read_checkpoint
from models.simla.checkpoint_keys import MASK_TOKEN_KEYS, FilteredState
from models.vit import VisionTransformer, interpolate_pos_embed

#: ``checkpoint_filter_fn(state_dict, model, own)``; ``own``: written by the task itself (evaluate/resume).
CheckpointFilter = Callable[[dict[str, Any], torch.nn.Module, bool], FilteredState]


@dataclass(frozen=True)
class CheckpointFit:
    """Allowed ``missing``/``unexpected`` glob patterns (``*`` spans dots); anything else is refused."""

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


@dataclass
class CheckpointLoad:
    """What loading did: missing and unexpected keys, renamed keys ``{new: old}``, dropped entries."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    renamed: dict[str, str] | None = None
    dropped_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.renamed is None and not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"  # as torch reports a load without key mapping
        return f"_IncompatibleKeys(missing_keys={self.missing_keys}, unexpected_keys={self.unexpected_keys})"


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Whether a key fully matches one of the glob ``patterns``."""
    if not patterns:
        return lambda key: False
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda key: regex.match(key) is not None


def absent_momentum_twins(model: torch.nn.Module) -> tuple[str, ...]:
    """``<name>_m.*`` for every top-level module of ``model`` built without its momentum twin."""
    names = [name for name, _ in model.named_children()]
    return tuple(f"{name}_m.*" for name in names if not name.endswith("_m") and f"{name}_m" not in names)


def key_differences(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> KeyDifferences:
    """Missing keys, unexpected keys and shape mismatches (``key: checkpoint (..) vs model (..)``)."""
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
    diff = key_differences(model, state_dict)
    lines = [f"checkpoint {path} does not fit the model:"]
    for title, items in (("missing keys", diff.missing), ("unexpected keys", diff.unexpected),
                         ("shape mismatches", diff.wrong_shape)):
        if items:
            lines.append(_listing(title, items))
    return "\n".join(lines)


def check_checkpoint_fit(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str,
                         fit: CheckpointFit) -> KeyDifferences:
    """``ValueError`` unless ``state_dict`` differs from ``model`` only as ``fit`` allows; returns those."""
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


def resize_pos_embeds(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Resize the position embeddings of every ViT of ``model`` in the state to its patch grid, in place."""
    for name, module in model.named_children():
        key = f"{name}.pos_embed"
        if key in state_dict and isinstance(module, VisionTransformer):
            state_dict[key] = interpolate_pos_embed(state_dict[key], module)
    return state_dict


def prepare_state(state_dict: Mapping[str, Any], model: torch.nn.Module, checkpoint_filter: CheckpointFilter,
                  own: bool = False) -> FilteredState:
    """The filtered state, position embeddings resized, and what the filter declares about it."""
    filtered = checkpoint_filter(dict(state_dict), model, own)
    resize_pos_embeds(filtered.state_dict, model)
    return filtered


def load_filtered_state(model: torch.nn.Module, filtered: FilteredState, path: str, script: str) -> CheckpointLoad:
    """Load a filtered state (strictly, or checked against the filter's declaration) and print the report."""
    if filtered.strict:
        result = load_model_state(model, filtered.state_dict, path, strict=True)
    else:
        fit = CheckpointFit(script, filtered.source, filtered.missing, filtered.unexpected)
        check_checkpoint_fit(model, filtered.state_dict, path, fit)
        result = model.load_state_dict(filtered.state_dict, strict=False)
    if filtered.after_load is not None:
        filtered.after_load()
    report = CheckpointLoad(list(result.missing_keys), list(result.unexpected_keys), filtered.renamed,
                            list(filtered.dropped))
    print(report)
    declared = _matcher(filtered.missing)
    undeclared = [k for k in report.missing_keys if not declared(k)]
    if undeclared:
        print(f"warning: {len(undeclared)} model entries are not in {path} and keep their initial values "
              f"(e.g. {', '.join(undeclared[:10])})")
    return report


def load_checkpoint_into(model: torch.nn.Module, path: str, checkpoint_filter: CheckpointFilter, script: str,
                         own: bool = False, trust: bool = False) -> tuple[dict[str, Any], CheckpointLoad]:
    """Load ``path`` into ``model`` as ``script`` does; returns the checkpoint and the report."""
    checkpoint = read_checkpoint(path, trust=trust)
    filtered = prepare_state(checkpoint["model"], model, checkpoint_filter, own)
    return checkpoint, load_filtered_state(model, filtered, path, script)
