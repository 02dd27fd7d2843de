"""Optimizer updates during backward, so gradients never all exist at once (no DDP, fp16, clipping)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Optimizer classes whose update of a parameter depends only on that parameter's gradient and state.
SUPPORTED: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


class StepInBackward:
    """Hooks that apply ``optimizer``'s update during backward inside :meth:`active`; else no-ops."""

    def __init__(self, optimizer: torch.optim.Optimizer, bucket_mb: float = 16.0) -> None:
        if type(optimizer) not in SUPPORTED:
            names = ", ".join(cls.__name__ for cls in SUPPORTED)
            raise ValueError(f"step_in_backward supports the optimizers {names}; got {type(optimizer).__name__} "
                             "(its update may read more than one parameter's gradient)")
        self.optimizer = optimizer
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._enabled = False
        self._pending: dict[int, list[torch.Tensor]] = {}
        self._pending_bytes = 0
        self._handles = []
        seen: set[int] = set()
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook_for(index)))

    def _hook_for(self, group_index: int):
        def hook(param: torch.Tensor) -> None:
            if not self._enabled:
                return
            self._pending.setdefault(group_index, []).append(param)
            self._pending_bytes += param.numel() * param.element_size()
            if self._pending_bytes >= self.bucket_bytes:
                self.flush()
        return hook

    def flush(self) -> None:
        """Update the parameters whose gradients are complete and not yet applied, then free those gradients."""
        if not self._pending:
            return
        groups = self.optimizer.param_groups
        partial = [dict(groups[index], params=params) for index, params in sorted(self._pending.items())]
        self.optimizer.param_groups = partial
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
            for params in self._pending.values():
                for param in params:
                    param.grad = None
            self._pending = {}
            self._pending_bytes = 0

    @contextmanager
    def active(self) -> Iterator[None]:
        """Apply updates during the backward passes run inside this block (and any left at its end)."""
        self._enabled = True
        try:
            yield
            self.flush()
        finally:
            self._enabled = False
            self._pending = {}
            self._pending_bytes = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
