"""Optional metric tracking (TensorBoard or Weights & Biases), off unless asked for."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from utils import is_main_process


def gradient_norm(model: torch.nn.Module) -> float:
    """L2 norm over all parameter gradients (computed only when it is logged)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


class Tracker:
    """Logs per-iteration scalars every ``every`` iterations on the main process."""

    def __init__(self, backend: str, output_dir: str, config: Mapping[str, Any], every: int = 50) -> None:
        self.backend = backend if is_main_process() else "none"
        self.every = every
        self._writer: Any = None
        self._run: Any = None
        if self.backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("--log_backend tensorboard needs the 'tensorboard' package "
                                  "(pip install tensorboard)") from exc
            self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        elif self.backend == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("--log_backend wandb needs the 'wandb' package (pip install wandb)") from exc
            mode = os.environ.get("WANDB_MODE", "offline")
            self._run = wandb.init(project="vision-language-alignment", config=dict(config), dir=output_dir,
                                   mode=mode)
        elif self.backend != "none":
            raise ValueError(f"unknown log backend {backend!r} (none, tensorboard, wandb)")

    def log(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
        if self._run is not None:
            self._run.log(dict(values), step=step)

    def step_callback(self, epoch: int, num_batches: int, optimizer: torch.optim.Optimizer
                      ) -> Callable[[int, Mapping[str, torch.Tensor], torch.nn.Module], None] | None:
        if self.backend == "none":
            return None

        def on_step(i: int, losses: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
            if i % self.every:
                return
            values = {name: float(loss) for name, loss in losses.items()}
            values["lr"] = optimizer.param_groups[0]["lr"]
            norm = gradient_norm(model)
            values["grad_norm"] = norm if math.isfinite(norm) else float("nan")
            self.log(values, epoch * num_batches + i)

        return on_step

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._run is not None:
            self._run.finish()
