"""Regional compilation (``--compile``): each ViT block and BERT layer compiled in place, keys unchanged."""

from __future__ import annotations

import torch.nn as nn
from torch._dynamo.utils import counters

from models.bert import BertLayer
from models.vit import Block

#: ``--compile_mode`` values (None: torch's default).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Graphs a region may keep (torch's default is 8): a BERT layer builds 18 in pretraining (text and fusion
#: passes, no-grad momentum passes, new shapes); beyond the limit new call patterns would run uncompiled.
RECOMPILE_LIMIT = 64


def compile_regions(model: nn.Module, mode: str | None = None, backend: str = "inductor", fullgraph: bool = False,
                    dynamic: bool | None = None) -> int:
    """``nn.Module.compile`` every ViT block and BERT layer of ``model`` (or of a DDP-wrapped one); returns how many."""
    regions = [module for module in model.modules() if isinstance(module, (Block, BertLayer))]
    try:
        for region in regions:
            region.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic,
                           recompile_limit=RECOMPILE_LIMIT)
    except RuntimeError as exc:
        raise RuntimeError(f"--compile: torch.compile (backend {backend!r}, mode {mode!r}) is unavailable here: "
                           f"{exc}") from exc
    return len(regions)


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process; a rise at shapes seen before means recompilation."""
    return counters["stats"]["unique_graphs"]
