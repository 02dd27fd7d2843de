"""Built-in demo data: synthetic coloured shapes for every task script, pretraining set also as shards."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dataset.shard_convert import json_to_shards
from dataset.shards import STATS_SUFFIX, shard_stem
from demo.annotations import (
    grounding_annotations,
    nlvr_annotations,
    scene_captions,
    ve_annotations,
    vqa_annotations,
)
from demo.shapes import ANSWER_LIST, Scene, build_demo_vocab, make_scenes, random_stream, render_scene

FORMAT_VERSION = 2

SAMPLES_PER_SHARD = 100

DEFAULT_NUM_TRAIN = 256
DEFAULT_NUM_TEST = 64
DEFAULT_IMAGE_SIZE = 64

#: Smallest split sizes that still give every annotation family something to evaluate.
MIN_NUM_TRAIN = 3
MIN_NUM_TEST = 6


def demo_paths(out_dir: str | Path) -> dict[str, str]:
    """Absolute paths of everything :func:`generate_demo_data` writes (and the roots configs need)."""
    root = Path(out_dir).resolve()
    refcoco = root / "refcoco"
    files = {
        "root": root,
        "image_root": root,
        "vqa_root": root,
        "vg_root": root,
        "ve_image_root": root / "images_ve",
        "refcoco_data": refcoco,
        "manifest": root / "manifest.json",
        "pretrain": root / "pretrain.json",
        "pretrain_shards": root / "pretrain_shards",
        "re_train": root / "re_train.json",
        "re_val": root / "re_val.json",
        "re_test": root / "re_test.json",
        "re_test2": root / "re_test2.json",
        "vqa_train": root / "vqa_train.json",
        "vqa_test": root / "vqa_test.json",
        "answer_list": root / "answer_list.json",
        "nlvr_train": root / "nlvr_train.json",
        "nlvr_val": root / "nlvr_val.json",
        "nlvr_test": root / "nlvr_test.json",
        "ve_train": root / "ve_train.json",
        "ve_val": root / "ve_val.json",
        "ve_test": root / "ve_test.json",
        "grounding_train": root / "grounding_train.json",
        "grounding_test": root / "grounding_test.json",
        "refs": refcoco / "refcoco+" / "refs(unc).p",
        "instances": refcoco / "refcoco+" / "instances.json",
        "det_file": refcoco / "refcoco+" / "dets.json",
        "coco_file": refcoco / "refcoco+" / "cocos.json",
        "dvae": root / "dvae",
        "dvae_encoder": root / "dvae" / "encoder.pkl",
    }
    return {key: str(path) for key, path in files.items()}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _manifest_args(root: Path, seed: int, num_train: int, num_test: int, image_size: int) -> dict[str, Any]:
    """Arguments recorded in the manifest; a dataset is reused only if they match."""
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num_train_images": num_train,
        "num_test_images": num_test,
        "image_size": image_size,
        "out_dir": str(root),
    }


def _is_complete(root: Path, args: dict[str, Any]) -> bool:
    """Whether ``root`` holds a finished dataset generated with ``args``."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if recorded.get("arguments") != args:
        return False
    return all((root / rel).is_file() for rel in recorded.get("files", []))


