"""Mixed precision in one place: the autocast context, the gradient scaler and frozen weights cast once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """Autocast context for ``amp`` in {none, bf16, fp16}; a no-op for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in DTYPES:
        raise ValueError(f"--amp must be none, bf16 or fp16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling is needed only for fp16."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


@contextlib.contextmanager
def cast_frozen_once(modules: Iterable[nn.Module], device_type: str) -> Iterator[None]:
    """Under autocast, give each ``nn.Linear`` of ``modules`` whose float32 weights are frozen a low-precision
    copy of them for the block, and put the weights back after it.

    Autocast keeps its cast of a weight that requires grad for the whole region but casts a frozen one again
    at every use, so a momentum encoder run in several passes of a step cast its weights once per pass. The
    copies hold the values autocast makes, so results are unchanged. Outside autocast: nothing.
    """
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    frozen = [(layer, name, weight) for module in modules for layer in module.modules() if isinstance(layer, nn.Linear)
              for name, weight in layer._parameters.items()
              if weight is not None and weight.dtype == torch.float32 and not weight.requires_grad]
    try:
        for layer, name, weight in frozen:
            layer._parameters[name] = weight.to(dtype)
        yield
    finally:
        for layer, name, weight in frozen:
            layer._parameters[name] = weight
