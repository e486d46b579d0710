"""An edgekd subprocess whose wall time is added up over attempts, for the resumable benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def wall_seconds_file(run_folder: Path) -> Path:
    return run_folder / "wall_seconds.json"


def run_timed(cmd: list[str], run_folder: Path, label: str) -> None:
    """Run `cmd`; its wall time, added to that of earlier attempts (a resumed run), lands in the run folder."""
    print(f"[{time.strftime('%H:%M:%S')}] {label}", file=sys.stderr, flush=True)
    start = time.time()
    try:
        subprocess.run(cmd, check=True)
    finally:
        wall = wall_seconds_file(run_folder)
        if run_folder.is_dir():
            before = json.loads(wall.read_text())["seconds"] if wall.is_file() else 0.0
            wall.write_text(json.dumps({"seconds": before + time.time() - start}))


def summary_of(artifacts: Path, name: str) -> dict | None:
    """The run's summary.json, None when it has none yet."""
    path = artifacts / name / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def epoch_records(run_folder: Path) -> list[dict]:
    return [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]


def run_wall_seconds(run_folder: Path, records: list[dict]) -> float:
    """The run's wall time over attempts; a run continued by hand had attempts the wall file never saw, so
    never less than the seconds its own epochs took."""
    wall = wall_seconds_file(run_folder)
    timed = json.loads(wall.read_text())["seconds"] if wall.is_file() else 0.0
    return max(timed, sum(r["seconds"] for r in records))
