"""The pretraining model's pieces: masking, momentum, queues, keyword targets, optimizer groups, data."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import Pretrain
from benchmarks.pretrain_step import PRESETS, make_batch
from configs.schema import with_defaults
from dataset.annotations import AnnotationError
from dataset.pretrain import PretrainDataset
from models.simla.pretrain import SIMLA, mask_tokens
from models.tokenization import tokenizer_from_tokens
from optim import create_optimizer
from tests.parity import manifest_weight_decay_groups

PARITY = os.path.join(os.path.dirname(__file__), "data", "parity")


@pytest.fixture(scope="module")
def fixture():
    return torch.load(os.path.join(PARITY, "fixtures", "pretrain.pt"), weights_only=True)


@pytest.fixture(scope="module")
def tiny_model(fixture):
    torch.manual_seed(0)
    tokenizer = tokenizer_from_tokens(fixture["vocab_tokens"])
    config = dict(fixture["config"], bert_config=fixture["bert_config"], from_scratch=True)
    return SIMLA(tokenizer=tokenizer, config=config)


def test_mask_tokens_statistics_and_protected_tokens():
    torch.manual_seed(0)
    ids = torch.randint(104, 515, (400, 250))
    ids[:, 0] = 101
    ids[:, -20:] = 0
    masked_ids, labels = mask_tokens(ids, 515, 0.15)
    selected = labels != -100
    eligible = (ids != 0) & (ids != 101)
    assert not selected[~eligible].any()
    rate = selected.sum().item() / eligible.sum().item()
    assert 0.14 < rate < 0.16
    assert torch.equal(labels[selected], ids[selected])
    as_mask = (masked_ids == 103) & selected
    unchanged = (masked_ids == ids) & selected
    assert 0.78 < as_mask.sum().item() / selected.sum().item() < 0.82
    assert 0.08 < unchanged.sum().item() / selected.sum().item() < 0.12
    assert torch.equal(masked_ids[~selected], ids[~selected])


def test_mask_tokens_draw_order_matches_the_original():
    """bernoulli(p), bernoulli(0.8), bernoulli(0.5), randint, all over the full shape on the CPU."""
    ids = torch.tensor([[101, 150, 151, 152, 153, 154, 0, 0]] * 3)
    torch.manual_seed(7)
    got_ids, got_labels = mask_tokens(ids, 515, 0.5)
    torch.manual_seed(7)
    shape = ids.shape
    masked = torch.bernoulli(torch.full(shape, 0.5)).bool() & (ids != 0) & (ids != 101)
    replaced = torch.bernoulli(torch.full(shape, 0.8)).bool() & masked
    randomised = torch.bernoulli(torch.full(shape, 0.5)).bool() & masked & ~replaced
    words = torch.randint(515, shape, dtype=torch.long)
    want = ids.clone()
    want[replaced] = 103
    want[randomised] = words[randomised]
    assert torch.equal(got_ids, want)
    assert torch.equal(got_labels, torch.where(masked, ids, torch.full_like(ids, -100)))


def test_mask_tokens_exact_draws_from_a_seeded_generator():
    """The same draws replayed from an equally seeded generator give the exact ids and labels, with
    other special-token ids; the global generator is not used."""
    pad, cls, mask, vocab = 7, 8, 9, 60
    ids = torch.tensor([[8, 20, 21, 22, 23, 24, 25, 26, 7, 7],
                        [8, 30, 31, 32, 33, 34, 35, 36, 37, 38],
                        [8, 40, 41, 42, 7, 7, 7, 7, 7, 7]])
    global_state = torch.get_rng_state()
    got_ids, got_labels = mask_tokens(ids, vocab, 0.6, pad, cls, mask, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), global_state)

    replay = torch.Generator().manual_seed(11)
    selected = torch.bernoulli(torch.full(ids.shape, 0.6), generator=replay).bool()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=replay).bool()
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=replay).bool()
    words = torch.randint(vocab, ids.shape, dtype=torch.long, generator=replay)
    want_ids, want_labels = ids.tolist(), ids.tolist()
    for r, row in enumerate(ids.tolist()):
        for c, token in enumerate(row):
            if token in (pad, cls) or not selected[r, c]:
                want_labels[r][c] = -100
            elif to_mask[r, c]:
                want_ids[r][c] = mask
            elif to_random[r, c]:
                want_ids[r][c] = int(words[r, c])
    assert got_ids.tolist() == want_ids and got_labels.tolist() == want_labels
    # the draws select, mask, randomise and keep some tokens, so every branch above was taken
    eligible = (ids != pad) & (ids != cls)
    assert (selected & eligible & to_mask).any() and (selected & eligible & ~to_mask & to_random).any()
    assert (selected & eligible & ~to_mask & ~to_random).any() and (~selected & eligible).any()


def test_mask_tokens_probability_zero_and_one():
    ids = torch.tensor([[101, 150, 151, 0], [101, 152, 0, 0]])
    masked_ids, labels = mask_tokens(ids, 515, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked_ids, ids) and labels.tolist() == [[-100] * 4] * 2
    _, labels = mask_tokens(ids, 515, 1.0, generator=torch.Generator().manual_seed(0))
    assert labels.tolist() == [[-100, 150, 151, -100], [-100, 152, -100, -100]]


def test_mask_tokens_never_copies_the_ids_to_the_host():
    """Only the draws cross devices: ids on the ``meta`` device (which cannot be copied out) work, and the
    generator advances as for CPU ids."""
    ids = torch.tensor([[101, 150, 151, 152, 0], [101, 153, 154, 0, 0]])
    on_cpu, on_meta = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mask_tokens(ids, 515, 0.5, generator=on_cpu)
    masked_ids, labels = mask_tokens(ids.to("meta"), 515, 0.5, generator=on_meta)
    assert masked_ids.device.type == labels.device.type == "meta" and masked_ids.shape == labels.shape == ids.shape
    assert torch.equal(on_cpu.get_state(), on_meta.get_state())


def test_momentum_update_formula(tiny_model):
    model = tiny_model
    online = model.vision_proj.weight.detach().clone()
    before = model.vision_proj_m.weight.detach().clone() + 1.0
    with torch.no_grad():
        model.vision_proj_m.weight.copy_(before)
    model._momentum_update()
    expected = before * 0.995 + online * (1 - 0.995)
    torch.testing.assert_close(model.vision_proj_m.weight.detach(), expected)
    assert not model.vision_proj_m.weight.requires_grad
    model.copy_params()
    torch.testing.assert_close(model.vision_proj_m.weight, model.vision_proj.weight)
    tied_m = model.text_encoder_m.cls.predictions.decoder.weight
    assert tied_m is model.text_encoder_m.bert.embeddings.word_embeddings.weight


def test_queue_enqueue_wraps_and_checks_batch(tiny_model):
    model = tiny_model
    model.queue_ptr.zero_()
    feats_i = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    feats_t = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    model._dequeue_and_enqueue(feats_i, feats_t)
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.image_queue[:, :4], feats_i.T)
    model._dequeue_and_enqueue(feats_i, feats_t)
    assert int(model.queue_ptr) == 0
    torch.testing.assert_close(model.text_queue[:, 4:8], feats_t.T)
    with pytest.raises(ValueError, match="multiple of the global batch size 3"):
        model._dequeue_and_enqueue(feats_i[:3], feats_t[:3])


def test_initial_queues_are_unit_columns(tiny_model):
    fresh = SIMLA(tokenizer=tiny_model.tokenizer, config=dict(
        embed_dim=16, queue_size=8, image_res=64, vision_width=32, vision_depth=1, vision_heads=4, temp=0.07,
        momentum=0.995, mlm_probability=0.15, bert_config=dict(tiny_model.text_encoder.config.to_dict(),
                                                                num_hidden_layers=1), from_scratch=True))
    torch.testing.assert_close(fresh.image_queue.norm(dim=0), torch.ones(8))
    assert fresh.queue_ptr.tolist() == [0]
    assert fresh.psl_layer == 0


def test_keyword_tie_order_follows_torch_topk(tiny_model):
    """The counts of the original's worked example select positions [1, 5, 2, 4, 3]."""
    counts = torch.tensor([[1, 3, 2, 1, 2, 3, 1, 1, 1, 1, 0]])
    assert counts.topk(5, dim=-1).indices.tolist() == [[1, 5, 2, 4, 3]]
    model = tiny_model.eval()
    ids = torch.tensor([[101, 151, 167, 329, 151, 186, 296, 153, 231, 0, 0]])
    mask = (ids != 0).long()
    image_embeds = torch.randn(1, 17, 32)
    salient = model.salient_tokens(ids, mask, image_embeds, torch.ones(1, 17, dtype=torch.long))
    assert salient.shape == (1, 5)
    assert set(salient.flatten().tolist()) <= set(ids.flatten().tolist())


