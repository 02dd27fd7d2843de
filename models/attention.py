"""The one attention function of the ViT and BERT blocks: fused SDPA, else an explicit softmax."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.lean_autograd import dropout_matmul

_fused_dropout = False


def use_fused_dropout(enabled: bool) -> None:
    """``--fused_dropout``: dropout inside the fused kernel (flash on GPUs); other draws than the original's."""
    global _fused_dropout
    _fused_dropout = enabled


def _mask_for(scores_dtype: torch.dtype, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Cast an additive mask to the attention dtype without turning large negatives into -inf."""
    if mask is None or mask.dtype == scores_dtype:
        return mask
    return mask.to(scores_dtype).clamp(min=torch.finfo(scores_dtype).min)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    need_probs: bool = False,
    capture: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention on ``(B, H, L, D)`` -> ``(context, probs)``; pre-dropout ``probs`` or None.
    ``capture`` receives ``probs`` before they are used (Grad-CAM)."""
    mask = _mask_for(query.dtype, attn_mask)
    need_probs = need_probs or capture is not None
    if not need_probs and (dropout_p == 0.0 or _fused_dropout):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p), None
    scale = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    if capture is not None:
        capture(probs)
    context = dropout_matmul(probs, value, dropout_p) if dropout_p > 0 else torch.matmul(probs, value)
    return context, (probs if need_probs else None)


class AttentionCapture:
    """Grad-CAM access to a module's attention probabilities and their gradient."""

    attention_map: torch.Tensor | None = None
    attn_gradients: torch.Tensor | None = None

    def save_attn_gradients(self, grad: torch.Tensor) -> None:
        self.attn_gradients = grad

    def get_attn_gradients(self) -> torch.Tensor | None:
        return self.attn_gradients

    def get_attention_map(self) -> torch.Tensor | None:
        return self.attention_map

    @torch.compiler.disable  # compiled regions break here, so ``probs`` stays a node of the autograd graph
    def capture(self, probs: torch.Tensor) -> None:
        """Keep ``probs`` and, once backward reaches them, their gradient."""
        self.attention_map = probs
        if probs.requires_grad:
            probs.register_hook(self.save_attn_gradients)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, H*D)`` -> ``(B, H, L, D)``."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B, L, H*D)``."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)
