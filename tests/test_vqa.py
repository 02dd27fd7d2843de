"""VQA: datasets, the accuracy metric, the model's loss/ranking options, loading a pretraining
checkpoint, and end-to-end runs of ``VQA.py`` (one process, two gloo processes, resume, --evaluate).

The script runs fine-tune the tiny demo model (decoder of 2 layers from the last 2 of 4 pretrained
text layers) for one epoch on the small demo dataset, on the CPU with one thread per process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from configs import load_config
from dataset.annotations import AnnotationError
from dataset.collate import vqa_collate_fn
from dataset.vqa import VQADataset, answer_weights, create_vqa_datasets
from engine.checkpoint import load_checkpoint, load_checkpoint_into
from engine.vqa_eval import answer_accuracy, merge_rank_results, normalize_answer, vqa_accuracy
from models.simla.vqa import (
    SIMLA,
    checkpoint_filter_fn,
    is_pretrain_layout,
    map_pretrain_checkpoint,
    pretrain_key_sources,
)
from models.tokenization import build_tokenizer
from tests.script_helpers import free_port, script_env

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "data" / "parity"
PYTHON = sys.executable
RUN_TIMEOUT = 400
DEMO_VOCAB = str(REPO / "configs" / "demo_vocab.txt")
CHECKPOINT_KEYS = ["model", "optimizer", "lr_scheduler", "config", "epoch"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(DEMO_VOCAB)


def _demo_config(**extra) -> dict:
    return dict(load_config(REPO / "configs" / "VQA_demo.yaml", task="vqa"),
                bert_config=str(REPO / "configs" / "demo_bert.json"), **extra)


# --- datasets -------------------------------------------------------------------------------------------


def _write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture()
def tiny_files(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 16), (200, 10, 10)).save(tmp_path / name)
    train = _write(tmp_path / "train.json", [
        {"question": "How many dogs?", "image": "a.png", "dataset": "vqa",
         "answer": ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"]},
        {"question": "What colour is it?", "image": "b.png", "dataset": "vg", "answer": "red"},
    ])
    test = _write(tmp_path / "test.json", [
        {"question": "Is it " + "very " * 60 + "red?", "image": "a.png", "dataset": "vqa", "question_id": 7,
         "answer": ["yes"] * 10},
        {"question": "What is it?", "image": "b.png", "dataset": "vqa", "question_id": 9},
    ])
    answers = _write(tmp_path / "answers.json", ["yes", "no", "red"])
    return {"root": str(tmp_path), "train": train, "test": test, "answers": answers}


def test_vqa_weights_worked_example():
    answers, weights = answer_weights(["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"])
    assert answers == ["2", "two", "3"]
    assert weights[0] == 0.7999999999999999 and weights[1:] == [0.1, 0.1]


def test_train_dataset_and_collate(tiny_files):
    ds = VQADataset([tiny_files["train"]], lambda img: torch.zeros(3, 4, 4), tiny_files["root"], tiny_files["root"])
    image, question, answers, weights = ds[0]
    assert question == "how many dogs" and answers == ["2[SEP]", "two[SEP]", "3[SEP]"]
    assert ds[1][2:] == (["red[SEP]"], [0.5])
    images, questions, flat_answers, flat_weights, n = vqa_collate_fn([ds[0], ds[1]])
    assert images.shape == (2, 3, 4, 4) and len(flat_answers) == 4 and n == [3, 1]
    assert torch.equal(flat_weights, torch.tensor([0.8, 0.1, 0.1, 0.5]))


def test_test_dataset(tiny_files):
    ds = VQADataset(tiny_files["test"], lambda img: torch.zeros(3, 4, 4), tiny_files["root"], tiny_files["root"],
                    split="test", answer_list=tiny_files["answers"])
    image, question, qid = ds[0]
    assert qid == 7 and len(question.split(" ")) == 50  # test questions keep 50 words
    assert ds.answer_list == ["yes", "no", "red"] and ds.question_ids() == [7, 9]
    assert ds.answers_by_question_id == {7: ["yes"] * 10}


@pytest.mark.parametrize(("entry", "message"), [
    ({"question": "q", "image": "a.png", "dataset": "coco", "answer": ["x"]}, "dataset 'coco'"),
    ({"question": "q", "image": "a.png", "dataset": "vqa", "answer": []}, "non-empty list"),
    ({"question": "q", "image": "a.png", "dataset": "vg", "answer": ["x"]}, "expected a string"),
    ({"question": "q", "image": "a.png", "dataset": "vqa"}, "no field 'answer'"),
])
def test_train_annotation_errors(tmp_path, entry, message):
    path = _write(tmp_path / "bad.json", [entry])
    with pytest.raises(AnnotationError, match=re.escape(message)) as info:
        VQADataset(path, lambda img: img, str(tmp_path), str(tmp_path))
    assert "bad.json" in str(info.value)


def test_test_annotation_errors(tmp_path, tiny_files):
    dup = _write(tmp_path / "dup.json", [{"question": "q", "image": "a.png", "question_id": 3}] * 2)
    with pytest.raises(AnnotationError, match="question_id 3 appears more than once"):
        VQADataset(dup, lambda img: img, "", "", split="test", answer_list=tiny_files["answers"])
    with pytest.raises(AnnotationError, match="answer_list"):
        VQADataset(tiny_files["test"], lambda img: img, "", "", split="test")
    bad_list = _write(tmp_path / "list.json", {"yes": 1})
    with pytest.raises(AnnotationError, match="list.json"):
        VQADataset(tiny_files["test"], lambda img: img, "", "", split="test", answer_list=bad_list)


# --- accuracy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "normalised"), [
    ("Two", "2"), ("none", "0"), ("The dog.", "dog"), ("an apple", "apple"), ("dont", "don't"),
    ("isnt it", "isn't it"), ("1,000", "1000"), ("3.5", "3.5"), ("yes!", "yes"), ("red-white", "red white"),
    ("red - white", "red white"), ("  tab\tnew\nline ", "tab new line"), ("(left)", "left"), ("x.y", "xy"),
])
def test_answer_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(("matching", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_leave_one_out(matching, accuracy):
    # k of 10 annotators match: leaving out a matching one leaves k-1 matches, else k
    annotators = ["dog"] * matching + ["cat"] * (10 - matching)
    assert answer_accuracy("dog", annotators) == pytest.approx(accuracy)


def test_accuracy_hand_worked_examples():
    # "two" == "2" after normalisation: 3 matches -> (7 * 1 + 3 * 2/3) / 10
    assert answer_accuracy("two", ["2", "2", "2", "3", "3", "3", "4", "4", "4", "4"]) == pytest.approx(0.9)
    # articles and punctuation: "A dog!" matches "dog", "the dog", "dog." -> 3 of 10
    annotators = ["dog", "the dog", "dog.", "cat", "cat", "cat", "puppy", "puppy", "puppy", "puppy"]
    assert answer_accuracy("A dog!", annotators) == pytest.approx(0.9)
    # contraction: "dont know" -> "don't know"; 1 match -> 9 * 1/3 / 10
    assert answer_accuracy("dont know", ["don't know"] + ["no"] * 9) == pytest.approx(0.3)
    results = [{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "dog"},
               {"question_id": 3, "answer": "x"}]
    gts = {1: ["2"] * 10, 2: ["dog"] * 2 + ["cat"] * 8, 3: []}
    scores = vqa_accuracy(results, gts)
    assert scores == {"accuracy": 80.0, "num_questions": 2}  # (1.0 + 0.6) / 2; question 3 has no answers
    with pytest.raises(ValueError, match="question 1 appears more than once"):
        vqa_accuracy(results + results[:1], gts)
    with pytest.raises(ValueError, match="at least one annotator"):
        answer_accuracy("x", [])


def test_merge_rank_results_removes_padding_duplicates():
    rank0 = [{"question_id": 0, "answer": "a"}, {"question_id": 2, "answer": "c"}]
    rank1 = [{"question_id": 1, "answer": "b"}, {"question_id": 0, "answer": "a"}]  # padded with question 0
    assert merge_rank_results([rank0, rank1]) == [{"question_id": 0, "answer": "a"},
                                                  {"question_id": 2, "answer": "c"},
                                                  {"question_id": 1, "answer": "b"}]


# --- loading a pretraining checkpoint -------------------------------------------------------------------


def test_pretrain_checkpoint_mapping_matches_the_original():
    """Full size: the renames of VQA.py onto the 12-layer encoder and 6-layer decoder, nothing missing."""
    recorded = json.loads((PARITY / "manifests" / "checkpoint_key_mapping.json").read_text())["VQA.py"]
    pretrain_keys = list(json.loads((PARITY / "manifests" / "pretrain.json").read_text())["state_dict"])
    vqa_keys = set(json.loads((PARITY / "manifests" / "vqa.json").read_text())["state_dict"])
    assert pretrain_key_sources(pretrain_keys) == recorded["renamed_target_key_from_source_key"]
    mapped = map_pretrain_checkpoint({k: torch.empty(0) for k in pretrain_keys})
    assert sorted(vqa_keys - set(mapped)) == recorded["missing_keys"] == []
    assert sorted(set(mapped) - vqa_keys) == sorted(recorded["unexpected_keys"])
    assert len(vqa_keys & set(mapped)) == recorded["loaded_count"]


def _tiny_pretrain_state(tokenizer) -> dict[str, torch.Tensor]:
    from models.simla.pretrain import SIMLA as PretrainSIMLA

    config = dict(load_config(REPO / "configs" / "Pretrain_demo.yaml", task="pretrain"),
                  bert_config=str(REPO / "configs" / "demo_bert.json"))
    torch.manual_seed(1)
    return PretrainSIMLA(tokenizer=tokenizer, config=config).state_dict()


def test_tiny_pretrain_checkpoint_fills_the_decoder_from_the_last_layers(tokenizer):
    state = _tiny_pretrain_state(tokenizer)
    assert is_pretrain_layout(state)
    model = SIMLA(tokenizer=tokenizer, config=_demo_config(decoder_depth=2))
    mapped = map_pretrain_checkpoint(state, 2)
    assert not is_pretrain_layout(mapped)
    result = model.load_state_dict(mapped, strict=False)
    assert result.missing_keys == []
    loaded = model.state_dict()
    for suffix in ("_m", ""):
        src, enc, dec = f"text_encoder{suffix}.bert.", f"text_encoder{suffix}.", f"text_decoder{suffix}."
        for j, i in ((0, 2), (1, 3)):  # decoder layer j <- encoder layer 2 + j of 4
            for name in ("attention.self.query.weight", "crossattention.self.value.bias", "output.dense.weight"):
                assert torch.equal(loaded[f"{dec}bert.encoder.layer.{j}.{name}"],
                                   state[f"{src}encoder.layer.{i}.{name}"])
        assert torch.equal(loaded[f"{enc}encoder.layer.0.attention.self.key.weight"],
                           state[f"{src}encoder.layer.0.attention.self.key.weight"])
        assert torch.equal(loaded[f"{dec}bert.embeddings.word_embeddings.weight"],
                           state[f"{src}embeddings.word_embeddings.weight"])
        assert torch.equal(loaded[f"{dec}cls.predictions.transform.dense.weight"],
                           state[f"text_encoder{suffix}.cls.predictions.transform.dense.weight"])
    # a VQA checkpoint is left as it is; a decoder deeper than the encoder is refused
    assert map_pretrain_checkpoint(loaded, 2).keys() == loaded.keys()
    with pytest.raises(ValueError, match="decoder_depth is 5 but the checkpoint's text_encoder has only 4 layers"):
        map_pretrain_checkpoint(state, 5)


def test_script_loading_renames_only_for_training(tokenizer, tmp_path, capsys):
    """Training runs rename a pretraining checkpoint; --evaluate needs a VQA checkpoint and refuses a
    pretraining one (the answer decoder would stay uninitialised), naming the missing keys."""
    path = tmp_path / "pretrain.pth"
    torch.save({"model": _tiny_pretrain_state(tokenizer)}, path)
    model = SIMLA(tokenizer=tokenizer, config=_demo_config())
    before = model.text_decoder.bert.encoder.layer[0].output.dense.weight.detach().clone()
    load_checkpoint_into(model, str(path), checkpoint_filter_fn, "VQA.py", own=False)
    after = model.text_decoder.bert.encoder.layer[0].output.dense.weight
    printed = capsys.readouterr().out
    assert not torch.equal(after, before) and "missing_keys=[]" in printed and "warning" not in printed

    model = SIMLA(tokenizer=tokenizer, config=_demo_config())
    with pytest.raises(ValueError, match=r"VQA\.py: checkpoint .* does not fit .*\n  missing keys .*text_encoder\.embeddings"):
        load_checkpoint_into(model, str(path), checkpoint_filter_fn, "VQA.py", own=True)  # as with --evaluate


def test_save_result_merges_and_checks_completeness(tmp_path, capsys):
    from engine.vqa_eval import save_result

    result = [{"question_id": 5, "answer": "a"}, {"question_id": 3, "answer": "b"}, {"question_id": 5, "answer": "a"}]
    path, merged = save_result(result, str(tmp_path), "vqa_result_epoch2", question_ids=[3, 5])
    assert path == str(tmp_path / "vqa_result_epoch2.json") and merged == result[:2]
    assert read_json(tmp_path / "vqa_result_epoch2.json") == result[:2]
    assert read_json(tmp_path / "vqa_result_epoch2_rank0.json") == result
    assert f"result file saved to {path}" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"1 test questions unanswered \(e.g. \[7\]\)"):
        save_result(result, str(tmp_path), "incomplete", question_ids=[3, 5, 7])


# --- model options ----------------------------------------------------------------------------------------


def _inputs(tokenizer):
    torch.manual_seed(3)
    image = torch.randn(2, 3, 64, 64)
    question = tokenizer(["what shape is on the left", "is there a red circle"], padding="longest",
                         truncation=True, max_length=25, return_tensors="pt")
    answer = tokenizer(["star[SEP]", "cross[SEP]", "yes[SEP]"], padding="longest", return_tensors="pt")
    return image, question, answer, [2, 1], torch.tensor([0.7, 0.3, 1.0])


def _model(tokenizer, seed: int = 0, **extra) -> SIMLA:
    torch.manual_seed(seed)
    model = SIMLA(tokenizer=tokenizer, config=_demo_config(**extra))
    with torch.no_grad():  # momentum weights that differ from the online ones
        for param in model.parameters():
            if not param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def test_distillation_alpha_flag(tokenizer):
    image, question, answer, k, weights = _inputs(tokenizer)
    default = _model(tokenizer)(image, question, answer, alpha=0.4, k=k, weights=weights)
    no_distill = _model(tokenizer, distill=False)
    assert not any(key.endswith("_m") or "_m." in key for key in no_distill.state_dict())
    plain = no_distill(image, question, answer, alpha=0.4, k=k, weights=weights)
    # the original passes no alpha to the decoder: the momentum teacher does not change the loss
    assert torch.equal(default, plain)
    flagged = _model(tokenizer, vqa_distill_alpha=True)
    assert torch.equal(flagged(image, question, answer, alpha=0.0, k=k, weights=weights), plain)
    assert not torch.allclose(flagged(image, question, answer, alpha=0.4, k=k, weights=weights), plain)


def test_momentum_update_runs_every_training_step(tokenizer):
    image, question, answer, k, weights = _inputs(tokenizer)
    model = _model(tokenizer)
    online = model.text_decoder.cls.predictions.transform.dense.weight.detach().clone()
    before = model.text_decoder_m.cls.predictions.transform.dense.weight.detach().clone()
    model(image, question, answer, alpha=0.4, k=k, weights=weights)
    after = model.text_decoder_m.cls.predictions.transform.dense.weight
    torch.testing.assert_close(after, 0.995 * before + 0.005 * online)


def test_training_input_checks_and_ranking(tokenizer):
    image, question, answer, k, weights = _inputs(tokenizer)
    model = _model(tokenizer)
    with pytest.raises(ValueError, match="do not fit 2 questions and 3 answers"):
        model(image, question, answer, k=[1, 1], weights=weights)
    with pytest.raises(ValueError, match="one value per answer"):
        model(image, question, answer, k=k, weights=weights[:2])
    answers = ["star", "cross", "yes", "no", "red"]
    answer_list = tokenizer([a + "[SEP]" for a in answers], padding="longest", return_tensors="pt")
    with torch.no_grad():
        ids, probs = model(image, question, answer_list, train=False, k=5)
        # with k = all answers, the ranking is the softmax of log p(first token) - NLL(answer)
        states = model._encode_question(model.visual_encoder, model.text_encoder, image, question)
        start = model.text_decoder(answer_list.input_ids[:, :1][:1].repeat(2, 1), encoder_hidden_states=states,
                                   encoder_attention_mask=question.attention_mask).logits[:, 0]
        first = start.softmax(-1)[:, answer_list.input_ids[:, 1]]
        targets = answer_list.input_ids.masked_fill(answer_list.input_ids == 0, -100)
        for q in range(2):
            nll = model.text_decoder(answer_list.input_ids, attention_mask=answer_list.attention_mask,
                                     encoder_hidden_states=states[q:q + 1].repeat(5, 1, 1),
                                     encoder_attention_mask=question.attention_mask[q:q + 1].repeat(5, 1),
                                     labels=targets, reduction="none").loss
            expected = (first[q].log() - nll).softmax(-1)
            torch.testing.assert_close(probs[q], expected[ids[q]])
            assert torch.all(probs[q][:-1] >= probs[q][1:])
        with pytest.raises(ValueError, match="k_test is 6 but the answer list has 5 answers"):
            model(image, question, answer_list, train=False, k=6)


def test_demo_datasets_from_config(small_demo_data):
    config = _demo_config(train_file=[small_demo_data["vqa_train"]], test_file=[small_demo_data["vqa_test"]],
                          answer_list=small_demo_data["answer_list"], vqa_root=small_demo_data["vqa_root"],
                          vg_root=small_demo_data["vg_root"])
    train, test = create_vqa_datasets(config)
    image, question, answers, weights = train[0]
    assert image.shape == (3, 64, 64) and all(a.endswith("[SEP]") for a in answers)
    assert math.isclose(sum(weights), 1.0)
    assert len(test) == 12 and len(test.answers_by_question_id) == 12


# --- end-to-end runs of VQA.py -----------------------------------------------------------------------------


def _run(cmd_for_port, expect_success: bool = True) -> tuple[int, str]:
    for attempt in range(2):
        proc = subprocess.Popen(cmd_for_port(free_port()), cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{' '.join(proc.args)} did not finish in {RUN_TIMEOUT} s:\n{output[-6000:]}")
        if proc.returncode == 0 or attempt or "ddress already in use" not in output:
            break
    if expect_success and proc.returncode != 0:
        pytest.fail(f"{' '.join(proc.args)} exited with {proc.returncode}:\n{output[-6000:]}")
    return proc.returncode, output


def vqa(data: dict, output_dir: Path, *flags: str, processes: int = 1, epochs: int = 1,
        test_file: str | None = None, overrides: tuple[str, ...] = ()) -> str:
    args = ["VQA.py", "--config", "configs/VQA_demo.yaml", "--output_dir", str(output_dir), "--text_encoder",
            "configs/demo_vocab.txt", "--device", "cpu", "--num_workers", "0", *flags, "--overrides",
            f"schedular.epochs={epochs}", "batch_size_train=8", "batch_size_test=4", "k_test=8",
            f"train_file=[{data['vqa_train']}]", f"test_file=[{test_file or data['vqa_test']}]",
            f"answer_list={data['answer_list']}", f"vqa_root={data['vqa_root']}", f"vg_root={data['vg_root']}",
            *overrides]
    if processes == 1:
        return _run(lambda port: [PYTHON, *args])[1]
    return _run(lambda port: [PYTHON, "-m", "torch.distributed.launch", f"--nproc_per_node={processes}",
                              f"--master_port={port}", "--use_env", *args])[1]


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def read_json(path: Path):
    return json.loads(path.read_text())


def question_ids(path: str) -> list[int]:
    return [entry["question_id"] for entry in json.loads(Path(path).read_text())]


def check_result(path: Path, expected_ids: list[int], answer_list: list[str]) -> list[dict]:
    result = read_json(path)
    assert [sorted(entry) for entry in result] == [["answer", "question_id"]] * len(result)
    assert sorted(entry["question_id"] for entry in result) == sorted(expected_ids)  # each question once
    assert all(entry["answer"] in answer_list for entry in result)
    return result


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A pretraining-format checkpoint of a randomly initialised tiny pretraining model."""
    path = tmp_path_factory.mktemp("pretrained") / "pretrain.pth"
    torch.save({"model": _tiny_pretrain_state(tokenizer)}, path)
    return path


