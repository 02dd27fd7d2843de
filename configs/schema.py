"""Which configuration keys each task reads, and validation of loaded configs.

Every task config is a flat mapping plus two nested sections, ``optimizer`` and ``schedular`` (the
original SIMLA code spells the scheduler section that way, and so do we). A missing required key is an
error; a key that no script reads only triggers a warning, so that old or annotated YAML files keep
working.

To teach the validator about a new key, add it to the task's ``optional`` mapping (or to
``COMMON_OPTIONAL``), or call :func:`extend_schema` from the code that introduces the key.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Raised for invalid configuration files, overrides or values."""


class ConfigWarning(UserWarning):
    """Emitted for configuration keys that no script reads."""


@dataclass
class SectionSchema:
    """Keys of a nested section such as ``optimizer``."""

    required: tuple[str, ...]
    optional: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> set[str]:
        """All keys the section may contain."""
        return set(self.required) | set(self.optional)


@dataclass
class TaskSchema:
    """Keys read by one task.

    ``optional`` maps a key to the default the scripts use when it is absent (``None`` when the key is
    accepted but never read).
    """

    required: tuple[str, ...]
    optional: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> set[str]:
        """All top-level keys the task may contain (including the common optional ones)."""
        return set(self.required) | set(self.optional) | set(COMMON_OPTIONAL)


# Keys accepted by every task. The vision_* / patch_size keys size the ViT (the original hard-codes
# ViT-B/16: width 768, depth 12, heads 12, patch 16); they are used for small test models.
COMMON_OPTIONAL: dict[str, Any] = {
    "vision_width": 768,
    "vision_depth": 12,
    "vision_heads": 12,
    "patch_size": 16,
    "vit_mask_token": True,
    # options beyond the original (defaults keep its behaviour)
    "grad_checkpointing": False,
    "randaugment_clip_sharpness": False,
    "randaugment_fix_autocontrast": False,
    "deit_weights": None,
    "max_words": 30,
    # random initialisation instead of the DeiT / BERT downloads (demo and tests; a checkpoint then
    # supplies the weights)
    "from_scratch": False,
}

SECTION_SCHEMAS: dict[str, SectionSchema] = {
    "optimizer": SectionSchema(
        required=("opt", "lr"),
        optional={
            "weight_decay": 0.0,
            "opt_eps": None,
            "opt_betas": None,
            "opt_args": None,
            "momentum": 0.9,
        },
    ),
    "schedular": SectionSchema(
        required=("sched", "epochs"),
        optional={
            "lr": None,  # present in every shipped file but never read: the peak LR is optimizer.lr
            # read by the LR scheduler factories; every shipped file sets them
            "min_lr": None,
            "decay_rate": None,
            "warmup_lr": None,
            "warmup_epochs": None,
            "cooldown_epochs": None,
            "lr_cycle_mul": 1.0,
            "lr_cycle_limit": 1,
            "lr_noise": None,
            "lr_noise_pct": 0.67,
            "lr_noise_std": 1.0,
            "seed": 42,
            "decay_epochs": None,
            "patience_epochs": None,
            "eval_metric": None,
        },
    ),
}

_SECTIONS = ("optimizer", "schedular")

TASK_SCHEMAS: dict[str, TaskSchema] = {
    "pretrain": TaskSchema(
        required=(
            "train_file", "bert_config", "image_res", "vision_width", "embed_dim", "batch_size",
            "temp", "mlm_probability", "queue_size", "momentum", "alpha", "image_tokenizer_path",
            *_SECTIONS,
        ),
        optional={
            "from_scratch": False, "disable_wandb": False,
            # options beyond the original (defaults keep its behaviour)
            "distill_softmax_dim": 1, "mim_aligned_views": False, "psl_layer": None,
            "psl_keys_per_head": 4, "psl_num_keywords": 5, "mask_num_patches": 75, "mask_min_patches": 16,
            "mask_min_aspect": 0.3, "mask_max_aspect": None,
        },
    ),
    "retrieval": TaskSchema(
        required=(
            "train_file", "val_file", "test_file", "image_root", "bert_config", "image_res",
            "batch_size_train", "batch_size_test", "queue_size", "momentum", "vision_width",
            "embed_dim", "temp", "k_test", "alpha", "warm_up", "mlm_probability", *_SECTIONS,
        ),
        optional={
            "freeze_visual_encoder": False, "distill": None, "save_sims": None,
            # options beyond the original (defaults keep its behaviour)
            "enqueue_idx": False, "itm_eval_batch_size": 256,
        },
    ),
    "grounding": TaskSchema(
        required=(
            "train_file", "test_file", "refcoco_data", "det_file", "coco_file", "image_root",
            "bert_config", "image_res", "batch_size", "queue_size", "momentum", "vision_width",
            "embed_dim", "temp", "alpha", "warm_up", "mlm_probability", *_SECTIONS,
        ),
        optional={
            "distill": None,
            # options beyond the original (defaults keep its behaviour): writing image ids into the
            # retrieval model's idx_queue; choosing the best-scoring detection box when no box has a
            # positive Grad-CAM score (the original reuses the previous expression's box)
            "enqueue_idx": False, "grounding_skip_empty_fix": False,
        },
    ),
    "vqa": TaskSchema(
        required=(
            "train_file", "test_file", "answer_list", "vqa_root", "vg_root", "image_res",
            "batch_size_train", "batch_size_test", "k_test", "alpha", "distill", "warm_up", "eos",
            "bert_config", *_SECTIONS,
        ),
        # options beyond the original (defaults keep its behaviour): answer-decoder depth (its layers
        # come from the last encoder layers of a pretraining checkpoint), passing alpha to the decoder's
        # distillation (the original does not), the distillation log-softmax axis
        optional={"decoder_depth": 6, "vqa_distill_alpha": False, "distill_softmax_dim": 1},
    ),
    "nlvr": TaskSchema(
        required=(
            "train_file", "val_file", "test_file", "image_root", "image_res", "batch_size",
            "bert_config", "alpha", "distill", "warm_up", *_SECTIONS,
        ),
        optional={
            "eval_ema": None,
            # options beyond the original (defaults keep its behaviour): NLVR text-encoder depth and the
            # first layer of the cross-attention-sharing pairs; copying the momentum models after
            # loading --checkpoint instead of before
            "nlvr_num_layers": 18, "nlvr_split_layer": 6, "copy_momentum_after_load": False,
        },
    ),
    "nlvr_pretrain": TaskSchema(
        required=(
            "train_file", "bert_config", "image_res", "vision_width", "embed_dim", "batch_size",
            *_SECTIONS,
        ),
        optional={"nlvr_num_layers": 18, "nlvr_split_layer": 6},
    ),
    "ve": TaskSchema(
        required=(
            "train_file", "val_file", "test_file", "image_root", "image_res", "batch_size_train",
            "batch_size_test", "alpha", "distill", "warm_up", "bert_config", *_SECTIONS,
        ),
    ),
}