def test_itm_negatives_never_the_positive(tiny_model):
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(6, 6), dim=1)
    weights.fill_diagonal_(0)
    for _ in range(20):
        neg_images, neg_texts = tiny_model.sample_itm_negatives(weights, weights)
        assert neg_images.shape == (6,)
        assert not torch.any(neg_images == torch.arange(6))
        assert not torch.any(neg_texts == torch.arange(6))


def test_optimizer_groups_match_the_full_size_manifest(tiny_model):
    """The tiny model has the full-size module structure: its groups are those the original's rule gives
    for the full-size parameter names (302 without and 181 with weight decay)."""
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, tiny_model)
    no_decay, decay = optimizer.param_groups
    expected = manifest_weight_decay_groups(os.path.join(PARITY, "manifests", "pretrain.json"))
    assert (len(no_decay["params"]), len(decay["params"])) == expected == (302, 181)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert names[id(no_decay["params"][0])] == "visual_encoder.patch_embed.proj.bias"
    assert names[id(decay["params"][0])] == "temp"
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"visual_encoder.pos_embed", "visual_encoder.cls_token", "visual_encoder.mask_token"} <= decayed
    assert isinstance(optimizer, torch.optim.AdamW)


def _forward(model, fixture, **kwargs):
    inputs = fixture["inputs"]
    text = SimpleNamespace(input_ids=inputs["text_input_ids"], attention_mask=inputs["text_attention_mask"])
    model.mask = lambda ids: (inputs["mlm_input_ids"].clone(), inputs["mlm_labels"].clone())
    return model(inputs["image"], text, masked_visual_token_pos=inputs["masked_visual_token_pos"],
                 masked_visual_tok_labels=inputs["masked_visual_tok_labels"], alpha=inputs["alpha"], **kwargs)