@pytest.fixture(scope="module")
def single_run(small_demo_data, pretrain_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    output_dir = tmp_path_factory.mktemp("vqa_single")
    output = vqa(small_demo_data, output_dir, "--checkpoint", str(pretrain_checkpoint))
    return output_dir, output


def test_single_process_train_and_evaluate(single_run, small_demo_data):
    output_dir, output = single_run
    assert "_IncompatibleKeys(missing_keys=[]," in output  # the pretraining checkpoint fills the model
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint_00.pth", "config.yaml", "log.txt",
                                                            "result"]
    log = read_log(output_dir)
    assert list(log[0]) == ["train_lr", "train_loss", "epoch"] and log[0]["epoch"] == 0
    assert re.fullmatch(r"\d+\.\d{3}", log[0]["train_loss"])
    # the demo test questions carry annotator answers: the accuracy is logged after the train line
    assert list(log[1]) == ["test_vqa_accuracy", "test_vqa_questions", "epoch"] and len(log) == 2
    assert log[1]["test_vqa_questions"] == 12 and 0.0 <= log[1]["test_vqa_accuracy"] <= 100.0
    assert f"VQA accuracy: {log[1]['test_vqa_accuracy']:.2f} (12 questions with answers)" in output

    answer_list = read_json(Path(small_demo_data["answer_list"]))
    ids = question_ids(small_demo_data["vqa_test"])
    result = check_result(output_dir / "result" / "vqa_result_epoch0.json", ids, answer_list)
    assert read_json(output_dir / "result" / "vqa_result_epoch0_rank0.json") == result
    annotations = {e["question_id"]: e["answer"] for e in read_json(Path(small_demo_data["vqa_test"]))}
    # by hand: the demo answers are lower-case words and digits, so the normalisation maps only number words
    digits = {"zero": "0", "one": "1", "two": "2", "three": "3"}
    scores = []
    for entry in result:
        predicted = digits.get(entry["answer"], entry["answer"])
        answers = [digits.get(a, a) for a in annotations[entry["question_id"]]]
        matches = [a == predicted for a in answers]
        scores.append(sum(min(1.0, (sum(matches) - m) / 3) for m in matches) / len(answers))
    assert log[1]["test_vqa_accuracy"] == pytest.approx(100 * sum(scores) / len(scores), abs=0.005)

    checkpoint = load_checkpoint(output_dir / "checkpoint_00.pth")
    assert list(checkpoint)[:5] == CHECKPOINT_KEYS and checkpoint["epoch"] == 0
    keys = checkpoint["model"]
    assert "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight" in keys
    assert not any(k.startswith("text_decoder.bert.encoder.layer.2.") for k in keys)
    assert not any(k.startswith("text_encoder.bert.") for k in keys)


