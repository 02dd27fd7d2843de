"""Parity check of the full pretraining step."""

from __future__ import annotations

import torch

from tests.parity_checks.support import check_tokenized, fixture_config, fixture_tokenizer, grad_outputs


def check_pretrain(fx: dict) -> dict:
    from models.simla.pretrain import SIMLA

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    check_tokenized(tokenizer, inputs["captions"], inputs["text_input_ids"], inputs["text_attention_mask"],
                    padding="longest", truncation=True, max_length=25)
    encoded = tokenizer(list(inputs["captions"]), padding="longest", truncation=True, max_length=25,
                        return_tensors="pt")
    model = SIMLA(tokenizer=tokenizer, config=dict(fixture_config(fx), from_scratch=True))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    # the masking draw of the recorded run is injected
    model.mask = lambda ids: (inputs["mlm_input_ids"].clone(), inputs["mlm_labels"].clone())
    text = encoded
    losses = model(inputs["image"], text, visual_token_ids=inputs["visual_token_ids"],
                   masked_visual_token_pos=inputs["masked_visual_token_pos"],
                   masked_visual_tok_labels=inputs["masked_visual_tok_labels"], alpha=inputs["alpha"],
                   return_intermediates=True)
    loss_mlm, loss_ita, loss_itm, loss_mim, loss_pseudo, inter = losses
    total = loss_mlm + loss_itm + loss_ita + loss_mim + loss_pseudo
    state = model.state_dict()
    out = {
        "loss_mlm": loss_mlm.item(), "loss_ita": loss_ita.item(), "loss_itm": loss_itm.item(),
        "loss_mim": loss_mim.item(), "loss_pseudo": loss_pseudo.item(), "total_loss": total.item(),
        "image_queue_after": state["image_queue"].clone(), "text_queue_after": state["text_queue"].clone(),
        "queue_ptr_after": state["queue_ptr"].clone(),
        "momentum_params_after": {k: state[k].clone() for k in fx["outputs"]["momentum_params_after"]},
        "intermediates": {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inter.items()},
    }
    total.backward()
    out.update(grad_outputs(model, fx["outputs"]["full_grads"]))
    return out


CHECKS = {"pretrain": check_pretrain}
