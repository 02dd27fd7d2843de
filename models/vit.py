"""Vision Transformer image encoder (ViT-B/16 by default); state-dict keys of the original (timm 0.5)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from configs.schema import COMMON_OPTIONAL
from models.attention import AttentionCapture, attention, merge_heads
from models.lean_autograd import LeanDropout, gelu_linear, has_module_hooks

DEIT_BASE_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"


class Attention(AttentionCapture, nn.Module):
    """Self-attention with optional capture of the probabilities and their gradient (Grad-CAM)."""

    def __init__(self, dim: int, num_heads: int = 12, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = LeanDropout(proj_drop)

    def forward(self, x: torch.Tensor, register_hook: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        context, _ = attention(q, k, v, dropout_p=drop, capture=self.capture if register_hook else None)
        return self.proj_drop(self.proj(merge_heads(context)))


class LeanMlp(Mlp):
    """timm's ``Mlp`` with ``fc2(gelu(...))`` as :func:`~models.lean_autograd.gelu_linear`; same numbers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop1 = LeanDropout(self.drop1.p)
        self.drop2 = LeanDropout(self.drop2.p)

    def _gelu_then_fc2(self) -> bool:
        return (isinstance(self.act, nn.GELU) and isinstance(self.norm, nn.Identity)
                and isinstance(self.fc2, nn.Linear) and (self.drop1.p == 0 or not self.training)
                and not has_module_hooks(self.act, self.drop1, self.norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._gelu_then_fc2():
            return super().forward(x)
        return self.drop2(gelu_linear(self.fc1(x), self.fc2, self.act.approximate))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Any = None) -> None:
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = LeanMlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU,
                           drop=drop)

    def forward(self, x: torch.Tensor, register_hook: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), register_hook=register_hook))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with a learnable mask token that can replace patch embeddings (masked image modelling)."""

    #: the DeiT file or URL the weights were loaded from (None: as initialised)
    init_source: str | None = None

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 mask_token: bool = True) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.pos_drop = LeanDropout(p=drop_rate)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _mask_patches(self, x: torch.Tensor, masked_visual_token_pos: torch.Tensor) -> torch.Tensor:
        if self.mask_token is None:
            raise ValueError("this ViT was built without a mask token (vit_mask_token: false)")
        w = masked_visual_token_pos.flatten(1).unsqueeze(-1).to(x.dtype)
        return x * (1 - w) + self.mask_token.to(x.dtype) * w

    def forward(self, x: torch.Tensor, masked_visual_token_pos: torch.Tensor | None = None,
                register_blk: int = -1) -> torch.Tensor:
        x = self.patch_embed(x)
        if masked_visual_token_pos is not None:
            x = self._mask_patches(x, masked_visual_token_pos)
        return self._encode_patches(x, register_blk)

    def draws_random_numbers(self) -> bool:
        """Whether a forward pass uses the random generator (dropout or drop-path active in training)."""
        return self.training and (self.pos_drop.p > 0 or any(
            not isinstance(b.drop_path, nn.Identity) or b.attn.attn_drop > 0 or b.attn.proj_drop.p > 0
            for b in self.blocks))

    def forward_plain_and_masked(self, x: torch.Tensor, masked_visual_token_pos: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x), self(x, masked_visual_token_pos))``, as one 2B batch unless the passes are random."""
        if self.draws_random_numbers():
            return self(x), self(x, masked_visual_token_pos)
        patches = self.patch_embed(x)
        both = torch.cat([patches, self._mask_patches(patches, masked_visual_token_pos)])
        return self._encode_patches(both).chunk(2)

    def _encode_patches(self, x: torch.Tensor, register_blk: int = -1) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = self.pos_drop(x + self.pos_embed[:, : x.size(1), :])
        for i, block in enumerate(self.blocks):
            capture = i == register_blk
            if self.grad_checkpointing and self.training and not capture and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, register_hook=capture)
        return self.norm(x)


def vit_from_config(config: Mapping[str, Any], mask_token: bool | None = None) -> VisionTransformer:
    """Build the image encoder from a task config (defaults: ViT-B/16 with a mask token)."""
    config = {**COMMON_OPTIONAL, **config}
    if mask_token is None:
        mask_token = bool(config["vit_mask_token"])
    return VisionTransformer(
        img_size=int(config["image_res"]),
        patch_size=int(config["patch_size"]),
        embed_dim=int(config["vision_width"]),
        depth=int(config["vision_depth"]),
        num_heads=int(config["vision_heads"]),
        mlp_ratio=4.0,
        qkv_bias=True,
        mask_token=mask_token,
    )


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize ``(1, extra + g*g, C)`` position embeddings to a ``new_grid`` square grid (bicubic)."""
    orig_grid = int(math.sqrt(pos_embed.shape[-2] - num_extra_tokens))
    if orig_grid == new_grid:
        return pos_embed
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:]
    width = grid.shape[-1]
    grid = grid.reshape(1, orig_grid, orig_grid, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((extra, grid), dim=1)


def interpolate_pos_embed(pos_embed_checkpoint: torch.Tensor, visual_encoder: VisionTransformer) -> torch.Tensor:
    """Adapt checkpoint position embeddings to ``visual_encoder``'s patch grid (cls position kept)."""
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra = visual_encoder.pos_embed.shape[-2] - num_patches
    orig = int(math.sqrt(pos_embed_checkpoint.shape[-2] - num_extra))
    new = int(math.sqrt(num_patches))
    if orig == new:
        return pos_embed_checkpoint
    print(f"reshape position embedding from {orig ** 2} to {new ** 2}")
    return resize_pos_embed(pos_embed_checkpoint, new, num_extra)


def load_deit_weights(visual_encoder: VisionTransformer, source: str = DEIT_BASE_URL):
    """Initialise from a DeiT checkpoint given as a local file or a URL; returns the load result."""
    if os.path.isfile(source):
        checkpoint_obj = torch.load(source, map_location="cpu", weights_only=True)
    elif "://" in source:
        try:
            checkpoint_obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=True)
        except OSError as exc:  # URLError, HTTPError, connection errors
            raise OSError(f"could not download the DeiT weights {source} ({exc}). Give a local copy as "
                          "'deit_weights: <file>' in the config, or set 'from_scratch: true' for random "
                          "weights (a --checkpoint then supplies them)") from exc
    else:
        raise FileNotFoundError(f"DeiT weights not found: {source!r} is neither a file nor a URL")
    state_dict = dict(checkpoint_obj.get("model", checkpoint_obj))
    if "pos_embed" not in state_dict:
        raise KeyError(f"{source}: no 'pos_embed' entry; is this a ViT/DeiT checkpoint?")
    state_dict["pos_embed"] = interpolate_pos_embed(state_dict["pos_embed"], visual_encoder)
    result = visual_encoder.load_state_dict(state_dict, strict=False)
    visual_encoder.init_source = source
    print(result)
    return result
