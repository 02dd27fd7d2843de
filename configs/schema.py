"""Which configuration keys each task reads, and validation of loaded configs.

A missing required key or a value of the wrong type (:data:`KEY_TYPES`, ``SectionSchema.types``) is an
error; an unknown key only warns. :func:`with_defaults` fills optional keys, :func:`as_written` drops them
again. New keys: a task's ``optional``/``COMMON_OPTIONAL`` plus :data:`KEY_TYPES`, or :func:`extend_schema`.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Raised for invalid configuration files, overrides or values."""


class ConfigWarning(UserWarning):
    """Emitted for configuration keys that no script reads."""


@dataclass(frozen=True)
class ValueType:
    """The type a config value must have: a check and the words that describe it in errors."""

    description: str
    check: Callable[[Any], bool]
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        """True when ``value`` has this type (``None`` only for a nullable type)."""
        if value is None:
            return self.nullable
        return self.check(value)

    def or_null(self) -> ValueType:
        """The same type that also accepts ``null``."""
        return ValueType(f"{self.description} or null", self.check, nullable=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(item) for item in value)


INT = ValueType("an integer", _is_int)
NUMBER = ValueType("a number", _is_number)  # a float; integers are accepted
BOOL = ValueType("a boolean (true/false)", lambda value: isinstance(value, bool))
STR = ValueType("a string", lambda value: isinstance(value, str))
STR_LIST = ValueType("a list of strings", _is_str_list)
STR_OR_LIST = ValueType("a string or a list of strings",
                        lambda value: isinstance(value, str) or _is_str_list(value))
NUMBER_LIST = ValueType("a list of numbers", _is_number_list)
NUMBER_OR_LIST = ValueType("a number or a list of numbers",
                           lambda value: _is_number(value) or _is_number_list(value))
MAPPING = ValueType("a mapping", lambda value: isinstance(value, Mapping))


@dataclass
class SectionSchema:
    """Keys of a nested section such as ``optimizer``."""

    required: tuple[str, ...]
    optional: dict[str, Any] = field(default_factory=dict)
    types: dict[str, ValueType] = field(default_factory=dict)

    @property
    def known(self) -> set[str]:
        """All keys the section may contain."""
        return set(self.required) | set(self.optional)


@dataclass
class TaskSchema:
    """Keys read by one task: ``optional`` maps key -> default (``None``: accepted, never read)."""

    required: tuple[str, ...]
    optional: dict[str, Any] = field(default_factory=dict)
    types: dict[str, ValueType] = field(default_factory=dict)

    @property
    def known(self) -> set[str]:
        """All top-level keys the task may contain (including the common optional ones)."""
        return set(self.required) | set(self.optional) | set(COMMON_OPTIONAL)


# Keys accepted by every task; vision_* / patch_size size the ViT (small test models).
COMMON_OPTIONAL: dict[str, Any] = {
    "vision_width": 768,
    "vision_depth": 12,
    "vision_heads": 12,
    "patch_size": 16,
    "vit_mask_token": True,
    "grad_checkpointing": False,
    "randaugment_clip_sharpness": False,
    "randaugment_fix_autocontrast": False,
    "deit_weights": None,
    "max_words": 30,
    # decompression-bomb guard (larger images are unreadable); null or 0: no limit
    "max_image_pixels": 2 ** 28,
    # random initialisation instead of the DeiT / BERT downloads
    "from_scratch": False,
}

