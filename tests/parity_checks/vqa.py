"""Parity check of the VQA training loss and answer ranking."""

from __future__ import annotations

from tests.parity_checks.support import check_tokenized, fixture_config, fixture_tokenizer, grad_outputs


def _fixture_model(fx: dict, tokenizer):
    from models.simla.vqa import SIMLA

    model = SIMLA(tokenizer=tokenizer, config=dict(fixture_config(fx), from_scratch=True))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    return model


def check_vqa(fx: dict) -> dict:
    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    check_tokenized(tokenizer, inputs["questions"], inputs["question_input_ids"],
                    inputs["question_attention_mask"], padding="longest", truncation=True, max_length=25)
    check_tokenized(tokenizer, inputs["answers"], inputs["answer_input_ids"], inputs["answer_attention_mask"],
                    padding="longest")
    check_tokenized(tokenizer, inputs["test_questions"], inputs["test_question_input_ids"],
                    inputs["test_question_attention_mask"], padding="longest")
    eos = fx["config"]["eos"]
    check_tokenized(tokenizer, [a + eos for a in inputs["answer_list"]], inputs["answer_list_input_ids"],
                    inputs["answer_list_attention_mask"], padding="longest")

    # training step
    model = _fixture_model(fx, tokenizer)
    question = tokenizer(list(inputs["questions"]), padding="longest", truncation=True, max_length=25,
                         return_tensors="pt")
    answer = tokenizer(list(inputs["answers"]), padding="longest", return_tensors="pt")
    loss = model(inputs["image"], question, answer, train=True, alpha=inputs["alpha"],
                 k=list(inputs["answers_per_question"]), weights=inputs["answer_weights"])
    state = model.state_dict()
    out = {
        "loss": loss.item(),
        "momentum_params_after": {k: state[k].clone() for k in fx["outputs"]["momentum_params_after"]},
    }
    loss.backward()
    grads = grad_outputs(model, [])
    out["grad_norms"] = grads["grad_norms"]
    out["params_without_grad"] = grads["params_without_grad"]

    # answer ranking, on a fresh copy of the stored state
    model = _fixture_model(fx, tokenizer)
    test_question = tokenizer(list(inputs["test_questions"]), padding="longest", return_tensors="pt")
    answer_list = tokenizer([a + eos for a in inputs["answer_list"]], padding="longest", return_tensors="pt")
    topk_ids, topk_probs = model(inputs["test_image"], test_question, answer_list, train=False,
                                 k=int(inputs["k_test"]))
    predicted = [inputs["answer_list"][int(ids[probs.argmax()])] for ids, probs in zip(topk_ids, topk_probs)]
    out.update(
        topk_ids=topk_ids, topk_probs=topk_probs, predicted_answers=predicted,
        result=[{"question_id": int(qid), "answer": a} for qid, a in zip(inputs["test_question_ids"], predicted)],
    )
    return out


CHECKS = {"vqa": check_vqa}
