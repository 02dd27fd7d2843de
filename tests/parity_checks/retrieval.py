"""Parity checks of the retrieval fine-tuning step and of the retrieval evaluation."""

from __future__ import annotations

import torch

from tests.parity_checks.support import check_tokenized, fixture_config, fixture_tokenizer, grad_outputs


def _fixture_model(fx: dict):
    from models.simla.retrieval import SIMLA

    model = SIMLA(tokenizer=fixture_tokenizer(fx), config=dict(fixture_config(fx), from_scratch=True))
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def check_retrieval_train(fx: dict) -> dict:
    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    # the original's training call: longest padding and max_length without truncation
    check_tokenized(tokenizer, inputs["captions"], inputs["text_input_ids"], inputs["text_attention_mask"],
                    padding="longest", max_length=30)
    text = tokenizer(list(inputs["captions"]), padding="longest", max_length=30, return_tensors="pt")
    model = _fixture_model(fx)
    draws = inputs.get("itm_negative_draws")
    if draws is not None:
        # the recorded multinomial draws: a negative image per text, then a negative text per image
        batch = inputs["image"].shape[0]
        recorded = torch.tensor(draws, dtype=torch.long)
        model.sample_itm_negatives = lambda weights_t2i, weights_i2t: (recorded[:batch], recorded[batch:])
    loss_ita, loss_itm, inter = model(inputs["image"], text, alpha=inputs["alpha"], idx=inputs["idx"],
                                      return_intermediates=True)
    total = loss_ita + loss_itm
    state = model.state_dict()
    out = {
        "loss_ita": loss_ita.item(), "loss_itm": loss_itm.item(), "total_loss": total.item(),
        "image_queue_after": state["image_queue"].clone(), "text_queue_after": state["text_queue"].clone(),
        "idx_queue_after": state["idx_queue"].clone(), "queue_ptr_after": state["queue_ptr"].clone(),
        "momentum_params_after": {k: state[k].clone() for k in fx["outputs"]["momentum_params_after"]},
        "intermediates": {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inter.items()},
    }
    total.backward()
    out.update(grad_outputs(model, fx["outputs"]["full_grads"]))
    return out


def check_retrieval_eval(fx: dict) -> dict:
    from engine.retrieval_eval import RetrievalFeatures, encode_images, encode_texts, itm_eval, rerank

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    check_tokenized(tokenizer, inputs["captions"], inputs["text_input_ids"], inputs["text_attention_mask"],
                    padding="max_length", truncation=True, max_length=30)
    model = _fixture_model(fx)
    ids, mask = inputs["text_input_ids"], inputs["text_attention_mask"]
    batch_size = int(fx["config"].get("batch_size_test", 2))
    image_feats, image_embeds = encode_images(model, inputs["image"].split(batch_size), inputs["image"].device)
    text_embeds = encode_texts(model, ids, mask)
    features = RetrievalFeatures(ids, mask, text_embeds, image_embeds, image_feats)
    scores = rerank(model, features, inputs["k_test"], keep_sims=True)
    sims = torch.from_numpy(scores.sims)
    return {
        "text_embeds": text_embeds, "image_embeds": image_embeds,
        "itc_sims_i2t": sims, "itc_sims_t2i": sims.t(),
        "score_matrix_i2t": torch.from_numpy(scores.score_i2t),
        "score_matrix_t2i": torch.from_numpy(scores.score_t2i),
        "metrics": itm_eval(scores.score_i2t, scores.score_t2i, inputs["txt2img"], inputs["img2txt"]),
    }


CHECKS = {
    "retrieval_train": check_retrieval_train,
    "retrieval_train_shared_idx": check_retrieval_train,
    "retrieval_eval": check_retrieval_eval,
}
