"""Parity checks of the two NLVR models: the NLVR2 classifier and text-assignment pretraining."""

from __future__ import annotations

import torch

from tests.parity_checks.support import check_tokenized, fixture_config, fixture_tokenizer, grad_outputs


def check_nlvr(fx: dict) -> dict:
    from models.simla.nlvr import SIMLA

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    check_tokenized(tokenizer, inputs["sentences"], inputs["text_input_ids"], inputs["text_attention_mask"],
                    padding="longest")
    text = tokenizer(list(inputs["sentences"]), padding="longest", return_tensors="pt")
    model = SIMLA(tokenizer=tokenizer, config=dict(fixture_config(fx), from_scratch=True))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    images = torch.cat([inputs["image0"], inputs["image1"]])
    targets = inputs["targets"]
    with torch.no_grad():
        logits = model(images, text, targets=targets, train=False)
    loss = model(images, text, targets=targets, train=True, alpha=inputs["alpha"])
    loss.backward()
    out = {"logits": logits, "loss": loss.item()}
    out.update(grad_outputs(model, ()))
    return out


def check_pretrain_nlvr(fx: dict) -> dict:
    from models.simla.pretrain_nlvr import SIMLA

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    check_tokenized(tokenizer, inputs["captions"], inputs["text_input_ids"], inputs["text_attention_mask"],
                    padding="longest", truncation=True, max_length=25)
    text = tokenizer(list(inputs["captions"]), padding="longest", truncation=True, max_length=25,
                     return_tensors="pt")
    model = SIMLA(tokenizer=tokenizer, config=dict(fixture_config(fx), from_scratch=True))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    # the random pairing of the recorded run is injected
    recorded = (inputs["pair_image_index_0"].clone(), inputs["pair_image_index_1"].clone(),
                inputs["pair_labels"].clone())
    model.sample_pairs = lambda weights: recorded
    loss, inter = model(inputs["image"], text, return_intermediates=True)
    loss.backward()
    out = {"loss": loss.item(), "logits": inter["logits"].detach(), "sampling_weights": inter["sampling_weights"]}
    out.update(grad_outputs(model, ()))
    return out


CHECKS = {"nlvr": check_nlvr, "pretrain_nlvr": check_pretrain_nlvr}
