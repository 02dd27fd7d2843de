"""Run the README's demo chain and print what each task demo reached, as the README's table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(REPO_ROOT))

DEMO_DATA = "demo_data"
TEXT_ENCODER = "configs/demo_vocab.txt"
DEFAULT_OUT_DIR = Path("output")
UNTRAINED = "untrained"
TABLE_HEADER = ("task", "after demo fine-tuning", "untrained", "note")
# NLVR.py has no --evaluate: one epoch that does not move the weights
LEARNING_RATE_ZERO = ("--overrides", "optimizer.lr=0", "schedular.lr=0", "schedular.warmup_lr=0",
                      "schedular.min_lr=0", "schedular.epochs=1")


@dataclass(frozen=True)
class Run:
    """One script run of the chain; ``checkpoint`` is relative to the output folder."""

    name: str
    script: str
    config: str
    checkpoint: str = ""
    flags: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()

    def untrained(self, flags: tuple[str, ...] = ("--evaluate",)) -> Run:
        """The same script from its initial weights (no checkpoint), in ``untrained/<name>``."""
        kept = tuple(flag for flag in self.flags if flag not in ("--evaluate", "--save_sims"))
        return Run(f"{UNTRAINED}/{self.name}", self.script, self.config, flags=kept + flags)


PRETRAIN = Run("pretrain_demo", "Pretrain.py", "configs/Pretrain_demo.yaml")
RETRIEVAL = Run("retrieval_demo", "Retrieval.py", "configs/Retrieval_demo.yaml", "pretrain_demo/checkpoint_07.pth",
                needs=("pretrain_demo",))
ZERO_SHOT = Run("retrieval_zero_shot_demo", "zero_shot_retrieval.py", "configs/Retrieval_zero_shot_demo.yaml",
                "retrieval_demo/checkpoint_best.pth", ("--evaluate", "--save_sims"), needs=("retrieval_demo",))
VQA = Run("vqa_demo", "VQA.py", "configs/VQA_demo.yaml", "pretrain_demo/checkpoint_07.pth", needs=("pretrain_demo",))
NLVR_PRETRAIN = Run("nlvr_pretrain_demo", "Pretrain_NLVR.py", "configs/NLVR_Pretrain_demo.yaml",
                    "pretrain_demo/checkpoint_07.pth", needs=("pretrain_demo",))
NLVR = Run("nlvr_demo", "NLVR.py", "configs/NLVR_demo.yaml", "nlvr_pretrain_demo/checkpoint_02.pth",
           needs=("nlvr_pretrain_demo",))
VE = Run("ve_demo", "VE.py", "configs/VE_demo.yaml", "pretrain_demo/checkpoint_07.pth", needs=("pretrain_demo",))
GROUNDING = Run("grounding_demo", "Grounding.py", "configs/Grounding_demo.yaml", "pretrain_demo/checkpoint_07.pth",
                ("--block_num", "2"), needs=("pretrain_demo",))
TRAINED_RUNS = (PRETRAIN, RETRIEVAL, ZERO_SHOT, VQA, NLVR_PRETRAIN, NLVR, VE, GROUNDING)


def read_log(folder: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``folder/log.txt`` (the final ``best epoch: N`` is not one)."""
    path = folder / "log.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no log.txt (did the run fail? see console.txt there)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def last_with(folder: Path, key: str) -> dict[str, Any]:
    entries = [entry for entry in read_log(folder) if key in entry]
    if not entries:
        raise KeyError(f"{folder / 'log.txt'}: no entry with {key!r}")
    return entries[-1]


def joined(entry: dict[str, Any], keys: Sequence[str], fmt: str = "{}") -> str:
    return " / ".join(fmt.format(entry[key]) for key in keys)


def retrieval_figure(folder: Path) -> str:
    return f"{last_with(folder, 'test_r_mean')['test_r_mean']:.2f}"


def vqa_figure(folder: Path) -> str:
    return f"{last_with(folder, 'test_vqa_accuracy')['test_vqa_accuracy']:.2f}"


def accuracy_figure(folder: Path) -> str:
    return joined(last_with(folder, "test_acc"), ("val_acc", "test_acc"))