SECTION_SCHEMAS: dict[str, SectionSchema] = {
    "optimizer": SectionSchema(
        required=("opt", "lr"),
        types={
            "opt": STR, "lr": NUMBER, "weight_decay": NUMBER, "opt_eps": NUMBER.or_null(),
            "opt_betas": NUMBER_LIST.or_null(), "opt_args": MAPPING.or_null(), "momentum": NUMBER,
        },
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
        types={
            "sched": STR, "epochs": INT, "lr": NUMBER.or_null(), "min_lr": NUMBER, "decay_rate": NUMBER,
            "warmup_lr": NUMBER, "warmup_epochs": INT, "cooldown_epochs": INT, "lr_cycle_mul": NUMBER,
            "lr_cycle_limit": INT, "lr_noise": NUMBER_OR_LIST.or_null(), "lr_noise_pct": NUMBER,
            "lr_noise_std": NUMBER, "seed": INT, "decay_epochs": NUMBER.or_null(),
            "patience_epochs": INT.or_null(), "eval_metric": STR.or_null(),
        },
        optional={
            "lr": None,  # present in every shipped file but never read: the peak LR is optimizer.lr
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

# Expected type of every top-level key any task knows.
KEY_TYPES: dict[str, ValueType] = {
    **dict.fromkeys(("train_file", "val_file", "test_file"), STR_OR_LIST),
    **dict.fromkeys(
        ("image_root", "bert_config", "image_tokenizer_path", "refcoco_data", "det_file", "coco_file",
         "answer_list", "vqa_root", "vg_root", "eos"),
        STR,
    ),
    **dict.fromkeys(("deit_weights", "save_sims", "shard_caption_key"), STR.or_null()),
    **dict.fromkeys(
        ("image_res", "vision_width", "vision_depth", "vision_heads", "patch_size", "embed_dim",
         "batch_size", "batch_size_train", "batch_size_test", "queue_size", "k_test", "max_words",
         "decoder_depth", "nlvr_num_layers", "nlvr_split_layer", "itm_eval_batch_size",
         "psl_keys_per_head", "psl_num_keywords", "mask_num_patches", "mask_min_patches",
         "distill_softmax_dim"),
        INT,
    ),
    # null: the last text layer (psl_layer), no pixel limit (max_image_pixels, where 0 means the same)
    **dict.fromkeys(("psl_layer", "max_image_pixels"), INT.or_null()),
    **dict.fromkeys(("temp", "mlm_probability", "momentum", "alpha", "mask_min_aspect"), NUMBER),
    "mask_max_aspect": NUMBER.or_null(),
    **dict.fromkeys(
        ("vit_mask_token", "grad_checkpointing", "randaugment_clip_sharpness",
         "randaugment_fix_autocontrast", "from_scratch", "disable_wandb", "mim_aligned_views", "distill",
         "warm_up", "eval_ema", "freeze_visual_encoder", "enqueue_idx", "grounding_skip_empty_fix",
         "vqa_distill_alpha", "copy_momentum_after_load", "mlm_empty_mask_nan", "shard_index_cache",
         "pad_captions_to_max"),
        BOOL,
    ),
    **dict.fromkeys(_SECTIONS, MAPPING),
}

TASK_SCHEMAS: dict[str, TaskSchema] = {
    "pretrain": TaskSchema(
        required=(
            "train_file", "bert_config", "image_res", "vision_width", "embed_dim", "batch_size",
            "temp", "mlm_probability", "queue_size", "momentum", "alpha", "image_tokenizer_path",
            *_SECTIONS,
        ),
        optional={
            "from_scratch": False, "disable_wandb": False,
            "distill_softmax_dim": 1, "mim_aligned_views": False, "psl_layer": None,
            "psl_keys_per_head": 4, "psl_num_keywords": 5, "mask_num_patches": 75, "mask_min_patches": 16,
            "mask_min_aspect": 0.3, "mask_max_aspect": None,
            # a batch with no masked token: zero MLM loss (true: the original's NaN)
            "mlm_empty_mask_nan": False,
            # captions padded to the 25-token maximum, not the batch's longest: one shape for compiled code
            "pad_captions_to_max": False,
            # webdataset shards in train_file (dataset/shards.py): the caption is the .txt member, or this
            # key of the .json member; shard indexes are cached beside the shards when writable
            "shard_caption_key": None, "shard_index_cache": True,
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
            # grounding_skip_empty_fix: best-scoring box when no box has a positive Grad-CAM score
            "enqueue_idx": False, "grounding_skip_empty_fix": False,
        },
    ),
    "vqa": TaskSchema(
        required=(
            "train_file", "test_file", "answer_list", "vqa_root", "vg_root", "image_res",
            "batch_size_train", "batch_size_test", "k_test", "alpha", "distill", "warm_up", "eos",
            "bert_config", *_SECTIONS,
        ),
        optional={"decoder_depth": 6, "vqa_distill_alpha": False, "distill_softmax_dim": 1},
    ),
    "nlvr": TaskSchema(
        required=(
            "train_file", "val_file", "test_file", "image_root", "image_res", "batch_size",
            "bert_config", "alpha", "distill", "warm_up", *_SECTIONS,
        ),
        optional={
            "eval_ema": None,
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
    types: Mapping[str, ValueType] | None = None,
) -> TaskSchema:
    """Add required and/or optional keys (and their ``types``) to a task's schema; returns it."""
    schema = TASK_SCHEMAS[canonical_task(task)]
    extra = tuple(k for k in required if k not in schema.required)
    schema.required = schema.required + extra
    if optional:
        schema.optional.update(optional)
    if types:
        schema.types.update(types)
    return schema


class FilledConfig(dict):
    """A config with defaults filled in; ``filled`` names the absent keys (``section.key`` in sections)."""

    filled: frozenset[str] = frozenset()


def with_defaults(config: Mapping[str, Any], task: str) -> FilledConfig:
    """A copy of ``config`` with every absent optional key of ``task`` (and its sections) defaulted."""
    schema = TASK_SCHEMAS[canonical_task(task)]
    result = FilledConfig(config)
    filled = set(getattr(config, "filled", ()))
    for key, default in {**COMMON_OPTIONAL, **schema.optional}.items():
        if key not in result:
            result[key] = copy.deepcopy(default)
            filled.add(key)
    for section, section_schema in SECTION_SCHEMAS.items():
        values = result.get(section)
        missing = [k for k in section_schema.optional if isinstance(values, Mapping) and k not in values]
        if missing:
            result[section] = {**values, **{k: copy.deepcopy(section_schema.optional[k]) for k in missing}}
            filled.update(f"{section}.{k}" for k in missing)
    result.filled = frozenset(filled)
    return result


def as_written(config: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of ``config`` without the keys :func:`with_defaults` filled in."""
    filled = getattr(config, "filled", frozenset())
    written = {k: v for k, v in config.items() if k not in filled}
    for section in SECTION_SCHEMAS:
        if any(key.startswith(f"{section}.") for key in filled) and isinstance(written.get(section), Mapping):
            written[section] = {k: v for k, v in written[section].items() if f"{section}.{k}" not in filled}
    return written


def section_values(section: Mapping[str, Any] | Any, name: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """The ``name`` section with defaults for absent/null keys; ``KeyError`` for a missing required key."""
    given = section if isinstance(section, Mapping) else vars(section)
    schema = SECTION_SCHEMAS[name]
    values = {**schema.optional, **{k: v for k, v in given.items() if v is not None}}
    for key in (*schema.required, *required):
        if values.get(key) is None:
            raise KeyError(f"{name} config is missing the required key '{key}'")
    return values


def patch_grid(config: Mapping[str, Any]) -> int:
    """Side of the ViT patch grid: ``image_res // patch_size``."""
    return int(config["image_res"]) // int(config.get("patch_size", COMMON_OPTIONAL["patch_size"]))


def expected_type(task: str, key: str) -> ValueType | None:
    """The type a (possibly dotted) key of ``task`` must have; None when undeclared."""
    section, dot, name = key.partition(".")
    if dot:
        section_schema = SECTION_SCHEMAS.get(section)
        return section_schema.types.get(name) if section_schema else None
    schema = TASK_SCHEMAS[canonical_task(task)]
    return schema.types.get(key) or KEY_TYPES.get(key)


def _closest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def _where(path: Any) -> str:
    return f" in {path}" if path is not None else ""


_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"), (Mapping, "mapping"),
)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_errors(
    mapping: Mapping[str, Any], known: set[str], task: str, prefix: str
) -> list[tuple[str, str]]:
    """``(key, "expected ..., found ...")`` for every known key whose value has the wrong type."""
    errors = []
    for key, value in mapping.items():
        if key not in known or (prefix == "" and key in SECTION_SCHEMAS):
            continue
        kind = expected_type(task, f"{prefix}{key}")
        if kind is None or kind.accepts(value):
            continue
        errors.append((f"{prefix}{key}",
                       f"expected {kind.description}, found {_type_name(value)} {_shown(value)}"))
    return errors


def _raise_type_errors(errors: list[tuple[str, str]], path: Any) -> None:
    if len(errors) == 1:
        key, detail = errors[0]
        raise ConfigError(f"config key '{key}'{_where(path)} has the wrong type: {detail}")
    if errors:
        listing = "".join(f"\n  '{key}': {detail}" for key, detail in errors)
        raise ConfigError(f"{len(errors)} config keys{_where(path)} have the wrong type:{listing}")


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
    """Check ``config`` against ``task``'s schema: :class:`ConfigError` for missing keys, malformed sections
    or wrong types (all in one error); :class:`ConfigWarning` for unread keys. Returns ``config``."""
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
    errors = _type_errors(config, schema.known, name, "")
    for section, section_schema in SECTION_SCHEMAS.items():
        if section in config:
            errors += _type_errors(config[section], section_schema.known, name, f"{section}.")
    _raise_type_errors(errors, path)
    return config