# Other names under which scripts may refer to a task.
TASK_ALIASES: dict[str, str] = {
    "retrieval_coco": "retrieval",
    "retrieval_flickr": "retrieval",
    "zero_shot_retrieval": "retrieval",
    "re": "retrieval",
    "pretrain_nlvr": "nlvr_pretrain",
}


def canonical_task(task: str) -> str:
    """Map a task name or alias (case-insensitive) to a key of :data:`TASK_SCHEMAS`."""
    name = task.lower().replace("-", "_")
    name = TASK_ALIASES.get(name, name)
    if name not in TASK_SCHEMAS:
        known = ", ".join(sorted(TASK_SCHEMAS))
        raise ConfigError(f"unknown task {task!r}; known tasks: {known}")
    return name


def extend_schema(
    task: str,
    required: Iterable[str] = (),
    optional: Mapping[str, Any] | None = None,
) -> TaskSchema:
    """Add required and/or optional keys to a task's schema; returns the updated schema."""
    schema = TASK_SCHEMAS[canonical_task(task)]
    extra = tuple(k for k in required if k not in schema.required)
    schema.required = schema.required + extra
    if optional:
        schema.optional.update(optional)
    return schema


def _closest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def _where(path: Any) -> str:
    return f" in {path}" if path is not None else ""


def _check_keys(
    mapping: Mapping[str, Any],
    required: Iterable[str],
    known: set[str],
    prefix: str,
    task: str,
    path: Any,
) -> None:
    present = [str(k) for k in mapping]
    unknown = [k for k in present if k not in known]
    for key in unknown:
        guess = _closest(key, known)
        hint = f"; closest known key: '{prefix}{guess}'" if guess else ""
        warnings.warn(
            f"config key '{prefix}{key}'{_where(path)} is not read by the {task} task{hint}",
            ConfigWarning,
            stacklevel=3,
        )
    for key in required:
        if key in mapping:
            continue
        guess = _closest(key, unknown)
        hint = f" (did you mean '{prefix}{guess}'?)" if guess else ""
        raise ConfigError(
            f"missing required config key '{prefix}{key}'{_where(path)} for the {task} task{hint}"
        )


def validate_config(config: Mapping[str, Any], task: str, path: Any = None) -> Mapping[str, Any]:
    """Check ``config`` against the schema of ``task``.

    Raises :class:`ConfigError` for a missing required key (naming the key, the file ``path`` and a
    similarly spelled key present in the file, if any) or a malformed section; warns with
    :class:`ConfigWarning` about keys the task does not read. Returns ``config`` unchanged.
    """
    name = canonical_task(task)
    schema = TASK_SCHEMAS[name]
    if not isinstance(config, Mapping):
        raise ConfigError(f"config{_where(path)} must be a mapping, got {type(config).__name__}")
    _check_keys(config, schema.required, schema.known, "", name, path)
    for section, section_schema in SECTION_SCHEMAS.items():
        if section not in config:
            continue
        value = config[section]
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config key '{section}'{_where(path)} must be a mapping, got {type(value).__name__}"
            )
        _check_keys(value, section_schema.required, section_schema.known, f"{section}.", name, path)
    optimizer = config.get("optimizer")
    if isinstance(optimizer, Mapping):
        lr = optimizer.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ConfigError(
                f"config key 'optimizer.lr'{_where(path)} must be a number, got {lr!r}"
            )
    return config
