"""The pretraining forward and backward read no tensor value back to the host (no ``.item()``, ``int()``
or ``nonzero``), so on a GPU they do not wait for the device. Counted on the CPU with a dispatch mode."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.pretrain_step import PRESETS, make_batch
from models.simla.pretrain import SIMLA

HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_pretraining_step_reads_nothing_back_to_the_host():
    preset = dict(PRESETS["tiny"])
    torch.manual_seed(0)
    tokenizer = SimpleNamespace(vocab_size=preset["vocab_size"], cls_token_id=101, pad_token_id=0, mask_token_id=103)
    model = SIMLA(tokenizer=tokenizer, config=preset).train()
    image, text, codes, masked = make_batch(preset, 4, torch.device("cpu"), torch.Generator().manual_seed(0))
    labels = codes[masked]
    ptr_before = model.queue_ptr.clone()
    with HostReads() as reads:
        losses = model(image, text, visual_token_ids=codes, masked_visual_token_pos=masked,
                       masked_visual_tok_labels=labels, alpha=0.4)
        sum(losses).backward()
    assert reads.counts == Counter()
    # the queue still advanced by the batch
    assert int(model.queue_ptr) == (int(ptr_before) + 4) % model.queue_size
