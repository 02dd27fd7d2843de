"""Webdataset shards as pretraining input: same batches as JSON, exact split over processes and workers,
exact resume, damaged shards skipped and counted, and the converter both ways."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from webdataset import TarWriter

from configs.loader import load_config
from dataset import SafeCollate, create_dataset
from dataset.pretrain import PretrainDataset
from dataset.resumable import SeededSamples, create_train_loader
from dataset.shard_convert import json_to_shards, shards_to_json
from dataset.shard_convert import main as convert_main
from dataset.shards import ShardError, ShardWarning, load_index
from dataset.text import pre_caption
from engine.loop import EpochSettings, train_one_epoch
from tests.script_helpers import free_port, script_env
from tests.test_resume import final_state, run_script

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "Pretrain_demo_shards.yaml"


def demo_config(data: dict[str, str], train_file: list[str], *extra: str) -> dict:
    return load_config(CONFIG, [f"train_file={train_file}", f"image_tokenizer_path={data['dvae']}", *extra],
                       task="pretrain")


def epoch_batches(config: dict, epoch: int, workers: int = 0, batch_size: int = 4) -> list:
    loader, sampler = create_train_loader(create_dataset("pretrain", config), batch_size, workers, SafeCollate(),
                                          seed=7)
    sampler.set_epoch(epoch)
    return list(loader)


def assert_same_batches(expected: list, got: list) -> None:
    assert len(expected) == len(got) > 0
    for (a, failed_a), (b, failed_b) in zip(expected, got):
        assert failed_a == failed_b == 0
        image_a, caption_a, dvae_a, mask_a = a
        image_b, caption_b, dvae_b, mask_b = b
        assert caption_a == caption_b
        assert torch.equal(image_a, image_b) and torch.equal(dvae_a, dvae_b) and torch.equal(mask_a, mask_b)


# --- same batches as the JSON files ---------------------------------------------------------------------


def test_demo_shards_give_the_json_batches(small_demo_data, tmp_path):
    data = small_demo_data
    json_config = demo_config(data, [data["pretrain"]])
    # the demo's own shards (a folder), and the same entries in shards of 5 through a brace pattern
    json_to_shards(data["pretrain"], str(tmp_path / "fives"), samples_per_shard=5)
    folder_config = demo_config(data, [data["pretrain_shards"]])
    pattern_config = demo_config(data, [str(tmp_path / "fives" / "{00000..00003}.tar")])
    list_config = demo_config(data, [str(tmp_path / "fives" / f"0000{i}.tar") for i in range(4)])
    for epoch in (0, 1):
        expected = epoch_batches(json_config, epoch)
        assert_same_batches(expected, epoch_batches(folder_config, epoch))
        assert_same_batches(expected, epoch_batches(pattern_config, epoch, workers=2))
    assert_same_batches(epoch_batches(json_config, 2), epoch_batches(list_config, 2))


def test_json_and_shards_mixed_in_one_config(small_demo_data):
    data = small_demo_data
    json_only = create_dataset("pretrain", demo_config(data, [data["pretrain"]]))
    mixed = create_dataset("pretrain", demo_config(data, [data["pretrain"], data["pretrain_shards"]]))
    assert len(mixed) == 2 * len(json_only) == 32
    for index in (0, 5, 15):
        for position in (index, index + 16):
            image, caption, _, _ = _seeded(mixed, position, 3)
            ref_image, ref_caption, _, _ = _seeded(json_only, index, 3)
            assert caption == ref_caption and torch.equal(image, ref_image)


def _seeded(dataset, index: int, seed: int):
    return SeededSamples(dataset)[(index, seed)]


def test_txt_caption_is_the_default(small_demo_data):
    data = small_demo_data
    entries = json.loads(Path(data["pretrain"]).read_text())
    dataset = create_dataset("pretrain", demo_config(data, [data["pretrain_shards"]], "~shard_caption_key"))
    # .txt holds a caption list's first paraphrase
    first = entries[0]["caption"]
    assert isinstance(first, list) and _seeded(dataset, 0, 1)[1] == pre_caption(first[0], 30)


def test_bad_shard_sources_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"'train_file'.*empty.*holds no \.tar shards"):
        PretrainDataset([str(tmp_path / "empty")], _ident_views, _no_mask)
    with pytest.raises(ShardError, match=r"2 of the 2 shards of .*\{0\.\.1\}\.tar.* do not exist"):
        PretrainDataset([str(tmp_path / "{0..1}.tar")], _ident_views, _no_mask)


# --- split over processes and workers -------------------------------------------------------------------


def _ident_views(image):
    worker = get_worker_info()
    return torch.tensor([-1 if worker is None else worker.id]), torch.zeros(1)


def _no_mask():
    return np.zeros(1)


def numbered_shards(root: Path, image: str, count: int, per_shard: int) -> Path:
    """``count`` samples with captions ``sample 0`` ... in shards of ``per_shard`` (the last one shorter)."""
    entries = [{"image": image, "caption": f"sample {i}"} for i in range(count)]
    (root / "numbered.json").write_text(json.dumps(entries))
    json_to_shards(str(root / "numbered.json"), str(root / "numbered"), samples_per_shard=per_shard)
    return root / "numbered"


def test_two_ranks_two_workers_read_every_sample_once(small_demo_data, tmp_path):
    image = json.loads(Path(small_demo_data["pretrain"]).read_text())[0]["image"]
    shards = numbered_shards(tmp_path, image, 24, 7)  # 7, 7, 7, 3
    dataset = PretrainDataset([str(shards)], _ident_views, _no_mask)
    assert [len(index) for index in dataset._blocks[0].indexes] == [7, 7, 7, 3]
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in range(2):
            loader, sampler = create_train_loader(dataset, 3, 2, SafeCollate(), seed=0, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            workers = set()
            for (worker, caption, _, _), failed in loader:
                assert failed == 0
                seen.extend(caption)
                workers.update(worker.flatten().tolist())
            assert workers == {0, 1}
        assert sorted(seen) == sorted(f"sample {i}" for i in range(24))


DISTRIBUTED = textwrap.dedent("""
    import argparse, json, os, sys
    import torch.distributed as dist
    from dataset import SafeCollate
    from dataset.pretrain import PretrainDataset
    from engine.training import training_loader
    from tests.test_shards import _ident_views, _no_mask

    dist.init_process_group("gloo")
    dataset = PretrainDataset([sys.argv[1]], _ident_views, _no_mask)
    args = argparse.Namespace(num_workers=2, seed=0)
    loader, sampler = training_loader(args, {"train_file": sys.argv[1]}, dataset, 3, SafeCollate())
    sampler.set_epoch(1)
    mine = [c for (_, captions, _, _), _ in loader for c in captions]
    everyone = [None, None]
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as handle:
            json.dump(everyone, handle)
    dist.destroy_process_group()
