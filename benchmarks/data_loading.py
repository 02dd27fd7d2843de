"""Samples per second of the pretraining data pipeline, from JSON + image files and from webdataset shards.

python benchmarks/data_loading.py [--images 300] [--size 500] [--num_workers 0 1 2] [--batch_size 32]
    [--passes 2] [--threads 1] [--work_dir DIR] [--json out.json]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from configs.loader import load_config  # noqa: E402
from dataset import SafeCollate, create_dataset  # noqa: E402
from dataset.resumable import create_train_loader  # noqa: E402
from dataset.shard_convert import json_to_shards  # noqa: E402

SAMPLES_PER_SHARD = 100


def write_images(root: str, count: int, size: int, seed: int = 0) -> str:
    """``count`` JPEGs of random smooth colour fields with noise (aspect 3:4 to 4:3) and their JSON file."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    entries = []
    for index in range(count):
        width, height = size, int(size * rng.uniform(0.75, 1.33))
        coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0, 12, pixels.shape)
        path = os.path.join(root, "images", f"{index:05d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        entries.append({"image": path, "caption": f"a random picture number {index}"})
    annotations = os.path.join(root, "pretrain.json")
    with open(annotations, "w", encoding="utf-8") as handle:
        json.dump(entries, handle)
    return annotations


def samples_per_second(train_file: str, workers: int, batch_size: int, passes: int) -> float:
    config = load_config(os.path.join(REPO_ROOT, "configs", "Pretrain.yaml"), [f"train_file=[{train_file}]"],
                         task="pretrain")
    dataset = create_dataset("pretrain", config)
    loader, sampler = create_train_loader(dataset, batch_size, workers, SafeCollate(), seed=0)
    rate = 0.0
    for epoch in range(passes):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(len(batch[1]) for batch, _ in loader)
        rate = count / (time.perf_counter() - start)
    return rate


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=500, help="image width in pixels")
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (0: the default)")
    parser.add_argument("--work_dir", default="", help="where the images and shards go (default: a temporary folder)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.work_dir or scratch
        annotations = write_images(root, args.images, args.size)
        shards = os.path.join(root, "shards")
        json_to_shards(annotations, shards, SAMPLES_PER_SHARD)
        megabytes = sum(os.path.getsize(os.path.join(root, "images", n)) for n in os.listdir(
            os.path.join(root, "images"))) / 2**20
        print(f"{args.images} JPEGs of {args.size} px ({megabytes:.1f} MiB), batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs")
        rows = []
        for workers in args.num_workers:
            for name, source in (("json", annotations), ("shards", shards)):
                rate = samples_per_second(source, workers, args.batch_size, args.passes)
                rows.append({"input": name, "num_workers": workers, "samples_per_s": round(rate, 1),
                             "samples_per_s_per_worker": round(rate / max(workers, 1), 1)})
    print(f"{'input':<8}{'workers':>8}{'samples/s':>12}{'per worker':>12}")
    for row in rows:
        print(f"{row['input']:<8}{row['num_workers']:>8}{row['samples_per_s']:>12.1f}"
              f"{row['samples_per_s_per_worker']:>12.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"images": args.images, "size": args.size, "batch_size": args.batch_size, "rows": rows},
                      handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
