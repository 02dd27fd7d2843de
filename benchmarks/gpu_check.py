"""Check a GPU: pretraining-step speed and memory per precision, the parity fixtures in float32, the
keyword-vote ties of the pretraining fixture, every entry script on its demo config.

python benchmarks/gpu_check.py --out DIR [--budget_s 300] [--dry]    (DIR/gpu_check.json and .md)
``--dry``: the same code on the CPU with the ``tiny`` preset, one batch size, one compiled row, one script.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from benchmarks.pretrain_step import matmul_tflops, measure_step  # noqa: E402
from demo.task_demos import DEMO_DATA, TRAINED_RUNS, VE, Run, command, run_env  # noqa: E402
from models.simla.pretrain import SIMLAPretrain, keyword_votes  # noqa: E402
from tests.parity import run_fixture  # noqa: E402

FIXTURES = sorted(glob.glob(os.path.join(REPO_ROOT, "tests", "data", "parity", "fixtures", "*.pt")))
#: the pretraining-step rows: measure_step options
ROWS = {"float32": {}, "tf32": {"tf32": True}, "bf16": {"amp": "bf16"},
        "bf16 + grad checkpointing": {"amp": "bf16", "grad_checkpointing": True},
        "bf16 + fused dropout": {"amp": "bf16", "fused_dropout": True}}


@dataclass(frozen=True)
class Plan:
    preset: str
    batch_sizes: tuple[int, ...]
    steps: int
    warmup: int
    matmul_size: int
    compiled_rows: tuple[str, ...]
    backend: str  # of compile_regions
    scripts: tuple[Run, ...]
    threads: int
    num_workers: int
    script_timeout_s: float


GPU = Plan("base", (64, 128), 3, 2, 8192, tuple(ROWS), "inductor", TRAINED_RUNS, 4, 2, 90.0)
# the eager backend traces the blocks as inductor would, without generating kernels (minutes on a CPU)
DRY = Plan("tiny", (2,), 1, 1, 256, ("float32",), "eager", (VE.untrained(),), 1, 0, 120.0)
COMPILE_GUESS_S = 45.0  # the time a compiled row is taken to need before one has run


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


@contextlib.contextmanager
def recorded_keyword_attention(calls: list[dict]):
    """Record the [CLS] attention and the votes every pretraining forward ranks its keywords from."""
    original = SIMLAPretrain.keyword_attention

    def recording(self: SIMLAPretrain, *args: torch.Tensor) -> torch.Tensor:
        attention = original(self, *args)
        calls.append({"attention": attention.detach().float(), "keys_per_head": self.psl_keys_per_head,
                      "votes": keyword_votes(attention, self.psl_keys_per_head), "keywords": self.psl_num_keywords})
        return attention

    SIMLAPretrain.keyword_attention = recording
    try:
        yield
    finally:
        SIMLAPretrain.keyword_attention = original


def keyword_ties(attention: torch.Tensor, votes: torch.Tensor, keys_per_head: int, keywords: int) -> list[dict]:
    """Per caption: the smallest gap over heads between the k-th and (k+1)-th attention value (also in float32
    spacings at the k-th value), and the positions sharing the vote count of the last keyword."""
    attention, votes = attention.cpu(), votes.cpu()
    length = attention.shape[-1]
    top = attention.sort(dim=-1, descending=True).values
    rows = []
    for caption in range(attention.shape[0]):
        row: dict = {"caption": caption, "keys_per_head": keys_per_head, "keywords": keywords}
        if keys_per_head < length:
            kth = top[caption, :, keys_per_head - 1]
            gaps = kth - top[caption, :, keys_per_head]
            head = int(gaps.argmin())
            spacing = torch.nextafter(kth[head], torch.tensor(math.inf)) - kth[head]
            row.update(head=head, min_gap=float(gaps[head]), min_gap_float32_spacings=float(gaps[head] / spacing))
        counts = votes[caption].sort(descending=True).values
        k = min(keywords, length)
        last = int(counts[k - 1])
        row.update(last_keyword_votes=last, positions_with_those_votes=int((counts == last).sum()),
                   of_them_keywords=int((counts[:k] == last).sum()),
                   tie_at_boundary=bool(k < length and int(counts[k]) == last))
        rows.append(row)
    return rows


def fixture_result(path: str, device: torch.device) -> dict:
    name = os.path.basename(path)
    try:
        outputs = run_fixture(path, device)
    except Exception as exc:  # a fixture that cannot run is a failure of that fixture
        return {"fixture": name, "passed": False, "error": first_line(exc)}
    failed = [{"output": r.name, "error": r.error, "detail": r.detail} for r in outputs if not r.passed]
    errors = [r.error for r in outputs if r.error is not None]
    return {"fixture": name, "passed": not failed, "outputs": len(outputs), "max_error": max(errors, default=None),
            "failed": failed}


def parity(device: torch.device) -> tuple[list[dict], list[dict]]:
    """Every fixture in float32 on ``device`` (no TF32); the keyword ties of the pretraining fixture."""
    calls: list[dict] = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with recorded_keyword_attention(calls):
            results = [fixture_result(path, device) for path in FIXTURES]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return results, [row for call in calls for row in keyword_ties(**call)]


def scripts(plan: Plan, device: torch.device, out_dir: Path, deadline: float) -> list[dict]:
    """Each script in order with its demo command line, up to ``script_timeout_s``; later runs that need a
    failed one are skipped."""
    from demo.data import generate_demo_data

    generate_demo_data(Path(REPO_ROOT) / DEMO_DATA)
    results, failed = [], set()
    for run in plan.scripts:
        row = {"script": run.script, "run": run.name}
        left = deadline - time.monotonic()
        missing = [name for name in run.needs if name in failed]
        if missing or left < 10:
            failed.add(run.name)
            results.append(dict(row, skipped=f"needs {missing[0]}" if missing else f"time budget ({left:.0f} s left)"))
            continue
        folder = out_dir / run.name
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(folder / "console.txt", "w", encoding="utf-8") as console:
            try:
                status = subprocess.run(command(run, out_dir, plan.num_workers, device.type), cwd=REPO_ROOT,
                                        env=run_env(plan.threads), stdout=console, stderr=subprocess.STDOUT,
                                        timeout=min(plan.script_timeout_s, left)).returncode
            except subprocess.TimeoutExpired:
                status = "timeout"
        row.update(passed=status == 0, seconds=round(time.monotonic() - start, 1), console=str(folder / "console.txt"))
        if status != 0:
            failed.add(run.name)
            lines = (folder / "console.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            row["error"] = "timeout" if status == "timeout" else f"exit status {status}: {(lines or [''])[-1]}"
        results.append(row)
    return results


def pretraining(plan: Plan, device: torch.device, peak_tflops: float, deadline: float) -> list[dict]:
    """The rows at every batch size, uncompiled first; a row whose like took longer than the time left is
    skipped; a failing row (out of memory among them) is recorded and the next one runs."""
    results, gflop, took = [], {}, {}  # took: the longest row so far, uncompiled and compiled
    for compiled in (False, True):
        for batch_size in plan.batch_sizes:
            for name, options in ROWS.items():
                if compiled and name not in plan.compiled_rows:
                    continue
                row = {"row": name + (" (compiled)" if compiled else ""), "batch_size": batch_size}
                left = deadline - time.monotonic()
                needed = took.get(compiled, COMPILE_GUESS_S if compiled else 0.0)
                if left <= needed:
                    results.append(dict(row, skipped=f"time budget: {left:.0f} s left, such a row takes {needed:.0f} s"))
                    continue
                start = time.monotonic()
                try:
                    step = measure_step(plan.preset, batch_size, device, compile=plan.backend if compiled else None,
                                        steps=plan.steps, warmup=plan.warmup, count_flops=batch_size not in gflop,
                                        **options)
                except Exception as exc:  # out of memory or a failing option: record it and go on
                    row["error"] = first_line(exc)
                else:
                    gflop.setdefault(batch_size, step.get("gflop_per_step"))
                    seconds = step["median_s_per_step"]
                    row.update(s_per_step=seconds, samples_per_s=step["samples_per_s"],
                               first_step_s=step["first_step_s"], peak_gpu_mb=step.get("peak_gpu_mb"),
                               gflop_per_step=gflop[batch_size],
                               mfu=round(gflop[batch_size] * 1e9 / seconds / (peak_tflops * 1e12), 4))
                finally:
                    torch.compiler.reset()
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                took[compiled] = max(took.get(compiled, 0.0), time.monotonic() - start)
                results.append(row)
    return results


def table(header: list[str], rows: list[list]) -> str:
    def line(cells: list) -> str:
        return "| " + " | ".join("" if cell is None else f"{cell:.4g}" if isinstance(cell, float) else str(cell)
                                 for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def markdown(report: dict) -> str:
    env = report["environment"]
    pretrain = [[r["row"], r["batch_size"], r.get("s_per_step"), r.get("samples_per_s"), r.get("first_step_s"),
                 r.get("peak_gpu_mb"), r.get("gflop_per_step"), r.get("mfu"), r.get("error") or r.get("skipped")]
                for r in report["pretraining"]]
    fixtures = [[r["fixture"], "pass" if r["passed"] else "FAIL", r.get("outputs"), r.get("max_error"),
                 r.get("error") or "; ".join(f"{f['output']} ({f['error']}) {f['detail']}".strip()
                                             for f in r["failed"][:5])] for r in report["parity"]]
    ties = [[r["caption"], f"{r['keys_per_head']} / {r['keywords']}", r.get("head"), r.get("min_gap"),
             r.get("min_gap_float32_spacings"), r["last_keyword_votes"],
             f"{r['positions_with_those_votes']} ({r['of_them_keywords']})", "yes" if r["tie_at_boundary"] else "no"]
            for r in report["keyword_ties"]]
    runs = [[r["script"], r["run"], "pass" if r.get("passed") else ("skipped" if "skipped" in r else "FAIL"),
             r.get("seconds"), r.get("error") or r.get("skipped")] for r in report["scripts"]]
    return "\n\n".join([
        f"# GPU check: {env['device']}, torch {env['torch']}, preset `{env['preset']}`, "
        f"{env['seconds']:.0f} s of a {env['budget_s']:.0f} s budget",
        f"Measured dense bf16 matrix products ({report['matmul']['size']}^3): "
        f"{report['matmul']['tflops_per_s']:.1f} TFLOP/s (the MFU denominator).",
        table(["row", "batch", "s/step", "samples/s", "first step (s, with compilation)", "peak GPU MB",
               "GFLOP/step", "MFU", "note"], pretrain),
        table(["parity fixture (float32)", "result", "outputs", "max abs error", "failing outputs"], fixtures),
        "Keywords of the pretraining fixture: per head, the gap between its k-th and (k+1)-th [CLS] attention "
        "value (the smallest over heads); then the votes of the last of the K keywords. Where the votes tie, "
        "the device's top-k order picks the keyword, so a CPU/GPU difference there is expected.",
        table(["caption", "k / K", "head", "smallest gap", "in float32 spacings", "votes of the last keyword",
               "positions with those votes (keywords among them)", "tie at the top-k boundary"], ties),
        table(["script", "demo run", "result", "seconds", "note"], runs),
    ]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of gpu_check.json, gpu_check.md and the script runs")
    parser.add_argument("--budget_s", type=float, default=300.0,
                        help="seconds after which no script or pretraining row starts")
    parser.add_argument("--dry", action="store_true", help="run on the CPU with the tiny preset (as the tests)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--dry runs the same code on the CPU)")
    started = time.monotonic()
    plan, device = (DRY, torch.device("cpu")) if args.dry else (GPU, torch.device("cuda"))
    if args.dry:
        torch.set_num_threads(plan.threads)  # the tests share the cores
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tflops = matmul_tflops(device, plan.matmul_size)
    parity_results, ties = parity(device)
    # the scripts may use the first 45 % of the budget, the pretraining rows the rest
    runs = scripts(plan, device, out_dir / "scripts", started + 0.45 * args.budget_s)
    rows = pretraining(plan, device, tflops, started + args.budget_s)
    report = {
        "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "torch": torch.__version__, "cuda": torch.version.cuda, "preset": plan.preset,
                        "budget_s": args.budget_s, "seconds": round(time.monotonic() - started, 1)},
        "matmul": {"size": plan.matmul_size, "dtype": "bfloat16", "tflops_per_s": round(tflops, 2)},
        "pretraining": rows, "parity": parity_results, "keyword_ties": ties, "scripts": runs,
    }
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    (out_dir / "gpu_check.md").write_text(text, encoding="utf-8")
    print(text)
    return report


if __name__ == "__main__":
    main()
