"""README.md's demo figures are what ``python -m demo.task_demos`` prints: the pretraining loss lines
and the cheapest row of the task-demo table (the demo pretraining, then SNLI-VE; about 70 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.task_demos import main, parse_table, platform_line

README = Path(__file__).resolve().parents[1] / "README.md"
CHEAPEST_ROW = "ve"


def test_readme_demo_figures_are_reproduced(tmp_path: Path) -> None:
    readme = README.read_text(encoding="utf-8")
    if platform_line() not in " ".join(readme.split()):
        pytest.skip(f"README.md's figures were made on another platform than this one ({platform_line()})")
    result = main(["--rows", CHEAPEST_ROW, "--out_dir", str(tmp_path)])
    task, *cells = result["rows"][CHEAPEST_ROW]
    readme_rows = parse_table(readme)
    assert task in readme_rows, f"README.md's task-demo table has no row {task!r}"
    assert readme_rows[task] == cells, (
        f"README.md's row {task!r} reads {readme_rows[task]}, the demo chain now gives {cells}; regenerate the "
        f"table with python -m demo.task_demos")
    for line in result["losses"]:
        assert line in readme, f"README.md lacks the pretraining loss line {line!r}"
