"""What the task models' checkpoint filters share: pretraining key families, ``bert.`` rename, result."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

V = TypeVar("V")

#: ViT entries only masked-image pretraining uses; always allowed missing or unexpected.
MASK_TOKEN_KEYS: tuple[str, ...] = ("visual_encoder.mask_token", "visual_encoder_m.mask_token")

#: Pretraining checkpoint entries that fine-tuning models do not build (ignored unless built).
PRETRAINING_ONLY_KEYS: tuple[str, ...] = (
    "itm_head.*", "mim_head.*", "mim_head_m.*", "concept_head.*", "concept_head_m.*",
    "vision_proj.*", "vision_proj_m.*", "text_proj.*", "text_proj_m.*", "temp",
    "image_queue", "text_queue", "queue_ptr",
    "text_encoder.cls.*", "text_encoder_m.cls.*",
)


def without_bert(key: str) -> str:
    """``text_encoder.bert.X`` -> ``text_encoder.X``: the key with every ``bert.`` removed."""
    return key.replace("bert.", "")


def strip_bert_prefix(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Drop every ``bert.`` from the keys; two keys that would get one name raise ``ValueError``."""
    out: dict[str, V] = {}
    first: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = without_bert(key)
        if new_key in out:
            raise ValueError(f"checkpoint keys {first[new_key]!r} and {key!r} both map to {new_key!r}")
        first[new_key] = key
        out[new_key] = value
    return out


@dataclass
class FilteredState:
    """A checkpoint's state mapped onto a model, allowed ``missing``/``unexpected`` globs, ``renamed``."""

    state_dict: dict[str, Any]
    source: str
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    strict: bool = False
    renamed: dict[str, str] | None = None
    dropped: list[str] = field(default_factory=list)
    after_load: Callable[[], None] | None = None
