"""Fault campaign: feed the product bad inputs, malicious checkpoints, kills and random text, and count losses.

    python -m tests.fault_campaign --kills 20 --bad_inputs 200 --checkpoints 20 --properties 500 \\
        --seed 0 --work_dir /tmp/campaign --json campaign.json

A size of 0 skips that sub-campaign. Each sub-campaign
prints a table: cases tried, the count of each outcome, and the cases lost, i.e. where the product
crashed without a clear error, ran planted code, lost data or silently produced wrong output. The exit
status is 1 when anything was lost.

Sub-campaigns (see their modules):

* bad inputs (:mod:`tests.fault_campaign.inputs`): broken, unusual and oversized images and malformed
  annotation files through every task's datasets and collate;
* checkpoints (:mod:`tests.fault_campaign.checkpoints`): pickles that run code on load, through the loaders and
  a few entry scripts, and truncated checkpoint files;
* kills (:mod:`tests.fault_campaign.kills`): SIGKILL a short pretraining run at random moments and resume it;
  the final model must be bitwise the uninterrupted one;
* properties (:mod:`tests.fault_campaign.properties`): Hypothesis properties of caption/question normalisation, the
  tokenizer and the config override parser.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.fault_campaign.common import LOST, CampaignReport, CaseResult, format_table, render_report

HELD = "held"


def run_property_campaign(examples: int, seed: int) -> CampaignReport:
    """Run every property with ``examples`` Hypothesis examples; a failing property is lost."""
    from tests.fault_campaign.properties import PROPERTIES, run_property

    report = CampaignReport("properties")
    start = time.monotonic()
    rows = []
    for index, prop in enumerate(PROPERTIES):
        result = run_property(prop, examples, seed)
        outcome = HELD if result.passed else LOST
        report.cases.append(CaseResult(index, prop.area, prop.name, outcome, result.failure or "",
                                       {"examples": result.examples, "description": prop.description}))
        rows.append([prop.name, prop.area, result.examples, outcome])
    report.tables.append((["property", "area", "examples", "result"], rows))
    report.summary["examples run"] = sum(case.extra["examples"] for case in report.cases)
    report.seconds = time.monotonic() - start
    return report


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills of a pretraining run (0: skip)")
    parser.add_argument("--bad_inputs", type=int, default=200, help="bad image/annotation cases (0: skip)")
    parser.add_argument("--checkpoints", type=int, default=20, help="planted malicious checkpoints (0: skip)")
    parser.add_argument("--properties", type=int, default=500, help="Hypothesis examples per property (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None,
                        help="folder for generated files (kept); default: a temporary folder, removed")
    parser.add_argument("--json", default=None, help="also write every case and outcome to this JSON file")
    parser.add_argument("--truncated_checkpoints", type=int, default=None,
                        help="truncated checkpoint files (default: as many as --checkpoints)")
    parser.add_argument("--script_runs", type=int, default=3,
                        help="planted checkpoints also passed to an entry script with --checkpoint")
    parser.add_argument("--kill_budget", type=float, default=600.0,
                        help="seconds after which no new kill trial starts")
    parser.add_argument("--kill_epochs", type=int, default=2, help="epochs of the killed pretraining run")
    parser.add_argument("--kill_images", type=int, default=32,
                        help="demo training images of the killed run (batch size 4)")
    parser.add_argument("--case_timeout", type=float, default=120.0,
                        help="seconds one bad-input case may take before it counts as a hang")
    return parser


def run_campaigns(args: argparse.Namespace, work_dir: Path,
                  log: Callable[[str], None] = print) -> list[CampaignReport]:
    """Run the selected sub-campaigns in order (cheapest first) and print each table as it finishes."""
    reports: list[CampaignReport] = []

    def finish(report: CampaignReport) -> None:
        reports.append(report)
        log(render_report(report))
        log("")

    if args.properties > 0:
        log(f"properties: {args.properties} examples each")
        finish(run_property_campaign(args.properties, args.seed))
    if args.bad_inputs > 0:
        from tests.fault_campaign.inputs import run_bad_inputs

        log(f"bad inputs: {args.bad_inputs} cases")
        finish(run_bad_inputs(args.bad_inputs, args.seed, work_dir / "bad_inputs", args.case_timeout, log))
    if args.checkpoints > 0:
        from tests.fault_campaign.checkpoints import run_checkpoints

        log(f"checkpoints: {args.checkpoints} planted files")
        finish(run_checkpoints(args.checkpoints, args.seed, work_dir, args.truncated_checkpoints,
                               args.script_runs, log))
    if args.kills > 0:
        from tests.fault_campaign.kills import KillSettings, run_kills

        log(f"kills: {args.kills} kills (budget {args.kill_budget:.0f} s)")
        settings = KillSettings(epochs=args.kill_epochs, images=args.kill_images)
        finish(run_kills(args.kills, args.seed, work_dir, args.kill_budget, settings, log))
    return reports


def summary_table(reports: Sequence[CampaignReport]) -> str:
    rows = [[r.name, r.tried, ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes().items()) if k != LOST),
             r.lost] for r in reports]
    rows.append(["total", sum(r.tried for r in reports), "", sum(r.lost for r in reports)])
    return format_table(["campaign", "tried", "outcomes", "lost"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    for name in ("kills", "bad_inputs", "checkpoints", "properties"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name} must be 0 or more, got {getattr(args, name)}")
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="fault_campaign_")) if temporary else Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        reports = run_campaigns(args, work_dir)
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(summary_table(reports))
    lost = sum(r.lost for r in reports)
    print(f"lost: {lost} ({'nothing lost' if lost == 0 else 'see the lost cases above'}); "
          f"{time.monotonic() - start:.0f} s")
    if args.json:
        document: dict[str, Any] = {
            "seed": args.seed,
            "sizes": {name: getattr(args, name) for name in ("kills", "bad_inputs", "checkpoints", "properties")},
            "lost": lost,
            "campaigns": [r.as_dict() for r in reports],
        }
        Path(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return 1 if lost else 0