def nlvr_figure(folder: Path) -> str:
    best = max(float(entry["val_acc"]) for entry in read_log(folder) if "val_acc" in entry)
    return f"{accuracy_figure(folder)} (best val {best:.4f})"


GROUNDING_KEYS = ("val_d", "testA_d", "testB_d")


def grounding_figure(folder: Path) -> str:
    return joined(last_with(folder, "val_d"), GROUNDING_KEYS, "{:.3f}")


def random_box_note() -> str:
    """The expected accuracy of a detector box drawn uniformly at random, per grounding split."""
    from configs.loader import load_config
    from dataset.annotations import read_json
    from dataset.grounding import ReferAnnotations
    from engine.grounding_eval import GROUNDING_SPLITS, IOU_THRESHOLD, compute_iou

    config = load_config(REPO_ROOT / GROUNDING.config)
    refer = ReferAnnotations.load(str(REPO_ROOT / config["refcoco_data"]), "refcoco+", "unc")
    dets = read_json(str(REPO_ROOT / config["det_file"]))
    hits: dict[str, list[float]] = {split: [] for split in GROUNDING_SPLITS}
    for test_file in config["test_file"]:
        for entry in read_json(str(REPO_ROOT / test_file)):
            ref_id = int(entry["ref_id"])
            ref = refer.Refs[ref_id]
            boxes = dets[str(ref["image_id"])]
            truth = refer.refToAnn[ref_id]["bbox"]
            if ref["split"] in hits:
                hits[ref["split"]].append(sum(compute_iou(truth, box) >= IOU_THRESHOLD for box in boxes) / len(boxes))
    return "random box: " + " / ".join(f"{sum(v) / len(v):.3f}" for v in hits.values())


@dataclass(frozen=True)
class Row:
    """A table row: the trained run and its untrained twin, read by ``figure``."""

    task: str
    trained: Run
    untrained: Run
    figure: Callable[[Path], str]
    note: str | Callable[[], str] = ""
    untrained_figure: Callable[[Path], str] | None = None


ROWS: dict[str, Row] = {
    "retrieval": Row("retrieval (`re_test`, 32 images), `r_mean`", RETRIEVAL, RETRIEVAL.untrained(),
                     retrieval_figure, "chance level: no alignment learned (see above)"),
    "zero_shot": Row("zero-shot retrieval (`re_test2`, 64 images), `r_mean`", ZERO_SHOT, ZERO_SHOT.untrained(),
                     retrieval_figure, "chance level"),
    "vqa": Row("VQA accuracy (128 questions, with answers)", VQA, VQA.untrained(), vqa_figure,
               "the question-type prior"),
    "nlvr": Row("NLVR2 (`val` / `test` accuracy)", NLVR, NLVR.untrained(LEARNING_RATE_ZERO), nlvr_figure,
                "near chance (demo config without distillation)", accuracy_figure),
    "ve": Row("SNLI-VE (`val` / `test` accuracy)", VE, VE.untrained(), accuracy_figure),
    "grounding": Row("grounding (`val_d` / `testA_d` / `testB_d`)", GROUNDING, GROUNDING.untrained(),
                     grounding_figure, random_box_note),
}


def runs_for(rows: Sequence[str]) -> list[Run]:
    """Every run the rows need, dependencies first, in the README's order, then the untrained ones."""
    by_name = {run.name: run for run in TRAINED_RUNS}
    wanted: set[str] = set()
    pending = [ROWS[row].trained.name for row in rows]
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(by_name[name].needs)
    return [run for run in TRAINED_RUNS if run.name in wanted] + [ROWS[row].untrained for row in rows]


def command(run: Run, out_dir: Path, num_workers: int, device: str = "cpu") -> list[str]:
    """The README's command line of ``run`` (outputs under ``out_dir``) with the reproducibility flags."""
    cmd = [sys.executable, run.script, "--config", run.config, "--output_dir", str(out_dir / run.name)]
    if run.checkpoint:
        cmd += ["--checkpoint", str(out_dir / run.checkpoint)]
    cmd += ["--text_encoder", TEXT_ENCODER, *run.flags, "--device", device, "--deterministic",
            "--num_workers", str(num_workers)]
    if "--save_sims" in run.flags and out_dir != DEFAULT_OUT_DIR:  # the config names output/<run>/sims
        cmd += ["--overrides", f"save_sims={out_dir / run.name / 'sims'}"]
    return cmd