def _fixture_model(fixture, **extra):
    tokenizer = tokenizer_from_tokens(fixture["vocab_tokens"])
    config = dict(fixture["config"], bert_config=fixture["bert_config"], from_scratch=True, **extra)
    model = SIMLA(tokenizer=tokenizer, config=config)
    model.load_state_dict(fixture["state_dict"])
    return model.eval()


def test_distill_softmax_dim_flag_changes_only_mlm(fixture):
    original = _forward(_fixture_model(fixture), fixture)
    fixed = _forward(_fixture_model(fixture, distill_softmax_dim=-1), fixture)
    assert abs(original[0].item() - fixture["outputs"]["loss_mlm"]) < 1e-4
    assert abs(fixed[0].item() - original[0].item()) > 1e-2
    for a, b in zip(original[1:], fixed[1:]):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_gives_the_same_gradients(fixture):
    def grads(**extra):
        model = _fixture_model(fixture, **extra).train()
        for module in model.modules():  # every dropout off: the two runs must be deterministic
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "dropout_prob"):
                module.dropout_prob = 0.0
        sum(_forward(model, fixture)).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(), grads(grad_checkpointing=True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 483
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


def test_static_shape_losses_match_boolean_indexing():
    """Heads on every position averaged under the masks give the losses and gradients of the heads on the
    selected positions; the MIM codes as the full grid or flat give the same."""
    preset = dict(PRESETS["tiny"])
    torch.manual_seed(0)
    tokenizer = SimpleNamespace(vocab_size=preset["vocab_size"], cls_token_id=101, pad_token_id=0, mask_token_id=103)
    reference = SIMLA(tokenizer=tokenizer, config=preset).train()
    image, text, codes, masked = make_batch(preset, 4, torch.device("cpu"), torch.Generator().manual_seed(0))

    def run(static_shapes: bool, flat_codes: bool):
        model = copy.deepcopy(reference)
        model.static_shapes = static_shapes
        torch.manual_seed(1)  # the same masking, negatives and dropout in every run
        labels = codes[masked] if flat_codes else None
        losses = model(image, text, visual_token_ids=None if flat_codes else codes, masked_visual_token_pos=masked,
                       masked_visual_tok_labels=labels, alpha=0.4)
        sum(losses).backward()
        return torch.stack(losses), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    indexed_losses, indexed_grads = run(False, flat_codes=True)
    assert torch.isfinite(indexed_losses).all()
    for static_shapes, flat_codes in ((True, False), (True, True), (False, False)):
        losses, grads = run(static_shapes, flat_codes)
        torch.testing.assert_close(losses, indexed_losses)
        assert grads.keys() == indexed_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, indexed_grads[name], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="masked_visual_tok_labels or visual_token_ids"):
        reference(image, text, masked_visual_token_pos=masked)


