"""Regional compilation (``--compile``): every ViT block and BERT layer compiled in place, state_dict keys
unchanged, no graph break in the pretraining step, the same numbers as the uncompiled model, no
recompilation at fixed shapes, Grad-CAM through compiled regions, DDP-wrapped models and the flags."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.pretrain_step import PRESETS, make_batch
from engine.cli import base_parser
from engine.training import training_parts
from models.bert import BertLayer
from models.compile import compile_regions, compiled_graphs
from models.simla.gradcam import itc_gradcam, itm_gradcam
from models.simla.pretrain import SIMLA
from models.vit import Block, VisionTransformer
from optim import create_optimizer
from tests.test_grounding import VOCAB, _tiny_model, build_tokenizer

TINY = PRESETS["tiny"]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch, under torch's own recompile limit (an imported timm module raises it)."""
    torch.compiler.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        yield
    torch.compiler.reset()


def tiny_pretrain_model() -> SIMLA:
    tokenizer = SimpleNamespace(vocab_size=TINY["vocab_size"], cls_token_id=101, pad_token_id=0, mask_token_id=103)
    torch.manual_seed(0)
    return SIMLA(tokenizer=tokenizer, config=dict(TINY)).train()


def pretrain_step(model: SIMLA, batch: tuple) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses and gradients of one forward + backward, the random draws seeded."""
    image, text, codes, masked = batch
    torch.manual_seed(1)
    losses = model(image, text, masked_visual_token_pos=masked, masked_visual_tok_labels=codes[masked], alpha=0.4)
    sum(losses).backward()
    return [loss.detach() for loss in losses], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def tiny_batch() -> tuple:
    return make_batch(TINY, TINY["batch_size"], torch.device("cpu"), torch.Generator().manual_seed(0))


def test_compile_regions_compiles_every_block_in_place_and_keeps_state_dict_keys():
    model = tiny_pretrain_model()
    before = model.state_dict()
    regions = compile_regions(model, backend="eager")
    blocks = [m for m in model.modules() if isinstance(m, (Block, BertLayer))]
    vit_depth, bert_depth = TINY["vision_depth"], model.text_encoder.config.num_hidden_layers
    assert regions == len(blocks) == 2 * vit_depth + 2 * bert_depth  # online and momentum encoders
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert model._compiled_call_impl is None and model.text_encoder._compiled_call_impl is None
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_compile_regions_names_an_unavailable_backend():
    with pytest.raises(RuntimeError, match=r"--compile: torch.compile \(backend 'no_such_backend', mode None\) "
                                           r"is unavailable here: .*no_such_backend"):
        compile_regions(tiny_pretrain_model(), backend="no_such_backend")


def test_pretraining_step_compiles_fullgraph_and_matches_the_uncompiled_model():
    model = tiny_pretrain_model()
    compiled = copy.deepcopy(model)
    batch = tiny_batch()
    losses, grads = pretrain_step(model, batch)
    # fullgraph=True: any graph break inside a block or layer raises; aot_eager also traces the backward
    compile_regions(compiled, backend="aot_eager", fullgraph=True)
    compiled_losses, compiled_grads = pretrain_step(compiled, batch)
    assert compiled_graphs() > 0
    torch.testing.assert_close(compiled_losses, losses, rtol=0, atol=1e-5)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_second_and_third_steps_at_fixed_shapes_do_not_recompile():
    model = tiny_pretrain_model()
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, model)
    compile_regions(model, backend="eager", fullgraph=True)
    batch = tiny_batch()
    pretrain_step(model, batch)
    optimizer.step()
    graphs = compiled_graphs()
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            pretrain_step(model, batch)
            optimizer.step()
    assert graphs > 0 and compiled_graphs() == graphs


def test_gradcam_through_compiled_regions_matches_the_uncompiled_model():
    model = _tiny_model(image_res=40, patch_size=8)
    enc = build_tokenizer(VOCAB)(["the red circle", "a large blue square"], padding="longest", return_tensors="pt")
    image = torch.randn(2, 3, 40, 40)
    itm = itm_gradcam(model, enc.input_ids, enc.attention_mask, image, block_num=1)
    itc = itc_gradcam(model, enc.input_ids, enc.attention_mask, image, block_num=2)
    # the capture of the probabilities breaks the graph there, so they stay a node of the autograd graph
    assert compile_regions(model, backend="aot_eager") == 12  # 3 ViT blocks and 3 BERT layers, and their twins
    torch.testing.assert_close(itm_gradcam(model, enc.input_ids, enc.attention_mask, image, block_num=1), itm,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(itc_gradcam(model, enc.input_ids, enc.attention_mask, image, block_num=2), itc,
                               rtol=0, atol=1e-6)


def test_ddp_wrapped_model_compiles_the_blocks_it_wraps(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
    image = torch.randn(2, 3, 32, 32)
    vit(image).sum().backward()
    grads = {name: p.grad for name, p in vit.named_parameters() if p.grad is not None}
    vit.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(vit)
        assert compile_regions(ddp, backend="aot_eager", fullgraph=True) == 2
        ddp(image).sum().backward()
    finally:
        dist.destroy_process_group()
    assert compiled_graphs() > 0
    compiled_grads = {name: p.grad for name, p in vit.named_parameters() if p.grad is not None}
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_compile_flags_compile_the_model_of_every_training_script(tmp_path, capsys):
    parser = base_parser("x", "c.yaml", str(tmp_path))
    defaults = parser.parse_args([])
    assert (defaults.compile, defaults.compile_mode, defaults.compile_backend) == (False, None, "inductor")
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile_mode", "fastest"])
    assert parser.parse_args(["--compile_mode", "max-autotune"]).compile_mode == "max-autotune"
    config = {"optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, "from_scratch": True,
              "schedular": {"sched": "cosine", "lr": 1e-4, "epochs": 1, "min_lr": 1e-5, "decay_rate": 1,
                            "warmup_lr": 1e-5, "warmup_epochs": 0, "cooldown_epochs": 0}}
    for flags, compiled in (([], False), (["--compile", "--compile_backend", "eager"], True)):
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2)
        training_parts(parser.parse_args(flags), config, model, model, torch.device("cpu"), None, 1)
        assert all((block._compiled_call_impl is not None) == compiled for block in model.blocks)
    assert ("--compile: 2 regions (ViT blocks, BERT layers) compiled in place with torch.compile (backend eager, "
            "mode default)") in capsys.readouterr().out
