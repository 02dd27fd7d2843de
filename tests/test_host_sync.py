"""The pretraining step reads no tensor value back to the host (no ``.item()``, ``.tolist()``, ``nonzero`` or
boolean-mask indexing) except at progress lines, so on a GPU it does not wait for the device. Counted on the
CPU with a dispatch mode (``.tolist()``, invisible to it, is counted by wrapping the method)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import Pretrain
from benchmarks.pretrain_step import PRESETS, make_batch
from engine.loop import EpochSettings, train_one_epoch
from models.simla.pretrain import SIMLA
from optim import create_optimizer
from scheduler import create_scheduler

HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
BOOL_INDEXING = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"}


class HostReads(TorchDispatchMode):
    """Counts host reads per ``label`` (set by the caller as the work proceeds)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[object, str]] = Counter()
        self.label: object = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in HOST_READS or (name in BOOL_INDEXING and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1])):
            self.counts[self.label, name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def reads(monkeypatch):
    mode = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor: torch.Tensor):
        mode.counts[mode.label, "tolist"] += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    return mode


def tiny_model(static_shapes: bool | None = True):
    preset = dict(PRESETS["tiny"])
    torch.manual_seed(0)
    tokenizer = SimpleNamespace(vocab_size=preset["vocab_size"], cls_token_id=101, pad_token_id=0, mask_token_id=103)
    model = SIMLA(tokenizer=tokenizer, config=preset).train()
    model.static_shapes = static_shapes
    return model, make_batch(preset, 4, torch.device("cpu"), torch.Generator().manual_seed(0))


def test_counter_sees_boolean_indexing_and_tolist(reads):
    x = torch.arange(4.0)
    with reads:
        x[x > 1] = 0
        x[x > 0].tolist()
    assert sum(reads.counts.values()) == 3


@pytest.mark.parametrize("static_shapes", [True, None])
def test_pretraining_forward_and_backward_read_nothing_back(reads, static_shapes):
    model, (image, text, codes, masked) = tiny_model(static_shapes)
    ptr_before = model.queue_ptr.clone()
    with reads:
        losses = model(image, text, visual_token_ids=codes, masked_visual_token_pos=masked, alpha=0.4)
        sum(losses).backward()
    if static_shapes:
        assert reads.counts == Counter()
    else:  # on the CPU the default keeps the cheaper boolean indexing of the selected positions
        assert reads.counts[None, "aten.index.Tensor"] > 0
    # the queue still advanced by the batch
    assert int(model.queue_ptr) == (int(ptr_before) + 4) % model.queue_size


class Encoding(dict):
    """What the tokenizer returns: ``input_ids``/``attention_mask`` as keys and attributes."""

    __getattr__ = dict.__getitem__

    def to(self, device: torch.device, non_blocking: bool = False) -> Encoding:
        return self


def test_training_steps_read_the_losses_only_at_progress_lines(reads):
    model, (image, text, codes, masked) = tiny_model()
    tokenizer = lambda captions, **kwargs: Encoding(input_ids=text.input_ids,  # noqa: E731
                                                    attention_mask=text.attention_mask)
    dvae = SimpleNamespace(get_codebook_indices=lambda images: codes)
    steps = 6
    loader = [(image, ["a caption"] * 4, image, masked)] * steps
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, model)
    scheduler, _ = create_scheduler({"sched": "cosine", "lr": 1e-4, "epochs": 2, "min_lr": 1e-5, "decay_rate": 1,
                                     "warmup_lr": 1e-5, "warmup_epochs": 1, "cooldown_epochs": 0}, optimizer)
    step = Pretrain.make_step(model, tokenizer, dvae, {"alpha": 0.4, "pad_captions_to_max": False},
                              torch.device("cpu"), epoch=1)

    def labelled_step(batch, i, num_batches):
        reads.label = i  # what follows, up to the next step, belongs to step i
        return step(batch, i, num_batches)

    with reads:
        stats = train_one_epoch(model, loader, optimizer, scheduler, 1, torch.device("cpu"), labelled_step,
                                EpochSettings(loss_names=Pretrain.LOSS_NAMES, print_freq=100))
    per_step = Counter()
    for (label, _), count in reads.counts.items():
        per_step[label] += count
    # step 0 and the last step print a progress line: the losses of all steps since are read then, in one go
    assert set(per_step) == {0, steps - 1}
    assert reads.counts[0, "tolist"] == 1 and reads.counts[steps - 1, "tolist"] == 1
    assert all(float(stats[name]) > 0 for name in Pretrain.LOSS_NAMES)


def test_tracker_reads_the_step_losses_only_when_it_logs(tmp_path, reads):
    from engine.tracking import Tracker

    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    tracker = Tracker("tensorboard", str(tmp_path), {}, every=50)
    logged = []
    tracker.log = lambda values, step: logged.append((step, values))
    on_step = tracker.step_callback(epoch=1, num_batches=100, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with reads:
        for i in (1, 2, 50):
            reads.label = i
            on_step(i, {"loss": torch.tensor(float(i))}, model)
    tracker.close()
    assert {label for label, _ in reads.counts} == {50}
    assert [(step, values["loss"], values["lr"]) for step, values in logged] == [(150, 50.0, 0.1)]