def generate_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    num_train_images: int = DEFAULT_NUM_TRAIN,
    num_test_images: int = DEFAULT_NUM_TEST,
    image_size: int = DEFAULT_IMAGE_SIZE,
    force: bool = False,
) -> dict[str, str]:
    """Write the demo dataset to ``out_dir`` (kept if the same unless ``force``); :func:`demo_paths`."""
    if num_train_images < MIN_NUM_TRAIN or num_test_images < MIN_NUM_TEST:
        raise ValueError(f"need at least {MIN_NUM_TRAIN} train and {MIN_NUM_TEST} test images")
    if image_size < 16:
        raise ValueError("image_size must be at least 16")
    root = Path(out_dir).resolve()
    paths = demo_paths(root)
    args = _manifest_args(root, seed, num_train_images, num_test_images, image_size)
    if not force and _is_complete(root, args):
        return paths
    manifest = root / "manifest.json"
    if manifest.exists():
        manifest.unlink()
        for sub in ("images", "images_ve", "refcoco"):
            if (root / sub).is_dir():
                shutil.rmtree(root / sub)
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write_json(key: str, obj: Any) -> None:
        path = Path(paths[key])
        _write_json(path, obj)
        written.append(path)

    split_sizes = {"train": num_train_images, "test": num_test_images, "test2": num_test_images}
    scenes: dict[str, list[Scene]] = {}
    first_id = 0
    for split, count in split_sizes.items():
        rng = random_stream(seed, f"images/{split}")
        scenes[split] = make_scenes(rng, split, count, first_id, image_size)
        first_id += count
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for scene in scenes[split]:
            image = render_scene(scene, rng, image_size)
            path = root / scene.rel_path
            image.save(path, format="PNG")
            written.append(path)
            if split != "test2":
                ve_path = Path(paths["ve_image_root"]) / f"{scene.name}.jpg"
                ve_path.parent.mkdir(parents=True, exist_ok=True)
                image.save(ve_path, format="JPEG", quality=95)
                written.append(ve_path)
    train, test, test2 = scenes["train"], scenes["test"], scenes["test2"]
    half = len(test) // 2
    test_val, test_test = test[:half], test[half:]

    rng = random_stream(seed, "captions")
    captions = {scene.name: scene_captions(scene, rng) for scene in train + test + test2}
    pretrain: list[dict[str, Any]] = []
    for index, scene in enumerate(train):
        # even entries carry every paraphrase (a list), odd ones a single string
        texts = captions[scene.name]
        caption = texts if index % 2 == 0 else rng.choice(texts)
        pretrain.append({"image": str(root / scene.rel_path), "caption": caption})
    write_json("pretrain", pretrain)
    shards_dir = Path(paths["pretrain_shards"])
    if shards_dir.is_dir():
        shutil.rmtree(shards_dir)
    shards = json_to_shards(paths["pretrain"], str(shards_dir), SAMPLES_PER_SHARD, url_base=str(root))["shards"]
    written.extend(Path(path) for shard in shards for path in (shard, shard_stem(shard) + STATS_SUFFIX))
    write_json(
        "re_train",
        [
            {"image": scene.rel_path, "caption": text, "image_id": scene.image_id}
            for scene in train
            for text in captions[scene.name]
        ],
    )
    for key, split_scenes in (("re_val", test_val), ("re_test", test_test), ("re_test2", test2)):
        write_json(
            key, [{"image": scene.rel_path, "caption": captions[scene.name]} for scene in split_scenes]
        )

    vqa_train, vqa_test = vqa_annotations(train, test, random_stream(seed, "vqa"))
    write_json("vqa_train", vqa_train)
    write_json("vqa_test", vqa_test)
    write_json("answer_list", list(ANSWER_LIST))

    rng = random_stream(seed, "nlvr")
    write_json("nlvr_train", nlvr_annotations(train, len(train), rng))
    write_json("nlvr_val", nlvr_annotations(test_val, len(test_val), rng))
    write_json("nlvr_test", nlvr_annotations(test_test, len(test_test), rng))

    rng = random_stream(seed, "ve")
    write_json("ve_train", ve_annotations(train, rng))
    write_json("ve_val", ve_annotations(test_val, rng))
    write_json("ve_test", ve_annotations(test_test, rng))

    grounding = grounding_annotations(train, test, image_size, random_stream(seed, "grounding"))
    write_json("grounding_train", grounding["grounding_train"])
    write_json("grounding_test", grounding["grounding_test"])
    write_json("instances", grounding["instances"])
    write_json("det_file", grounding["dets"])
    write_json("coco_file", grounding["cocos"])
    refs_path = Path(paths["refs"])
    refs_path.write_bytes(pickle.dumps(grounding["refs"], protocol=4))
    written.append(refs_path)

    from models.dvae import DalleVAE

    DalleVAE.random(n_hid=64, n_blk_per_group=1, seed=seed).save(paths["dvae"])
    written.append(Path(paths["dvae_encoder"]))

    files = sorted(path.relative_to(root).as_posix() for path in written)
    manifest.write_text(json.dumps({"arguments": args, "files": files}, indent=2) + "\n", encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes demo dataset.")
    parser.add_argument("--out_dir", default="demo_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num_test", type=int, default=DEFAULT_NUM_TEST)
    parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")
    parser.add_argument(
        "--write_vocab", default=None, metavar="PATH", help="also write the demo vocabulary to PATH"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate_demo_data(
        args.out_dir, args.seed, args.num_train, args.num_test, args.image_size, args.force
    )
    if args.write_vocab:
        tokens = build_demo_vocab(args.write_vocab)
        print(f"vocabulary: {args.write_vocab} ({len(tokens)} tokens)")
    print(f"demo data in {paths['root']} ({time.perf_counter() - start:.1f} s)")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
