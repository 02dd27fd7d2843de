"""Pieces shared by the fault campaigns: the per-campaign report, table printing and demo-data set-up."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DEMO_VOCAB = str(REPO / "configs" / "demo_vocab.txt")
LOST = "lost"
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class CaseResult:
    """What happened to one generated case: its kind, where it was fed, the outcome and why."""

    index: int
    kind: str
    where: str
    outcome: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> bool:
        return self.outcome == LOST

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "where": self.where, "outcome": self.outcome,
                "detail": self.detail, **self.extra}


@dataclass
class CampaignReport:
    """The result of one sub-campaign: every case, plus free-form notes and summary numbers."""

    name: str
    cases: list[CaseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[list[str], list[list[Any]]]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tried(self) -> int:
        return len(self.cases)

    @property
    def lost(self) -> int:
        return sum(case.lost for case in self.cases)

    def outcomes(self) -> Counter[str]:
        return Counter(case.outcome for case in self.cases)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tried": self.tried, "lost": self.lost, "seconds": round(self.seconds, 1),
                "outcomes": dict(self.outcomes()), "summary": self.summary, "notes": self.notes,
                "cases": [case.as_dict() for case in self.cases]}


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width text table (first column left-aligned, the others right-aligned)."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in text_rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in text_rows)
    return "\n".join(out)


def render_report(report: CampaignReport, max_lost_shown: int = 25) -> str:
    """The printed block of one campaign: outcome counts, a table by kind, then each lost case."""
    outcomes = report.outcomes()
    order = sorted(outcomes, key=lambda name: (name == LOST, name))
    if LOST not in order:
        order.append(LOST)
    lines = [f"== {report.name}: tried {report.tried}, lost {report.lost} ({report.seconds:.1f} s) =="]
    lines.append(format_table(["outcome", "count"], [[name, outcomes.get(name, 0)] for name in order]))
    kinds = sorted({case.kind for case in report.cases})
    if len(kinds) > 1:
        lines.append("")
        rows = []
        for kind in kinds:
            counts = Counter(case.outcome for case in report.cases if case.kind == kind)
            rows.append([kind, sum(counts.values()), *[counts.get(name, 0) for name in order]])
        lines.append(format_table(["kind", "tried", *order], rows))
    for headers, rows in report.tables:
        lines.append("")
        lines.append(format_table(headers, rows))
    for key, value in report.summary.items():
        lines.append(f"{key}: {value}")
    for note in report.notes:
        lines.append(f"note: {note}")
    lost = [case for case in report.cases if case.lost]
    if lost:
        lines.append(f"lost cases ({len(lost)}):")
        for case in lost[:max_lost_shown]:
            lines.append(f"  #{case.index} {case.kind} via {case.where}: {short(case.detail, 400)}")
        if len(lost) > max_lost_shown:
            lines.append(f"  ... and {len(lost) - max_lost_shown} more (see --json)")
    return "\n".join(lines)


def script_env() -> dict[str, str]:
    """Environment for the entry scripts: no launcher variables, one thread, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def demo_data(folder: Path, num_train: int = 6, num_test: int = 6) -> dict[str, str]:
    """Generate (or reuse) a small demo dataset of 64-pixel images in ``folder``."""
    from demo.data import generate_demo_data

    return generate_demo_data(folder, num_train_images=num_train, num_test_images=num_test, image_size=64)


def short(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