""")


def test_two_gloo_processes_read_every_sample_once(small_demo_data, tmp_path):
    image = json.loads(Path(small_demo_data["pretrain"]).read_text())[0]["image"]
    shards = numbered_shards(tmp_path, image, 24, 7)
    script, result = tmp_path / "read.py", tmp_path / "read.json"
    script.write_text(DISTRIBUTED)
    port = free_port()
    procs = []
    for rank in range(2):
        env = script_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(script), str(shards), str(result)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    per_rank = json.loads(result.read_text())
    assert len(per_rank[0]) == len(per_rank[1]) == 12
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"sample {i}" for i in range(24))


# --- resume ----------------------------------------------------------------------------------------------


def test_shard_run_killed_mid_epoch_resumes_exactly(small_demo_data, tmp_path):
    data = small_demo_data
    json_to_shards(data["pretrain"], str(tmp_path / "shards"), samples_per_shard=6)
    command = ["Pretrain.py", "--config", str(CONFIG), "--text_encoder", "configs/demo_vocab.txt", "--device", "cpu",
               "--num_workers", "0", "--save_every_steps", "1"]
    tail = ["--overrides", "schedular.epochs=2", "batch_size=4", "queue_size=16",
            f"train_file=[{tmp_path / 'shards'}]", f"image_tokenizer_path={data['dvae']}"]
    reference = run_script([*command, "--output_dir", str(tmp_path / "reference"), *tail])
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    killed = run_script([*command, "--output_dir", str(run_dir), *tail], kill=(1, 2), tmp_path=tmp_path)
    assert killed.returncode == 137, killed.stdout[-3000:] + killed.stderr[-3000:]
    resumed = run_script([*command, "--output_dir", str(run_dir), "--resume", "true", "--checkpoint",
                          str(run_dir / "checkpoint_last.pth"), *tail])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at epoch 1, batch 2" in resumed.stdout
    expected, got = final_state(tmp_path / "reference" / "checkpoint_01.pth"), final_state(run_dir / "checkpoint_01.pth")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


# --- damaged shards --------------------------------------------------------------------------------------


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_shards(root: Path) -> tuple[Path, Path]:
    """``a.tar``: three good samples, one without a caption, one without an image, one undecodable JPEG;
    ``b.tar``: four samples (so says its stats file) cut inside the third one's image."""
    root.mkdir()
    good = [{"__key__": f"good{i}", "png": _png(i), "txt": f"good {i}".encode()} for i in range(3)]
    with TarWriter(str(root / "a.tar"), encoder=False) as writer:
        for sample in [*good, {"__key__": "nocap", "png": _png(9)}, {"__key__": "noimg", "txt": b"no image"},
                       {"__key__": "badjpg", "jpg": b"\xff\xd8 not a jpeg", "txt": b"bad jpeg"}]:
            writer.write(sample)
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as writer:
        for i in range(4):
            writer.write({"__key__": f"cut{i}", "jpg": os.urandom(2000), "txt": b"random"} if i == 2 else
                         {"__key__": f"cut{i}", "png": _png(100 + i), "txt": f"cut {i}".encode()})
    data = buffer.getvalue()
    cut_at = data.index(b"cut2.jpg") + 512 + 1000  # in the middle of that member's data
    (root / "b.tar").write_bytes(data[:cut_at])
    (root / "b_stats.json").write_text(json.dumps({"count": 4, "successes": 4, "failed_to_download": 0}))
    return root / "a.tar", root / "b.tar"


