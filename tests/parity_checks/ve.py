"""Parity check of the SNLI-VE classifier."""

from __future__ import annotations

import torch

from tests.parity_checks.support import check_tokenized, fixture_config, fixture_tokenizer, grad_outputs


def check_ve(fx: dict) -> dict:
    from models.simla.ve import SIMLA

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    check_tokenized(tokenizer, inputs["sentences"], inputs["text_input_ids"], inputs["text_attention_mask"],
                    padding="longest")
    text = tokenizer(list(inputs["sentences"]), padding="longest", return_tensors="pt")
    model = SIMLA(tokenizer=tokenizer, config=fixture_config(fx))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(inputs["image"], text, targets=inputs["targets"], train=False)
    loss = model(inputs["image"], text, targets=inputs["targets"], train=True, alpha=inputs["alpha"])
    loss.backward()
    out = {"logits": logits, "loss": loss.item()}
    out.update(grad_outputs(model, ()))
    return out


CHECKS = {"ve": check_ve}