def test_evaluate_reproduces_the_result_of_the_checkpoint(single_run, small_demo_data, tmp_path):
    source, _ = single_run
    output_dir = tmp_path / "evaluate"
    output = vqa(small_demo_data, output_dir, "--evaluate", "--checkpoint", str(source / "checkpoint_00.pth"))
    assert "Train Epoch" not in output and "<All keys matched successfully>" in output
    assert not list(output_dir.glob("checkpoint_*.pth"))
    # the run answered with the weights saved after its training epoch: the same answers
    assert (read_json(output_dir / "result" / "vqa_result_epoch0.json")
            == read_json(source / "result" / "vqa_result_epoch0.json"))
    assert [list(line) for line in read_log(output_dir)] == [["test_vqa_accuracy", "test_vqa_questions", "epoch"]]


def test_accuracy_of_a_single_answer_list_end_to_end(single_run, small_demo_data, tmp_path):
    """With "yes" as the only candidate every question is answered "yes", so the accuracy follows from
    how many annotators said yes: 10 (two of them as "Yes" and "yes."), 3, 2, 1 and 0 of 10 give 1.0, 0.9,
    0.6, 0.3 and 0 (each annotator left out in turn, min(1, matches among the other 9 / 3), averaged)."""
    yes_counts = (10, 3, 2, 1, 0)
    entries = read_json(Path(small_demo_data["vqa_test"]))[:len(yes_counts)]
    for entry, yes in zip(entries, yes_counts):
        entry["answer"] = ["no"] * (10 - yes) + ["yes"] * yes
    entries[0]["answer"][:2] = ["Yes", "yes."]
    test_file = tmp_path / "vqa_yes.json"
    test_file.write_text(json.dumps(entries))
    answer_list = tmp_path / "answer_list_yes.json"
    answer_list.write_text(json.dumps(["yes"]))
    output_dir = tmp_path / "yes"
    source, _ = single_run
    output = vqa(small_demo_data, output_dir, "--evaluate", "--checkpoint", str(source / "checkpoint_00.pth"),
                 test_file=str(test_file), overrides=("k_test=1", f"answer_list={answer_list}"))
    assert [e["answer"] for e in read_json(output_dir / "result" / "vqa_result_epoch0.json")] == ["yes"] * 5
    assert read_log(output_dir) == [{"test_vqa_accuracy": 56.0, "test_vqa_questions": 5, "epoch": 0}]
    assert "VQA accuracy: 56.00 (5 questions with answers)" in output