@pytest.mark.parametrize("pad_to_max", [False, True])
def test_captions_padded_to_the_longest_or_on_request_to_the_maximum(fixture, pad_to_max):
    seen = {}

    def model(image, text, **kwargs):
        seen["ids"] = text.input_ids
        return (torch.zeros(()),) * 5

    tokenizer = tokenizer_from_tokens(fixture["vocab_tokens"])
    dvae = SimpleNamespace(get_codebook_indices=lambda images: torch.zeros(2, 2, 2, dtype=torch.long))
    config = with_defaults({"alpha": 0.4} | ({"pad_captions_to_max": True} if pad_to_max else {}), "pretrain")
    step = Pretrain.make_step(model, tokenizer, dvae, config, torch.device("cpu"), epoch=0)
    step((torch.zeros(2, 3, 8, 8), ["a b c", "a"], torch.zeros(2, 3, 8, 8), torch.zeros(2, 2, 2)), 0, 1)
    longest = len(tokenizer("a b c").input_ids)
    assert longest < 25 and seen["ids"].shape == (2, 25 if pad_to_max else longest)


# ------------------------------------------------------------------------------------------------ data


class _Views:
    def __call__(self, img):
        return torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_pretrain_dataset_reads_lists_and_strings(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(image)
    ann = _write(tmp_path / "ann.json", [{"image": str(image), "caption": ["A Red, square!", "red"]},
                                         {"image": str(image), "caption": "Two-dogs"}])
    dataset = PretrainDataset([ann, ann], _Views(), lambda: torch.zeros(2, 2).numpy())
    assert len(dataset) == 4
    sample = dataset[1]
    assert sample[1] == "two dogs" and sample[0].shape == (3, 8, 8)
    assert dataset[0][1] in {"a red square", "red"}


def test_pretrain_dataset_unreadable_image_is_none_with_warning(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    ann = _write(tmp_path / "ann.json", [{"image": str(bad), "caption": "x"},
                                         {"image": str(tmp_path / "missing.png"), "caption": "y"}])
    dataset = PretrainDataset(ann, _Views(), lambda: None)
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert dataset[0] is None
    with pytest.warns(UserWarning, match="missing.png"):
        assert dataset[1] is None


def test_pretrain_dataset_annotation_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.png", "caption": "x"},\n {"image": }]')
    with pytest.raises(AnnotationError, match=r"broken.json: malformed JSON at line 2, column 12"):
        PretrainDataset([str(broken)], _Views(), lambda: None)
    missing_field = _write(tmp_path / "nofield.json", [{"image": "a.png", "caption": "x"}, {"image": "b.png"}])
    with pytest.raises(AnnotationError, match=r"nofield.json: entry 1 has no field 'caption'"):
        PretrainDataset([missing_field], _Views(), lambda: None)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        PretrainDataset([str(tmp_path / "nowhere.json")], _Views(), lambda: None)
