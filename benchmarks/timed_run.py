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