def test_resume_trains_only_the_next_epoch(single_run, small_demo_data, tmp_path):
    source, _ = single_run
    output_dir = tmp_path / "resumed"
    shutil.copytree(source, output_dir)
    output = vqa(small_demo_data, output_dir, "--resume", "true", "--checkpoint",
                 str(output_dir / "checkpoint_00.pth"), epochs=2)
    assert "Train Epoch: [0]" not in output and "Train Epoch: [1]" in output
    assert [line["epoch"] for line in read_log(output_dir)] == [0, 0, 1, 1]
    first = load_checkpoint(output_dir / "checkpoint_00.pth")
    second = load_checkpoint(output_dir / "checkpoint_01.pth")
    assert second["epoch"] == 1
    steps = {int(s["step"]) for s in first["optimizer"]["state"].values()}
    assert {int(s["step"]) for s in second["optimizer"]["state"].values()} == {2 * s for s in steps}
    check_result(output_dir / "result" / "vqa_result_epoch1.json", question_ids(small_demo_data["vqa_test"]),
                 read_json(Path(small_demo_data["answer_list"])))


def test_two_processes_merge_every_question_once(small_demo_data, pretrain_checkpoint, tmp_path):
    # 11 questions over 2 processes: the sampler pads rank 1 with a repeat of the first question
    test_file = tmp_path / "vqa_test11.json"
    test_file.write_text(json.dumps(read_json(Path(small_demo_data["vqa_test"]))[:11]))
    output_dir = tmp_path / "two"
    output = vqa(small_demo_data, output_dir, "--checkpoint", str(pretrain_checkpoint), processes=2,
                 test_file=str(test_file))
    assert "| distributed init (rank 1): env://" in output
    ids = question_ids(str(test_file))
    rank0 = read_json(output_dir / "result" / "vqa_result_epoch0_rank0.json")
    rank1 = read_json(output_dir / "result" / "vqa_result_epoch0_rank1.json")
    assert [e["question_id"] for e in rank0] == ids[0::2]
    assert [e["question_id"] for e in rank1] == ids[1::2] + ids[:1]
    merged = check_result(output_dir / "result" / "vqa_result_epoch0.json", ids,
                          read_json(Path(small_demo_data["answer_list"])))
    assert merged == merge_rank_results([rank0, rank1])
    log = read_log(output_dir)  # rank 1 writes nothing
    assert [line["epoch"] for line in log] == [0, 0] and log[1]["test_vqa_questions"] == 11
    assert (output_dir / "checkpoint_00.pth").is_file()
