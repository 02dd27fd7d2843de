"""Parity checks of the image encoder and the BERT modes."""

from __future__ import annotations

import torch

from tests.parity_checks.support import check_tokenized, fixture_tokenizer


def check_vit(fx: dict) -> dict:
    from models.vit import interpolate_pos_embed, vit_from_config

    config = fx["config"]
    inputs = fx["inputs"]
    vit = vit_from_config(config)
    vit.load_state_dict(fx["state_dict"], strict=True)
    vit.eval()
    with torch.no_grad():
        out = {
            "embeds": vit(inputs["image"]),
            "embeds_masked": vit(inputs["image"], inputs["masked_patch_positions"]),
            "embeds_register_blk_8": vit(inputs["image"], register_blk=inputs["register_blk"]),
        }
        bigger = vit_from_config(dict(config, image_res=inputs["interp_image_res"]))
        out["interpolated_pos_embed"] = interpolate_pos_embed(fx["state_dict"]["pos_embed"], bigger)
    if vit.blocks[inputs["register_blk"]].attn.get_attention_map() is None:
        raise AssertionError("register_blk did not record the attention map")
    return out


def check_bert_modes(fx: dict) -> dict:
    from models.bert import BertForMaskedLM, load_bert_config

    inputs = fx["inputs"]
    check_tokenized(fixture_tokenizer(fx), inputs["captions"], inputs["text_input_ids"],
                    inputs["text_attention_mask"], padding="longest", truncation=True, max_length=25)
    model = BertForMaskedLM(load_bert_config(fx["bert_config"]))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    ids, mask = inputs["text_input_ids"], inputs["text_attention_mask"]
    image_embeds, image_atts = inputs["image_embeds"], inputs["image_atts"]
    with torch.no_grad():
        text = model.bert(ids, mask, mode="text", output_attentions=True)
        multi = model.bert(ids, mask, encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                           mode="multimodal", output_attentions=True)
        text_embeds = model.bert.embeddings(ids)
        as_input = model.bert(inputs_embeds=inputs["patch_embeds"], attention_mask=image_atts,
                              encoder_hidden_states=text_embeds, encoder_attention_mask=mask)
        mlm_args = dict(encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, mode="multimodal")
        logits = model(inputs["mlm_input_ids"], mask, return_logits=True, **mlm_args)
        hard = model(inputs["mlm_input_ids"], mask, labels=inputs["mlm_labels"], **mlm_args).loss
        distill = model(inputs["mlm_input_ids"], mask, labels=inputs["mlm_labels"],
                        soft_labels=inputs["soft_labels"], alpha=inputs["alpha"], **mlm_args).loss
    return {
        "last_hidden_state_text": text.last_hidden_state,
        "last_hidden_state_multimodal": multi.last_hidden_state,
        "text_embedding_output": text_embeds,
        "last_hidden_state_image_as_input": as_input.last_hidden_state,
        "attentions_multimodal": torch.stack(multi.attentions),
        "cross_attentions_multimodal": torch.stack(multi.cross_attentions),
        "attentions_text": torch.stack(text.attentions),
        "mlm_logits": logits,
        "mlm_loss_hard": hard.item(),
        "mlm_loss_distill": distill.item(),
    }


CHECKS = {"vit": check_vit, "bert_modes": check_bert_modes}
