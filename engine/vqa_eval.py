"""VQA result files and the standard VQA accuracy (mean over the 10 leave-one-out annotator subsets)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from dataset.vqa import VQADataset
from engine.metrics import MetricLogger, append_log
from models.precision import autocast
from utils import barrier, get_rank, get_world_size, is_main_process

# characters removed when they touch a space (or the text has a digit,digit comma), else made spaces
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# a period not followed by a digit; the official pattern's look-behind is malformed and never applies
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = 32
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

# the standard VQA contraction table (capitalised entries never match, kept for completeness)
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've |
couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've |
hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's |
howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't |
itd it'd | itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't |
mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've |
neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at |
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's | shouldve should've |
shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd |
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's |
someoned someone'd | someoned've someone'd've | someone'dve someone'd've | someonell someone'll |
someones someone's | somethingd something'd | somethingd've something'd've | something'dve something'd've |
somethingll something'll | thats that's | thered there'd | thered've there'd've | there'dve there'd've |
therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll |
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've |
werent weren't | whatll what'll | whatre what're | whats what's | whatve what've | whens when's |
whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've |
wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's | wont won't |
wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've | wouldn'tve wouldn't've | yall y'all |
yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've |
youd you'd | youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " ").split("|"))


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _process_digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """The standard VQA normalisation, applied (unlike the official script) to every annotator answer too."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def answer_accuracy(prediction: str, annotator_answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one prediction against the annotators' answers."""
    if not annotator_answers:
        raise ValueError("a question needs at least one annotator answer to be scored")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(a) == predicted for a in annotator_answers]
    total = sum(matches)
    scores = [min(1.0, (total - int(matched)) / 3) for matched in matches]
    return sum(scores) / len(scores)


def vqa_accuracy(results: Iterable[Mapping[str, Any]], answers_by_question_id: Mapping[int, Sequence[str]]
                 ) -> dict[str, Any]:
    """Score ``[{"question_id", "answer"}]`` -> ``{"accuracy": percent, "num_questions"}``; no duplicates."""
    scored: dict[int, float] = {}
    for entry in results:
        qid = int(entry["question_id"])
        if qid in scored:
            raise ValueError(f"question {qid} appears more than once in the results")
        if qid in answers_by_question_id and answers_by_question_id[qid]:
            scored[qid] = answer_accuracy(str(entry["answer"]), answers_by_question_id[qid])
    accuracy = 100.0 * sum(scored.values()) / len(scored) if scored else float("nan")
    return {"accuracy": round(accuracy, 2), "num_questions": len(scored)}


def merge_rank_results(per_rank: Sequence[Sequence[Mapping[str, Any]]], key: str = "question_id"
                       ) -> list[dict[str, Any]]:
    """Concatenate per-rank results in rank order, keeping each ``key`` once (sampler padding repeats)."""
    merged: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for results in per_rank:
        for entry in results:
            if entry[key] not in seen:
                seen.add(entry[key])
                merged.append(dict(entry))
    return merged


def tokenize_answers(tokenizer: Any, answer_list: Sequence[str], eos: str, device: torch.device) -> Any:
    """The candidate answers as the decoder ranks them: each followed by ``eos``, padded to the longest."""
    return tokenizer([answer + eos for answer in answer_list], padding="longest", return_tensors="pt").to(device)


@torch.no_grad()
def evaluation(model: torch.nn.Module, loader: torch.utils.data.DataLoader, tokenizer: Any, device: torch.device,
               config: dict, amp: str = "none") -> list[dict[str, Any]]:
    """Answer this process's share of the test questions: the top re-ranked answer of each."""
    model.eval()
    logger = MetricLogger(delimiter="  ")
    answer_list = loader.dataset.answer_list
    answer_input = tokenize_answers(tokenizer, answer_list, config["eos"], device)
    k_test = int(config["k_test"])
    result = []
    for image, question, question_id in logger.log_every(loader, 50, "Generate VQA test result:"):
        image = image.to(device, non_blocking=True)
        question_input = tokenizer(list(question), padding="longest", return_tensors="pt").to(device)
        with autocast(device, amp):
            topk_ids, topk_probs = model(image, question_input, answer_input, train=False, k=k_test)
        for qid, ids, probs in zip(question_id, topk_ids, topk_probs):
            result.append({"question_id": int(qid), "answer": answer_list[int(ids[int(probs.argmax())])]})
    return result


def save_result(result: list[dict[str, Any]], result_dir: str, filename: str,
                question_ids: Sequence[int] | None = None) -> tuple[str, list[dict[str, Any]] | None]:
    """Write ``<filename>_rank<r>.json``; the main process returns the merged ``<filename>.json`` and list."""
    with open(os.path.join(result_dir, f"{filename}_rank{get_rank()}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    barrier()
    final_file = os.path.join(result_dir, f"{filename}.json")
    merged = None
    if is_main_process():
        per_rank = []
        for rank in range(get_world_size()):
            with open(os.path.join(result_dir, f"{filename}_rank{rank}.json"), encoding="utf-8") as handle:
                per_rank.append(json.load(handle))
        merged = merge_rank_results(per_rank, key="question_id")
        if question_ids is not None:
            answered = {entry["question_id"] for entry in merged}
            missing = [qid for qid in question_ids if qid not in answered]
            extra = sorted(answered - set(question_ids))
            if missing or extra:
                raise RuntimeError(f"{final_file}: {len(missing)} test questions unanswered (e.g. {missing[:10]}) "
                                   f"and {len(extra)} unknown question ids (e.g. {extra[:10]})")
        tmp = final_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(merged, handle)
        os.replace(tmp, final_file)
        print(f"result file saved to {final_file}")
    barrier()
    return final_file, merged


def report_accuracy(merged: list[dict[str, Any]], test_dataset: VQADataset, output_dir: str, epoch: int) -> None:
    """Print and log the VQA accuracy when the test annotations carry annotator answers."""
    if not test_dataset.answers_by_question_id:
        return
    scores = vqa_accuracy(merged, test_dataset.answers_by_question_id)
    print(f"VQA accuracy: {scores['accuracy']:.2f} ({scores['num_questions']} questions with answers)")
    append_log(output_dir, {"test_vqa_accuracy": scores["accuracy"],
                            "test_vqa_questions": scores["num_questions"], "epoch": epoch})
