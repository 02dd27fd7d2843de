"""Kill-and-resume campaign: SIGKILL a short ``Pretrain.py`` run at random moments and resume it until it ends.

A reference run trains uninterrupted and prints ``Model state fingerprint: <hex>``. Each trial starts
the same run with ``--save_every_steps 1`` in a fresh output folder, kills it (during start-up or at a
random moment of training), resumes from the newest checkpoint in the folder (``checkpoint_last.pth``
or a per-epoch ``checkpoint_XX.pth``; from scratch when there is none) with ``--resume true``, possibly
kills it again, and so on until a run finishes. Nothing is lost when the final fingerprint equals the
reference. For every kill the campaign also records the training time thrown away (since the last
checkpoint written before the kill), the estimated number of steps redone and the restart time.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fault_campaign.checkpoints import demo_script_command
from tests.fault_campaign.common import LOST, REPO, CampaignReport, CaseResult, demo_data, script_env, short

FINGERPRINT = re.compile(r"^Model state fingerprint: ([0-9a-f]{64})", re.MULTILINE)
STEPS_PER_EPOCH = re.compile(r"^Train Epoch: \[\d+\]\s+\[\s*\d+/(\d+)\]", re.MULTILINE)
START_TRAINING = "Start training"
IDENTICAL = "resumed, fingerprint identical"
NOT_KILLED = "finished before the kill, fingerprint identical"
CODE_CHANGED = "inconclusive, product code changed during the trial"
SAVING_IDENTICAL = "not killed, per-step saves, fingerprint identical"
RUN_TIMEOUT = 600.0
MAX_ATTEMPTS = 8


@dataclass
class Attempt:
    """One process of a trial: how it started, whether and when it was killed, and what it printed."""

    command: list[str]
    resumed_from: str
    steps_kept: int
    launched: float
    training_started: float | None = None
    fingerprint_seen: float | None = None
    ended: float = 0.0
    killed: bool = False
    kill_phase: str = ""
    returncode: int | None = None
    output: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.launched


@dataclass
class Reference:
    """The uninterrupted run: fingerprint, total steps and timings."""

    fingerprint: str
    steps: int
    seconds: float
    startup: float
    train_seconds: float
    code: str = ""

    @property
    def step_seconds(self) -> float:
        return self.train_seconds / max(1, self.steps)


@dataclass
class KillRecord:
    """What one kill cost: the training time since the last checkpoint written before it (thrown away),
    that time in reference steps, the steps the resumed run kept, and its time to get back to training."""

    phase: str
    after_seconds: float
    steps_kept: int
    resumed_from: str
    lost_seconds: float
    steps_redone_estimate: int
    restart_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "after_s": round(self.after_seconds, 2), "steps_kept": self.steps_kept,
                "steps_redone_est": self.steps_redone_estimate, "resumed_from": self.resumed_from,
                "training_lost_s": round(self.lost_seconds, 2),
                "restart_s": None if self.restart_seconds is None else round(self.restart_seconds, 2)}


@dataclass
class KillSettings:
    """Size of the run every trial trains."""

    epochs: int = 2
    images: int = 32
    timeout: float = RUN_TIMEOUT
    extra_overrides: tuple[str, ...] = field(default_factory=tuple)


def product_code_hash() -> str:
    """A digest of the product's Python files and configs (not tests/ or benchmarks/), to notice
    when the code under test changes while the campaign runs."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.rglob("*.py"), *(REPO / "configs").glob("*")]):
        relative = path.relative_to(REPO)
        if relative.parts[0] in ("tests", "benchmarks", "output", "demo_data", ".venv") or \
                "__pycache__" in relative.parts or not path.is_file():
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_attempt(command: list[str], log_file: Path, resumed_from: str, steps_kept: int,
                kill_plan: tuple[str, float] | None, timeout: float) -> Attempt:
    """Run one process; with ``kill_plan`` = (phase, delay) SIGKILL it ``delay`` seconds after its launch
    (``startup``) or after it printed "Start training" (``training``)."""
    attempt = Attempt(command, resumed_from, steps_kept, launched=time.time())
    with open(log_file, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(command, cwd=REPO, env=script_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    while True:
        returncode = proc.poll()
        now = time.time()
        if attempt.training_started is None or attempt.fingerprint_seen is None:
            text = log_file.read_text(encoding="utf-8", errors="replace")
            if attempt.training_started is None and START_TRAINING in text:
                attempt.training_started = now
            if attempt.fingerprint_seen is None and FINGERPRINT.search(text):
                attempt.fingerprint_seen = now
        if returncode is not None:
            break
        due = False
        if kill_plan is not None:
            phase, delay = kill_plan
            if phase == "startup":
                due = now - attempt.launched >= delay
            else:
                due = attempt.training_started is not None and now - attempt.training_started >= delay
        if due or now - attempt.launched > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            attempt.killed = due
            attempt.kill_phase = kill_plan[0] if due and kill_plan else "timeout"
            break
        time.sleep(0.05)
    attempt.ended = time.time()
    attempt.returncode = proc.returncode
    attempt.output = log_file.read_text(encoding="utf-8", errors="replace")
    return attempt


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The most recently written of ``checkpoint_last.pth`` and ``checkpoint_XX.pth`` (None if none)."""
    candidates = [p for p in output_dir.glob("checkpoint_*.pth")
                  if p.name == "checkpoint_last.pth" or re.fullmatch(r"checkpoint_\d+\.pth", p.name)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def optimizer_steps(path: Path) -> int:
    """Optimizer steps taken before ``path`` was written (AdamW's per-parameter ``step``)."""
    from engine.checkpoint import load_checkpoint

    state = load_checkpoint(str(path)).get("optimizer", {}).get("state", {})
    steps = [int(entry["step"]) for entry in state.values() if "step" in entry]
    return max(steps) if steps else 0


def reference_run(demo: dict[str, str], folder: Path, settings: KillSettings, flags: tuple[str, ...] = (),
                  name: str = "reference") -> Reference:
    """Run the training once without interruption (with extra ``flags``, in ``folder/name``)."""
    code = product_code_hash()
    output_dir = folder / name
    shutil.rmtree(output_dir, ignore_errors=True)
    command = demo_script_command("Pretrain.py", demo, output_dir, *flags,
                                  overrides=(f"schedular.epochs={settings.epochs}", *settings.extra_overrides))
    attempt = run_attempt(command, folder / f"{name}.log", "scratch", 0, None, settings.timeout)
    found = FINGERPRINT.search(attempt.output)
    if attempt.returncode != 0 or not found:
        raise RuntimeError(f"the reference run failed (exit {attempt.returncode}):\n{attempt.output[-3000:]}")
    per_epoch = STEPS_PER_EPOCH.search(attempt.output)
    steps = int(per_epoch.group(1)) * settings.epochs if per_epoch else 0
    started = attempt.training_started or attempt.launched
    finished = attempt.fingerprint_seen or attempt.ended
    return Reference(found.group(1), steps, attempt.seconds, started - attempt.launched, finished - started, code)


def _kill_record(attempt: Attempt, next_checkpoint: Path | None, steps_kept: int, step_seconds: float,
                 total_steps: int) -> KillRecord:
    """The cost of one kill; the steps redone never exceed the steps that were still to train."""
    lost = 0.0
    if attempt.training_started is not None:
        saved_at = attempt.training_started
        if next_checkpoint is not None and next_checkpoint.stat().st_mtime > attempt.training_started:
            saved_at = next_checkpoint.stat().st_mtime
        lost = max(0.0, attempt.ended - saved_at)
    return KillRecord(attempt.kill_phase, attempt.ended - attempt.launched, steps_kept,
                      next_checkpoint.name if next_checkpoint else "scratch", lost,
                      min(round(lost / step_seconds), max(0, total_steps - steps_kept)))


def run_trial(index: int, demo: dict[str, str], folder: Path, settings: KillSettings, reference: Reference,
              rng: random.Random, kills_left: int, step_seconds: float
              ) -> tuple[CaseResult, list[KillRecord], list[Attempt]]:
    """Kill and resume one run until it completes; returns its result, its kills and its attempts.
    ``step_seconds`` (one step with its checkpoint save) converts thrown-away time into steps."""
    output_dir = folder / f"trial_{index:02d}"
    shutil.rmtree(output_dir, ignore_errors=True)
    code = product_code_hash()
    attempts: list[Attempt] = []
    kills: list[KillRecord] = []
    checkpoint: Path | None = None
    steps_kept = 0
    overrides = (f"schedular.epochs={settings.epochs}", *settings.extra_overrides)
    for number in range(MAX_ATTEMPTS):
        plan = None
        if kills_left > len(kills) and (number == 0 or rng.random() < 0.5) and number < MAX_ATTEMPTS - 1:
            if rng.random() < 0.2:
                plan = ("startup", rng.uniform(0.0, reference.startup))
            else:
                plan = ("training", rng.uniform(0.0, reference.train_seconds * 1.2))
        flags = ["--save_every_steps", "1"]
        if checkpoint is not None:
            flags += ["--checkpoint", str(checkpoint), "--resume", "true"]
        command = demo_script_command("Pretrain.py", demo, output_dir, *flags, overrides=overrides)
        attempt = run_attempt(command, folder / f"trial_{index:02d}_attempt_{number}.log",
                              checkpoint.name if checkpoint else "scratch", steps_kept, plan, settings.timeout)
        if kills and attempt.training_started is not None:
            kills[-1].restart_seconds = attempt.training_started - attempt.launched
        attempts.append(attempt)
        if not attempt.killed:
            break
        checkpoint = newest_checkpoint(output_dir)
        steps_kept = optimizer_steps(checkpoint) if checkpoint else 0
        kills.append(_kill_record(attempt, checkpoint, steps_kept, step_seconds, reference.steps))
    final = attempts[-1]
    result = CaseResult(index, f"{len(kills)} kill(s)", "Pretrain.py", LOST,
                        extra={"kills": [k.as_dict() for k in kills], "attempts": len(attempts),
                               "seconds": round(sum(a.seconds for a in attempts), 2)})
    found = FINGERPRINT.search(final.output)
    if product_code_hash() != code:
        result.outcome, result.detail = CODE_CHANGED, "the files under test changed while the trial ran"
    elif final.killed or final.kill_phase == "timeout":
        result.detail = f"no attempt finished ({final.kill_phase or 'killed'} after {len(attempts)} attempts)"
    elif final.returncode != 0 or not found:
        result.detail = f"the resumed run failed (exit {final.returncode}): {short(final.output[-1500:], 600)}"
    elif found.group(1) != reference.fingerprint:
        result.detail = (f"final fingerprint {found.group(1)[:16]}... differs from the reference "
                         f"{reference.fingerprint[:16]}... (resumed from {', '.join(k.resumed_from for k in kills)})")
    else:
        result.outcome = IDENTICAL if kills else NOT_KILLED
        result.detail = f"{len(kills)} kill(s), {len(attempts)} attempts"
    return result, kills, attempts


def _references(demo: dict[str, str], folder: Path, settings: KillSettings, report: CampaignReport,
                log: Callable[[str], None]) -> tuple[Reference, Reference]:
    """The uninterrupted run, and the same with ``--save_every_steps 1``: saving every step must not change
    the result (a case of the report); its step time includes the save."""
    reference = reference_run(demo, folder, settings)
    log(f"  kills: reference run {reference.seconds:.1f} s, {reference.steps} steps, "
        f"fingerprint {reference.fingerprint[:16]}...")
    saving = reference_run(demo, folder, settings, ("--save_every_steps", "1"), "reference_saving")
    case = CaseResult(len(report.cases), "0 kill(s)", "Pretrain.py --save_every_steps 1", SAVING_IDENTICAL,
                      f"{saving.seconds:.1f} s")
    if saving.fingerprint != reference.fingerprint:
        case.outcome = LOST
        case.detail = (f"saving every step changes the result: fingerprint {saving.fingerprint[:16]}... instead of "
                       f"{reference.fingerprint[:16]}...")
    report.cases.append(case)
    return reference, saving


def run_kills(kills: int, seed: int, work_dir: Path, budget_seconds: float = 600.0,
              settings: KillSettings | None = None, log: Callable[[str], None] = print) -> CampaignReport:
    """Kill and resume training runs until ``kills`` kills were made or ``budget_seconds`` have passed."""
    settings = settings or KillSettings()
    report = CampaignReport("kills and resumes")
    start = time.monotonic()
    folder = work_dir / "kills"
    folder.mkdir(parents=True, exist_ok=True)
    demo = demo_data(work_dir / "kills_demo", num_train=settings.images)
    rng = random.Random(f"kills/{seed}")
    reference, saving = _references(demo, folder, settings, report, log)
    records: list[KillRecord] = []
    trial_seconds: list[tuple[float, int]] = []
    trial = 0
    references = 1
    inconclusive_kills = 0
    while len(records) < kills and time.monotonic() - start < budget_seconds:
        if product_code_hash() != reference.code:
            log("  kills: the product code changed; running the references again")
            reference, saving = _references(demo, folder, settings, report, log)
            references += 1
        result, trial_kills, attempts = run_trial(trial, demo, folder, settings, reference, rng, kills - len(records),
                                                  saving.step_seconds)
        result.extra["trial"] = trial
        result.index = len(report.cases)
        report.cases.append(result)
        if result.outcome == CODE_CHANGED:  # no verdict: its kills do not count towards the requested number
            inconclusive_kills += len(trial_kills)
        else:
            records.extend(trial_kills)
            trial_seconds.append((sum(a.seconds for a in attempts) - saving.seconds, len(trial_kills)))
        log(f"  kills: trial {trial}: {result.outcome} ({result.detail}); {len(records)}/{kills} kills")
        trial += 1
    if references > 1:
        report.notes.append(f"the product code changed during the campaign: the reference run was repeated "
                            f"{references - 1} time(s), each trial compared with the reference of its code")
    changed = sum(case.outcome == CODE_CHANGED for case in report.cases)
    if changed:
        report.notes.append(f"{changed} trial(s) inconclusive: the code changed while they ran "
                            f"(their {inconclusive_kills} kill(s) are not counted)")
    wrote_last = any(path.name == "checkpoint_last.pth" for path in folder.glob("trial_*/*.pth"))
    report.summary["reference"] = (f"{reference.steps} steps, {reference.seconds:.1f} s "
                                   f"(start-up {reference.startup:.1f} s), fingerprint {reference.fingerprint}")
    report.summary["kills made"] = f"{len(records)} of {kills} requested in {trial} trials"
    if len(records) < kills:
        report.notes.append(f"time budget of {budget_seconds:.0f} s reached after {len(records)} kills")
    if records:
        per_kill = [extra / n for extra, n in trial_seconds if n]
        redone = [r.steps_redone_estimate for r in records]
        restarts = [r.restart_seconds for r in records if r.restart_seconds is not None]
        sources: dict[str, int] = {}
        for record in records:
            kind = "checkpoint_last.pth" if record.resumed_from == "checkpoint_last.pth" else (
                "scratch" if record.resumed_from == "scratch" else "checkpoint_XX.pth")
            sources[kind] = sources.get(kind, 0) + 1
        report.summary["extra wall time per kill (vs. the uninterrupted run with per-step saves)"] = (
            f"{sum(per_kill) / max(1, len(per_kill)):.1f} s (mean)")
        report.summary["training time thrown away per kill"] = (
            f"{sum(r.lost_seconds for r in records) / len(records):.2f} s (mean), "
            f"{max(r.lost_seconds for r in records):.2f} s (max)")
        report.summary["steps redone per kill (thrown-away time / time of a step with its save)"] = (
            f"{sum(redone) / len(redone):.2f} (mean), {max(redone)} (max) of {reference.steps}; "
            f"step with save {saving.step_seconds:.2f} s, without {reference.step_seconds:.2f} s")
        if restarts:
            report.summary["restart to training"] = f"{sum(restarts) / len(restarts):.1f} s (mean)"
        report.summary["resumed from"] = ", ".join(f"{k}: {v}" for k, v in sorted(sources.items()))
        report.summary["phase of the kills"] = ", ".join(
            f"{phase}: {sum(r.phase == phase for r in records)}" for phase in ("startup", "training"))
    if not wrote_last:
        report.notes.append("no run wrote checkpoint_last.pth: --save_every_steps had no effect, so runs "
                            "resumed from per-epoch checkpoints or from scratch")
    report.seconds = time.monotonic() - start
    return report