def run_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def execute(run: Run, out_dir: Path, threads: int, num_workers: int) -> float:
    """Run ``run`` from an emptied folder (output to ``console.txt``); return seconds, or exit on failure."""
    folder = REPO_ROOT / out_dir / run.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cmd = command(run, out_dir, num_workers)
    print(f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} python " + " ".join(cmd[1:]), flush=True)
    start = time.monotonic()
    with open(folder / "console.txt", "w", encoding="utf-8") as console:
        status = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(threads), stdout=console,
                                stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.monotonic() - start
    if status != 0:
        tail = (folder / "console.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{run.name} failed with exit status {status}:\n{tail}")
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def loss_lines(folder: Path) -> list[str]:
    """``epoch N: loss_x v  loss_y v ...`` for the first and last epoch of the pretraining ``log.txt``."""
    entries = [entry for entry in read_log(folder) if "epoch" in entry]
    lines = []
    for entry in (entries[0], entries[-1]):
        losses = "  ".join(f"{key[len('train_'):]} {value}" for key, value in entry.items()
                           if key.startswith("train_loss_"))
        lines.append(f"epoch {entry['epoch']}: {losses}")
    return lines


def platform_line() -> str:
    """The torch build, CPU architecture and CPU capability the figures depend on."""
    import torch

    return (f"torch {torch.__version__}, {platform.machine()}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def conditions(threads: int, num_workers: int) -> dict[str, str]:
    """The platform, the CPU model and the reproducibility settings of every run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform_line(), "cpu": cpu, "python": platform.python_version(),
            "settings": f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} --deterministic "
                        f"--num_workers {num_workers}"}


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with the README's header."""
    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return "\n".join([line(TABLE_HEADER), line(["---"] * len(TABLE_HEADER)), *map(line, rows)])


def parse_table(markdown: str) -> dict[str, list[str]]:
    """The rows of the task-demo table in ``markdown`` (e.g. README.md), by task: the other cells."""
    header = format_table([]).splitlines()[0]
    lines = markdown.splitlines()
    if header not in lines:
        raise ValueError(f"no table with the header {header!r}")
    rows = {}
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the chain for the chosen rows, print the loss lines and the table; returns what was printed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR), help="folder of the runs' output folders")
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS), help="table rows to produce")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and MKL_NUM_THREADS of every run")
    parser.add_argument("--num_workers", type=int, default=1, help="--num_workers of every run")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from demo.data import generate_demo_data

    out_dir = Path(args.out_dir).resolve()
    if out_dir.is_relative_to(REPO_ROOT):  # the scripts run in the repository, as the README's commands
        out_dir = out_dir.relative_to(REPO_ROOT)
    generate_demo_data(REPO_ROOT / DEMO_DATA)
    seconds = {run.name: execute(run, out_dir, args.threads, args.num_workers)
               for run in runs_for(args.rows)}
    folder, table = REPO_ROOT / out_dir, []
    for key in args.rows:
        row = ROWS[key]
        note = row.note() if callable(row.note) else row.note
        untrained = (row.untrained_figure or row.figure)(folder / row.untrained.name)
        table.append([row.task, row.figure(folder / row.trained.name), untrained, note])
    result = {"conditions": conditions(args.threads, args.num_workers),
              "losses": loss_lines(folder / PRETRAIN.name), "table": format_table(table),
              "rows": {key: cells for key, cells in zip(args.rows, table)}, "seconds": seconds}
    print("\n" + "\n".join(f"{key}: {value}" for key, value in result["conditions"].items()))
    print("\n" + "\n".join(result["losses"]) + "\n\n" + result["table"])
    print(f"\n{len(seconds)} runs in {sum(seconds.values()):.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
