"""Image-text alignment losses of the pretraining and retrieval models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class ITA(NamedTuple):
    loss: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor
    sim_i2t_targets: torch.Tensor
    sim_t2i_targets: torch.Tensor


class ITM(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    neg_image_idx: torch.Tensor
    neg_text_idx: torch.Tensor


def sample_negatives(weights: torch.Tensor) -> torch.Tensor:
    """One index per row drawn from each row's (unnormalised) weights, in a single call."""
    return torch.multinomial(weights, 1).squeeze(1)


def ita_loss(model: Any, image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
             text_feat_m: torch.Tensor, alpha: float, sim_targets: torch.Tensor | None = None) -> ITA:
    """ITA of ``model``; ``sim_targets`` defaults to the batch diagonal (the queue holds no positives)."""
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), model.image_queue.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), model.text_queue.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / model.temp
        sim_t2i_m = text_feat_m @ image_feat_all / model.temp
        if sim_targets is None:
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / model.temp
    sim_t2i = text_feat @ image_feat_all / model.temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return ITA((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i, sim_i2t_targets, sim_t2i_targets)


def itm_loss(model: Any, positive_cls: torch.Tensor, ita: ITA,
             fuse_negatives: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             same_image: torch.Tensor | None = None) -> ITM:
    """ITM over ``B`` positives (fused [CLS] ``positive_cls``) and ``2B`` ``fuse_negatives`` pairs."""
    batch = positive_cls.shape[0]
    with torch.no_grad():
        weights_i2t = F.softmax(ita.sim_i2t[:, :batch].float(), dim=1)
        weights_t2i = F.softmax(ita.sim_t2i[:, :batch].float(), dim=1)
        if same_image is None:
            weights_i2t.fill_diagonal_(0)
            weights_t2i.fill_diagonal_(0)
        else:
            weights_i2t.masked_fill_(same_image, 0)
            weights_t2i.masked_fill_(same_image, 0)
    neg_image_idx, neg_text_idx = model.sample_itm_negatives(weights_t2i, weights_i2t)
    negative_cls = fuse_negatives(neg_image_idx, neg_text_idx)
    logits = model.itm_head(torch.cat([positive_cls, negative_cls]))
    labels = (torch.arange(3 * batch, device=logits.device) < batch).long()  # made on the device: no copy
    return ITM(F.cross_entropy(logits, labels), logits, labels, neg_image_idx, neg_text_idx)
