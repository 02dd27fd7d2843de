"""Grad-CAM maps of the retrieval model, used by ``Grounding.py`` to rank detector boxes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from models.precision import autocast

GRADCAM_MODES = ("itm", "itc")
DEFAULT_BLOCK_NUM = 8


def patch_grid(model: Any) -> tuple[int, int]:
    """``(rows, cols)`` of the ViT patch grid (``image_res // patch_size`` each)."""
    rows, cols = model.visual_encoder.grid_size
    return int(rows), int(cols)


def check_block_num(model: Any, mode: str, block_num: int) -> None:
    """Refuse a mode other than itm/itc, or a ``block_num`` outside the encoder the mode reads."""
    if mode not in GRADCAM_MODES:
        raise ValueError(f"--gradcam_mode must be one of {GRADCAM_MODES}, got {mode!r}")
    if mode == "itm":
        num, what = len(model.text_encoder.encoder.layer), "text encoder layers"
    else:
        num, what = len(model.visual_encoder.blocks), "ViT blocks"
    if not 0 <= block_num < num:
        raise ValueError(f"--block_num {block_num} is out of range for --gradcam_mode {mode}: the model has "
                         f"{num} {what} (valid: 0..{num - 1})")
    if mode == "itm" and not model.text_encoder.encoder.layer[block_num].has_cross_attention:
        raise ValueError(f"text encoder layer {block_num} has no cross-attention (bert_config must set "
                         "add_cross_attention: true)")


def _patch_columns(probs: torch.Tensor, grid: tuple[int, int], what: str) -> torch.Tensor:
    """Drop the image CLS column and lay the patch columns out on the grid: ``(..., rows, cols)``."""
    rows, cols = grid
    if probs.shape[-1] != rows * cols + 1:
        raise ValueError(f"{what} has {probs.shape[-1]} image keys, expected CLS + {rows}x{cols} patches")
    return probs[..., 1:].reshape(*probs.shape[:-1], rows, cols)


@contextmanager
def _saving_cross_attention(module: Any):
    previous = module.save_attention
    module.save_attention = True
    try:
        yield module
    finally:
        module.save_attention = previous
        module.attention_map = None
        module.attn_gradients = None


def itm_gradcam(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor,
                block_num: int = DEFAULT_BLOCK_NUM, amp: str = "none") -> torch.Tensor:
    """Grad-CAM ``(B, rows, cols)`` of text ``b`` on image ``b`` from the fusion encoder's cross-attention."""
    check_block_num(model, "itm", block_num)
    grid = patch_grid(model)
    attn = model.text_encoder.encoder.layer[block_num].crossattention.self
    with torch.no_grad(), autocast(image.device, amp):
        image_embeds = model.visual_encoder(image)
    # the map only needs the gradient at the attention probabilities, not through the ViT
    image_embeds = image_embeds.detach().requires_grad_(True)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    with torch.enable_grad(), _saving_cross_attention(attn):
        with autocast(image.device, amp):
            logits = model.itm_logits(input_ids, attention_mask, image_embeds, image_atts)
        loss = logits[:, 1].float().sum()
        cams = attn.get_attention_map()
        if cams is None:
            raise RuntimeError(f"text encoder layer {block_num} did not record its cross-attention")
        (grads,) = torch.autograd.grad(loss, cams)
    mask = attention_mask.view(attention_mask.shape[0], 1, -1, 1, 1).to(torch.float32)
    cams = _patch_columns(cams.detach().float(), grid, "the cross-attention map") * mask
    grads = _patch_columns(grads.detach().float().clamp(min=0), grid, "the cross-attention gradient") * mask
    return (cams * grads).mean(1).mean(1)


def itc_gradcam(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor,
                block_num: int = DEFAULT_BLOCK_NUM, amp: str = "none") -> torch.Tensor:
    """Grad-CAM ``(B, rows, cols)`` of text ``b`` on image ``b`` from the ViT's CLS attention."""
    check_block_num(model, "itc", block_num)
    grid = patch_grid(model)
    attn = model.visual_encoder.blocks[block_num].attn
    with torch.no_grad(), autocast(image.device, amp):
        _, text_feat = model.text_features(input_ids, attention_mask)
    # an input that requires grad keeps the attention in the graph even with a frozen ViT
    image = image.detach().requires_grad_(True)
    with torch.enable_grad():
        with autocast(image.device, amp):
            image_embeds = model.visual_encoder(image, register_blk=block_num)
            image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        loss = ((image_feat.float() * text_feat.float()).sum(-1) / model.temp).sum()
        cams = attn.get_attention_map()
        if cams is None:
            raise RuntimeError(f"ViT block {block_num} did not record its attention")
        (grads,) = torch.autograd.grad(loss, cams)
    attn.attention_map = None
    cams = _patch_columns(cams.detach().float()[:, :, 0, :], grid, "the ViT attention map")
    grads = _patch_columns(grads.detach().float()[:, :, 0, :], grid, "the ViT attention gradient").clamp(0)
    return (cams * grads).mean(1)


def gradcam(model: Any, mode: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor,
            block_num: int = DEFAULT_BLOCK_NUM, amp: str = "none") -> torch.Tensor:
    """The ``mode`` (``itm`` or ``itc``) Grad-CAM maps ``(B, rows, cols)``, in float32."""
    if mode == "itm":
        return itm_gradcam(model, input_ids, attention_mask, image, block_num, amp)
    if mode == "itc":
        return itc_gradcam(model, input_ids, attention_mask, image, block_num, amp)
    raise ValueError(f"--gradcam_mode must be one of {GRADCAM_MODES}, got {mode!r}")