def test_damaged_shards_are_skipped_counted_and_named(tmp_path):
    first, second = bad_shards(tmp_path / "bad")
    with pytest.warns(ShardWarning, match=rf"shard {second} is damaged.*3 samples listed; 1 samples counted"):
        dataset = PretrainDataset([str(first), str(second)], _ident_views, _no_mask)
    assert len(dataset) == 10
    loader, sampler = create_train_loader(dataset, 5, 0, SafeCollate(), seed=0)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = EpochSettings(loss_names=("loss",), print_freq=100, counted_batches=True)
    with pytest.warns(UserWarning) as caught:
        stats = train_one_epoch(model, loader, optimizer, None, 1, torch.device("cpu"),
                                lambda batch, i, n: {"loss": model(batch[0].float()).sum()}, settings,
                                sampler=sampler)
    assert stats["skipped_samples"] == 5
    messages = "\n".join(str(w.message) for w in caught)
    assert f"shard {first}, key nocap): no caption: no member nocap.txt" in messages
    assert f"shard {first}, key noimg): no image member" in messages
    assert f"shard {first}, key badjpg): cannot read image '{first}:badjpg.jpg'" in messages
    assert f"shard {second}, key cut2): image cut2.jpg is cut short" in messages
    assert f"shard {second}, sample 3): counted by the shard's stats file but missing from the tar" in messages


def test_caption_key_missing_from_json_is_skipped(tmp_path):
    tmp_path.joinpath("s").mkdir()
    with TarWriter(str(tmp_path / "s" / "0.tar"), encoder=False) as writer:
        writer.write({"__key__": "a", "png": _png(1), "json": json.dumps({"caption": "red"}).encode()})
        writer.write({"__key__": "b", "png": _png(2), "json": json.dumps({"text": "blue"}).encode()})
    dataset = PretrainDataset([str(tmp_path / "s")], _ident_views, _no_mask, shard_caption_key="caption")
    assert dataset[0][1] == "red"
    with pytest.warns(UserWarning, match=r"key b\): no caption: b\.json has no key 'caption'"):
        assert dataset[1] is None


def test_index_cache_is_reused_and_rebuilt_when_the_shard_changes(tmp_path, monkeypatch):
    first, _ = bad_shards(tmp_path / "bad")
    PretrainDataset([str(first)], _ident_views, _no_mask, shard_index_cache=False)
    assert not (tmp_path / "bad" / "a_index.json").exists()
    built = load_index(str(first))
    assert (tmp_path / "bad" / "a_index.json").is_file()
    import dataset.shards as shards

    def no_scan(path):
        raise AssertionError("scanned again")

    monkeypatch.setattr(shards, "scan_shard", no_scan)
    assert load_index(str(first)).members == built.members
    with TarWriter(str(first), encoder=False) as writer:
        writer.write({"__key__": "only", "png": _png(1), "txt": b"one"})
    monkeypatch.undo()
    assert load_index(str(first)).keys == ["only"]


# --- converter ------------------------------------------------------------------------------------------


def test_converter_round_trip_keeps_captions_and_image_bytes(small_demo_data, tmp_path):
    entries = json.loads(Path(small_demo_data["pretrain"]).read_text())
    shards = tmp_path / "shards"
    convert_main(["to-shards", "--train_file", small_demo_data["pretrain"], "--out_dir", str(shards),
                  "--samples_per_shard", "6"])
    assert sorted(p.name for p in shards.iterdir()) == [f"0000{i}{s}" for i in range(3) for s in (".tar", "_stats.json")]
    assert json.loads((shards / "00002_stats.json").read_text())["successes"] == 4
    result = convert_main(["to-json", "--shards", str(shards / "{00000..00002}.tar"), "--out_dir",
                           str(tmp_path / "back"), "--caption_key", "caption"])
    back = json.loads(Path(result["annotations"]).read_text())
    assert [e["caption"] for e in back] == [e["caption"] for e in entries]
    for original, copy in zip(entries, back):
        assert Path(copy["image"]).read_bytes() == Path(original["image"]).read_bytes()
    # the default reads .txt: a string caption, the first of a list
    plain = shards_to_json([str(shards)], str(tmp_path / "plain"))
    texts = [e["caption"] for e in json.loads(Path(plain["annotations"]).read_text())]
    assert texts == [c if isinstance(c, str) else c[0] for c in (e["caption"] for e in entries)]


def test_converter_counts_missing_images_as_failed(small_demo_data, tmp_path):
    entries = json.loads(Path(small_demo_data["pretrain"]).read_text())[:3]
    entries[1]["image"] = str(tmp_path / "gone.png")
    (tmp_path / "a.json").write_text(json.dumps(entries))
    with pytest.warns(ShardWarning, match=r"a\.json: entry 1 left out: cannot read image .*gone\.png"):
        result = json_to_shards(str(tmp_path / "a.json"), str(tmp_path / "s"))
    assert (result["successes"], result["failed"]) == (2, 1)
    stats = json.loads((tmp_path / "s" / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (3, 2, 1)
