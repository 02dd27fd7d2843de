"""The inference API (engine/inference.py) against the retrieval evaluation on the small demo data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from configs import load_config, with_defaults
from dataset.retrieval import RetrievalEvalDataset
from dataset.transforms import build_transforms
from engine import inference
from engine.retrieval_eval import evaluation
from models.simla.retrieval import SIMLA
from models.tokenization import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_VOCAB = str(REPO / "configs" / "demo_vocab.txt")


@pytest.fixture(scope="module")
def demo(small_demo_data, tmp_path_factory):
    """A random demo-size retrieval model saved as a checkpoint with its config, its predictor, and the
    evaluation of the demo test split with that model."""
    config = dict(with_defaults(load_config(str(REPO / "configs" / "Retrieval_demo.yaml"), task="retrieval"),
                                "retrieval"))
    config.update(bert_config=str(REPO / "configs" / "demo_bert.json"), k_test=2, batch_size_test=2,
                  itm_eval_batch_size=256)
    torch.manual_seed(0)
    model = SIMLA(config=config, text_encoder=DEMO_VOCAB, tokenizer=build_tokenizer(DEMO_VOCAB)).eval()
    path = tmp_path_factory.mktemp("inference") / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "config": config}, path)
    predictor = inference.load(path, text_encoder=DEMO_VOCAB)
    dataset = RetrievalEvalDataset(small_demo_data["re_test"], build_transforms(config)["test"],
                                   small_demo_data["image_root"])
    loader = DataLoader(dataset, batch_size=2, shuffle=False)
    scores = evaluation(predictor.model, loader, predictor.tokenizer, torch.device("cpu"), config, keep_sims=True)
    images = [os.path.join(small_demo_data["image_root"], name) for name in dataset.image]
    return {"path": path, "config": config, "predictor": predictor, "dataset": dataset, "scores": scores,
            "images": images}


def test_similarity_equals_the_evaluation_itc_scores(demo):
    predictor, dataset = demo["predictor"], demo["dataset"]
    sims = predictor.similarity(demo["images"], dataset.text)
    assert sims.itc.shape == (len(dataset), len(dataset.text)) and sims.itm is None
    np.testing.assert_allclose(sims.itc.numpy(), demo["scores"].sims, atol=1e-5)
    # PIL images and transformed tensors give the same scores as paths
    pil = [Image.open(p) for p in demo["images"]]
    tensors = [predictor.image_tensor(p) for p in demo["images"]]
    torch.testing.assert_close(predictor.similarity(pil, dataset.text).itc, sims.itc)
    torch.testing.assert_close(predictor.similarity(tensors, dataset.text).itc, sims.itc)


def test_bf16_predictor_runs_under_autocast(demo):
    """``amp="bf16"`` (as on a GPU; CPU autocast here): the same kind of results, close to float32."""
    predictor = inference.load(demo["path"], text_encoder=DEMO_VOCAB, amp="bf16")
    images, texts = demo["images"], demo["dataset"].text[:4]
    low, full = predictor.similarity(images, texts, rerank=True), demo["predictor"].similarity(images, texts, rerank=True)
    assert low.itc.dtype == torch.float32 and not torch.equal(low.itc, full.itc)
    torch.testing.assert_close(low.itc, full.itc, atol=0.05, rtol=0)
    torch.testing.assert_close(low.itm, full.itm, atol=0.05, rtol=0)
    assert len(predictor.search(texts[0], images, k=2)) == 2


def test_similarity_rerank_gives_match_probabilities(demo):
    predictor, dataset = demo["predictor"], demo["dataset"]
    sims = predictor.similarity(demo["images"], dataset.text[:3], rerank=True)
    assert sims.itm is not None and sims.itm.shape == (len(dataset), 3)
    assert bool(((sims.itm >= 0) & (sims.itm <= 1)).all())


def _ranking(row: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-row, kind="stable")[:k]]


def test_search_equals_the_evaluation_ranking(demo, tmp_path):
    predictor, dataset, scores = demo["predictor"], demo["dataset"], demo["scores"]
    k = demo["config"]["k_test"]
    cache = tmp_path / "features.safetensors"
    for t, text in enumerate(dataset.text):
        results = predictor.search(text, demo["images"], k=k, cache=cache)
        assert [r.index for r in results] == _ranking(scores.score_t2i[t], k)
        np.testing.assert_allclose([r.itm for r in results], np.sort(scores.score_t2i[t])[::-1][:k], atol=1e-4)
    assert cache.exists()
    for i, image in enumerate(demo["images"]):
        results = predictor.search(Path(image), dataset.text, k=k)
        assert [r.index for r in results] == _ranking(scores.score_i2t[i], k)


def test_search_cache_is_reused_only_for_the_same_images(demo, tmp_path):
    predictor = demo["predictor"]
    cache = tmp_path / "features.safetensors"
    first = predictor.cached_image_features(demo["images"], cache)
    stamp = cache.stat().st_mtime_ns
    again = predictor.cached_image_features(demo["images"], cache)
    assert cache.stat().st_mtime_ns == stamp
    torch.testing.assert_close(first, again)
    fewer = predictor.cached_image_features(demo["images"][:2], cache)
    assert fewer[0].shape[0] == 2


def test_safetensors_export_round_trip(demo, tmp_path, monkeypatch):
    out = inference.export(demo["path"], tmp_path / "exported")
    assert sorted(os.listdir(out)) == ["config.yaml", "model.safetensors"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("the exported form must load without pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr("pickle.load", no_pickle)
    monkeypatch.setattr("pickle.loads", no_pickle)
    for source in (out, os.path.join(out, "model.safetensors")):
        loaded = inference.load(source, text_encoder=DEMO_VOCAB)
        assert loaded.config["k_test"] == demo["config"]["k_test"]
        texts = demo["dataset"].text[:3]
        torch.testing.assert_close(loaded.similarity(demo["images"], texts, rerank=True).itm,
                                   demo["predictor"].similarity(demo["images"], texts, rerank=True).itm,
                                   rtol=0, atol=0)
        reference = demo["predictor"].model.state_dict()
        for key, value in loaded.model.state_dict().items():
            assert torch.equal(value, reference[key]), key


def test_predict_cli_search_score_and_export(demo, tmp_path, capsys):
    import shutil

    import Predict
    from engine.pictures import CAPTION_HEIGHT, GAP, THUMB

    folder = tmp_path / "photos"
    folder.mkdir()
    for n, image in enumerate(demo["images"]):
        shutil.copy(image, folder / f"{n}.png")
    query = demo["dataset"].text[0]
    out = tmp_path / "out"
    data = Predict.main(["search", "--checkpoint", str(demo["path"]), "--text_encoder", DEMO_VOCAB,
                         "--images", str(folder), "--query", query, "-k", "2", "--out", str(out)])
    expected = demo["predictor"].search(query, inference.image_files(str(folder)), k=2)
    assert [row["itm"] for row in data["results"]] == [r.itm for r in expected]
    assert json.loads((out / "search.json").read_text()) == data
    with Image.open(out / "search.png") as sheet:
        sheet.verify()
    with Image.open(out / "search.png") as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (2 * (THUMB + GAP) + GAP, THUMB + 2 * CAPTION_HEIGHT + 2 * GAP)
        pixels = np.asarray(sheet.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    # the thumbnails are the images: the first one is not the white background
    assert pixels[GAP + CAPTION_HEIGHT:GAP + CAPTION_HEIGHT + THUMB, GAP:GAP + THUMB].std() > 1
    printed = capsys.readouterr().out
    assert f"{data['results'][0]['itm']:8.4f}" in printed

    texts = demo["dataset"].text[:2]
    score = Predict.main(["score", "--checkpoint", str(demo["path"]), "--text_encoder", DEMO_VOCAB, "--image",
                          demo["images"][0], "--text", texts[0], "--text", texts[1], "--out", str(out)])
    sims = demo["predictor"].similarity(demo["images"][:1], texts, rerank=True)
    assert [row["itc"] for row in score["results"]] == sims.itc[0].tolist()
    assert [row["itm"] for row in score["results"]] == sims.itm[0].tolist()
    assert json.loads((out / "score.json").read_text()) == score

    exported = Predict.main(["export", "--checkpoint", str(demo["path"]), "--out", str(tmp_path / "weights")])
    assert sorted(os.listdir(exported)) == ["config.yaml", "model.safetensors"]


def test_predict_options_go_after_the_subcommand():
    import Predict

    args = Predict.get_parser().parse_args(["search", "--checkpoint", "c", "--images", "d", "--query", "q",
                                            "-k", "3", "--out", "o", "--device", "cpu"])
    assert (args.command, args.checkpoint, args.images, args.query, args.k, args.out) == \
        ("search", "c", "d", "q", 3, "o")
    with pytest.raises(SystemExit):
        Predict.get_parser().parse_args(["--checkpoint", "c", "search", "--images", "d", "--query", "q"])


def test_ground_equals_the_grounding_evaluation_map(demo):
    from engine.grounding_eval import grounding_maps

    predictor, texts = demo["predictor"], demo["dataset"].text
    image = demo["images"][0]
    tensor = predictor.image_tensor(image)
    for block_num, mode in ((2, "itm"), (1, "itc")):
        result = predictor.ground(image, texts[0], block_num=block_num, mode=mode)
        batch = [(tensor[None], [texts[0]], [7])]
        expected = grounding_maps(predictor.model, batch, predictor.tokenizer, torch.device("cpu"), mode,
                                  block_num)[0]["pred"]
        assert torch.equal(result.map, expected)
        with Image.open(image) as picture:
            assert tuple(result.heat.shape) == (picture.height, picture.width)
    other = predictor.ground(image, texts[-1], block_num=2)
    assert not torch.equal(other.map, predictor.ground(image, texts[0], block_num=2).map)
    boxed = predictor.ground(image, texts[0], block_num=2, boxes=[[0, 0, 8, 8], [20, 20, 30, 30]])
    assert boxed.box_scores is not None and len(boxed.box_scores) == 2 and boxed.box is not None


def test_predict_cli_ground_picture(demo, tmp_path):
    import Predict
    from engine.pictures import CAPTION_HEIGHT, display_scale

    image = demo["images"][0]
    pictures = []
    for n, text in enumerate(demo["dataset"].text[:2]):
        out = tmp_path / f"out{n}"
        data = Predict.main(["ground", "--checkpoint", str(demo["path"]), "--text_encoder", DEMO_VOCAB, "--image",
                             image, "--text", text, "--block_num", "2", "--out", str(out)])
        assert json.loads((out / "ground.json").read_text()) == data
        with Image.open(out / "ground.png") as picture:
            picture.verify()
        with Image.open(out / "ground.png") as picture, Image.open(image) as source:
            assert picture.format == "PNG"
            scale = display_scale(source.width)
            assert scale > 1  # the 64 px demo images are enlarged
            assert picture.size == (scale * source.width, scale * source.height + CAPTION_HEIGHT)
            pixels = np.asarray(picture.convert("RGB")).astype(np.int16)
        assert pixels[: -CAPTION_HEIGHT].std() > 1
        pictures.append(pixels)
    assert np.abs(pictures[0] - pictures[1]).max() > 0


def test_answer_equals_the_vqa_evaluation(small_demo_data, tmp_path):
    from dataset.vqa import VQADataset
    from engine.vqa_eval import evaluation as vqa_evaluation
    from engine.vqa_eval import tokenize_answers
    from models.simla.vqa import SIMLA as SIMLAVQA

    config = dict(with_defaults(load_config(str(REPO / "configs" / "VQA_demo.yaml"), task="vqa"), "vqa"))
    config.update(bert_config=str(REPO / "configs" / "demo_bert.json"), answer_list=small_demo_data["answer_list"],
                  k_test=4, batch_size_test=4)
    torch.manual_seed(0)
    model = SIMLAVQA(text_encoder=DEMO_VOCAB, tokenizer=build_tokenizer(DEMO_VOCAB), config=config).eval()
    path = tmp_path / "vqa.pth"
    torch.save({"model": model.state_dict(), "config": config}, path)
    predictor = inference.load(path, text_encoder=DEMO_VOCAB, task="vqa")
    assert isinstance(predictor, inference.VQAPredictor)
    dataset = VQADataset(small_demo_data["vqa_test"], build_transforms(config)["test"], small_demo_data["vqa_root"],
                         small_demo_data["vg_root"], split="test", answer_list=small_demo_data["answer_list"])
    dataset.ann = dataset.ann[:4]
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    expected = vqa_evaluation(predictor.model, loader, predictor.tokenizer, torch.device("cpu"), config)
    # the evaluation's ranking of every question's k_test answers (its answer is the first)
    image, questions, _ = next(iter(loader))
    answer_input = tokenize_answers(predictor.tokenizer, dataset.answer_list, config["eos"], torch.device("cpu"))
    with torch.no_grad():
        topk_ids, topk_probs = predictor.model(image, predictor.tokenizer(list(questions), padding="longest",
                                                                          return_tensors="pt"),
                                               answer_input, train=False, k=4)
    for n, (entry, result) in enumerate(zip(dataset.ann, expected)):
        ranked = predictor.answer(dataset.image_path(entry), entry["question"])
        assert len(ranked) == 4 and ranked[0][0] == result["answer"]
        order = torch.argsort(topk_probs[n], descending=True, stable=True)
        assert [a for a, _ in ranked] == [dataset.answer_list[int(topk_ids[n, i])] for i in order]
        np.testing.assert_allclose([p for _, p in ranked], topk_probs[n, order].numpy(), atol=1e-5)
    import Predict

    data = Predict.main(["answer", "--checkpoint", str(path), "--text_encoder", DEMO_VOCAB, "--image",
                         dataset.image_path(dataset.ann[0]), "--question", dataset.ann[0]["question"],
                         "--out", str(tmp_path / "out")])
    first = predictor.answer(dataset.image_path(dataset.ann[0]), dataset.ann[0]["question"])
    assert [(row["answer"], row["probability"]) for row in data["results"]] == first
    assert json.loads((tmp_path / "out" / "answer.json").read_text()) == data
    # a given answer list is ranked instead of the config's
    short = dataset.answer_list[:5]
    assert {a for a, _ in predictor.answer(dataset.image_path(dataset.ann[0]), "what is it", short)} <= set(short)
