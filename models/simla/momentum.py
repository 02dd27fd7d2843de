"""Momentum (EMA) encoders and feature queues, shared by every distilling SIMLA model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import concat_all_gather

#: The EMA rate the original hard-codes in its VQA, NLVR2 and SNLI-VE models.
FINE_TUNING_MOMENTUM = 0.995


def _pair_params(pairs: Sequence[Sequence[nn.Module]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    online: list[torch.Tensor] = []
    momentum: list[torch.Tensor] = []
    for model, model_m in pairs:
        params, params_m = list(model.parameters()), list(model_m.parameters())
        if len(params) != len(params_m):
            raise RuntimeError(f"momentum twin of {type(model).__name__} has {len(params_m)} parameters, "
                               f"the online module {len(params)}")
        online.extend(params)
        momentum.extend(params_m)
    return online, momentum


class MomentumMixin:
    """Mixin for ``nn.Module`` subclasses with momentum encoders and (optionally) feature queues."""

    model_pairs: list[list[nn.Module]]
    momentum: float

    def init_momentum(self, pairs: Sequence[Sequence[nn.Module]], momentum: float) -> None:
        self.model_pairs = [list(pair) for pair in pairs]  # a plain list: contributes no state_dict keys
        self.momentum = float(momentum)
        self.copy_params()

    @torch.no_grad()
    def copy_params(self) -> None:
        """Copy the online weights into the momentum modules and freeze them."""
        online, momentum = _pair_params(self.model_pairs)
        for param, param_m in zip(online, momentum):
            param_m.data.copy_(param.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """``p_m <- m * p_m + (1 - m) * p`` as one multi-tensor ``lerp`` (last-bit rounding differs)."""
        online, momentum = _pair_params(self.model_pairs)
        online = [p.data for p in online]
        momentum = [p.data for p in momentum]
        torch._foreach_lerp_(momentum, online, 1.0 - self.momentum)

    def init_queues(self, embed_dim: int, queue_size: int, with_idx: bool = False) -> None:
        self.queue_size = int(queue_size)
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, self.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, self.queue_size), dim=0))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, self.queue_size), -100))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def check_queue_fits(self, batch_size: int, world_size: int) -> None:
        """Refuse, before training, a global batch not dividing ``queue_size`` and the queue pointer."""
        if not hasattr(self, "queue_ptr"):
            return
        global_batch = batch_size * world_size
        ptr = int(self.queue_ptr)
        if self.queue_size % global_batch or ptr % global_batch:
            raise ValueError(
                f"the feature queue cannot take this run's batches: queue_size {self.queue_size}, batch size "
                f"{batch_size} x world size {world_size} = {global_batch} per step, stored queue_ptr {ptr}; "
                f"queue_size and queue_ptr must both be multiples of {global_batch} (resume with the batch "
                "size and number of processes the checkpoint was written with, or choose ones that divide both)")

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                             idx: torch.Tensor | None = None) -> None:
        """Write the (all-gathered) momentum features of this step into the queues."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        batch_size = image_feats.shape[0]
        if self.queue_size % batch_size != 0:
            raise ValueError(f"queue_size {self.queue_size} must be a multiple of the global batch size "
                             f"{batch_size} (batch size x number of processes)")
        # the columns are computed on the device: reading the pointer would wait for the GPU every step
        columns = (self.queue_ptr + torch.arange(batch_size, device=self.queue_ptr.device)) % self.queue_size
        self.image_queue.index_copy_(1, columns, image_feats.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, columns, text_feats.T.to(self.text_queue.dtype))
        if idx is not None:
            idxs = concat_all_gather(idx)
            self.idx_queue.index_copy_(1, columns, idxs.T.to(self.idx_queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + batch_size) % self.queue_size)
