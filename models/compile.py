"""Compilation of the repeated blocks: each ViT block and BERT layer, in place."""

from __future__ import annotations

import torch.nn as nn

from models.bert import BertLayer
from models.vit import Block


def compile_regions(model: nn.Module, mode: str | None = None, backend: str = "inductor", fullgraph: bool = False,
                    dynamic: bool | None = None) -> int:
    """Compile every ViT ``Block`` and ``BertLayer`` of ``model`` in place; returns how many."""
    blocks = [module for module in model.modules() if isinstance(module, (Block, BertLayer))]
    for block in blocks:
        block.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return len(blocks)
