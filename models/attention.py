"""The one attention function shared by the ViT and BERT blocks.

PyTorch's fused ``scaled_dot_product_attention`` is used whenever the attention probabilities are
not needed. An explicit softmax path is taken only when a caller reads the probabilities (keyword
pseudo-labels, ``output_attentions``) or their gradient (Grad-CAM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention on ``(B, H, L, D)`` tensors with an additive mask.

    Returns ``(context, probs)``; ``probs`` are the pre-dropout softmax probabilities and are only
    computed (and kept in the autograd graph) when ``need_probs`` is true.
    """
    mask = _mask_for(query.dtype, attn_mask)
    if not need_probs:
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)
        return context, None
    scale = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return torch.matmul(dropped, value), probs


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, H*D)`` -> ``(B, H, L, D)``."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B, L, H*D)``."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)
