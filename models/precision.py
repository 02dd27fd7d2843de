"""Mixed precision in one place: the autocast context and the gradient scaler."""

from __future__ import annotations

import contextlib

import torch

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
