"""`edgekd doctor --smoke`: a tiny run of every path this machine offers, each row ok, failed or skipped.

Rows: training steps per precision on each device, a teacher-view fill on each teacher forward pass, an
export per precision, one classification per export on each runtime and provider, torchrun with 2 gloo
processes, and NCCL on CUDA. Each row runs in its own process with a timeout (doctor/row.py), so a
crash, a hang or a failure is that row's result and the others still run; a row whose input failed
is skipped, naming it. The data is generated (3 colour classes, 16 px): nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgekd.doctor.machine import NOT_HERE, TRAIN_EXTRA, torch_or_none
from edgekd.doctor.row import RESULT_MARK

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
# Which function runs each kind of row (module:function, imported in the row's own process).
TARGETS = {"train": "edgekd.doctor.paths:train", "teacher fill": "edgekd.doctor.paths:teacher_fill",
           "export": "edgekd.doctor.paths:export", "classify": "edgekd.doctor.paths:classify",
           "torchrun": "edgekd.doctor.paths:torchrun"}
CLASS_COLOURS = {"red": (200, 60, 60), "green": (40, 180, 60), "blue": (50, 80, 210)}


@dataclass
class Row:
    name: str
    kind: str  # a key of TARGETS
    kwargs: dict = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)  # rows whose output this one uses
    timeout: float = 90.0
    status: str = "pending"  # pending | running | ok | failed | skipped
    detail: str = ""  # ok: what ran; failed: the error; skipped: why
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 2)}


@dataclass
class Offer:
    """What this machine offers the smoke rows."""

    torch: bool
    cuda_devices: int = 0
    cuda_bf16: bool = False
    ort_providers: list[str] = field(default_factory=lambda: ["cpu"])
    openvino: bool = False
    forwards: dict[str, list[str]] = field(default_factory=dict)  # device → teacher forward passes


def machine_offer() -> Offer:
    from edgekd.runtime.session import available_providers

    torch = torch_or_none()
    offer = Offer(torch=torch is not None, ort_providers=available_providers(),
                  openvino=importlib.util.find_spec("openvino") is not None)
    if torch is None:
        return offer

    from edgekd.train.teacher_forward import candidates

    if torch.cuda.is_available():
        offer.cuda_devices = torch.cuda.device_count()
        offer.cuda_bf16 = torch.cuda.is_bf16_supported()
    for device in ("cpu", "cuda"):  # candidates() only names them: nothing is built, CUDA is not touched
        offer.forwards[device] = list(candidates(None, {}, torch.device(device), Path("."), "auto"))
    return offer


def plan(offer: Offer, work: Path) -> list[Row]:
    """Every row, with the reason where this machine cannot run it."""
    data, artifacts, cache = work / "data", str(work / "artifacts"), str(work / "cache")
    recipe, views_recipe = str(work / "smoke.yaml"), str(work / "smoke_views.yaml")
    teacher = str(work / "artifacts" / "smoke_cpu_fp32" / "best.pt")
    rows: list[Row] = []
    for device in ("cpu", "cuda"):
        for precision in PRECISIONS:
            rows.append(Row(f"train {precision} on {device}", "train", {"recipe": recipe, "precision": precision,
                            "device": device, "artifacts": artifacts}, timeout=90 if device == "cpu" else 180))
    for device in ("cpu", "cuda"):
        for forward in offer.forwards.get(device) or [f"teacher forward on {device}"]:
            rows.append(Row(f"teacher fill: {forward}", "teacher fill", {"checkpoint": teacher, "recipe": views_recipe,
                            "forward": forward, "device": device, "cache": cache}, ["train fp32 on cpu"], 120))
    for precision in PRECISIONS[:1] + PRECISIONS[2:] + ("int8",):
        rows.append(Row(f"export {precision}", "export", {"checkpoint": teacher, "precision": precision,
                        "out": str(work / "exports" / precision)}, ["train fp32 on cpu"], 120))
    for provider in ("cpu", "cuda", "tensorrt", "openvino"):
        runtime = "OpenVINO CPU" if provider == "openvino" else f"onnxruntime {provider}"
        for precision in ("fp32", "fp16", "int8", "fp8"):
            rows.append(Row(f"classify {precision} on {runtime}", "classify", {
                "folder": str(work / "exports" / precision), "precision": precision, "provider": provider,
                "photos": str(data / "val")}, [f"export {precision}"], 60))
    rows.append(Row("torchrun: 2 gloo processes (CPU)", "torchrun", {"recipe": recipe, "device": "cpu", "nproc": 2,
                    "artifacts": artifacts}, timeout=120))
    nccl = min(2, offer.cuda_devices) or 1
    rows.append(Row(f"torchrun: NCCL, {nccl} process(es) (CUDA)", "torchrun", {"recipe": recipe, "device": "cuda",
                    "nproc": nccl, "artifacts": artifacts}, timeout=180))
    for row in rows:
        row.detail = _unavailable(row, offer)
        row.status = "skipped" if row.detail else "pending"
    return rows


def _unavailable(row: Row, offer: Offer) -> str:
    """Why this machine cannot run `row` ("" when it can)."""
    kwargs = row.kwargs
    if row.kind == "classify":
        provider = kwargs["provider"]
        if provider == "openvino" and not offer.openvino:
            return "openvino is not installed (pip install openvino)"
        if provider not in ("openvino", *offer.ort_providers):
            return f"onnxruntime's {provider} provider: {NOT_HERE}"
    if not offer.torch and row.kind != "classify":
        return f"torch is not installed ({TRAIN_EXTRA})"
    if kwargs.get("device") == "cuda" and not offer.cuda_devices:
        return f"CUDA: {NOT_HERE}"
    if row.kind == "train" and kwargs["device"] == "cuda" and kwargs["precision"] == "bf16" and not offer.cuda_bf16:
        return "this GPU has no bfloat16"
    return ""


def write_data(work: Path) -> None:
    """Three colour classes of noisy 20x18 JPEGs (a 1-epoch model separates them) and the two recipes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for name, colour in CLASS_COLOURS.items():
            folder = work / "data" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (18, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", "JPEG")
    recipe = {"name": "smoke", "data": {"kind": "folder", "root": str(work / "data"), "image_size": 16,
                                        "cache_dir": str(work / "cache")},
              "model": {"name": "paper_cnn", "blocks": 2},
              "train": {"batch_size": 12, "epochs": 1, "patience": None, "seed": 0, "lr": 0.01,
                        "checkpoint_seconds": None}, "export": {"calibration_images": 12}}
    (work / "smoke.yaml").write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    views = {**recipe, "name": "smoke_views", "augment": {"crop": "resized", "flip": True}}
    (work / "smoke_views.yaml").write_text(json.dumps(views, indent=1))


def select(rows: list[Row], only: list[str] | None) -> list[Row]:
    """The rows whose names contain one of `only` (case-insensitive), and the rows they need."""
    if not only:
        return rows
    by_name = {row.name: row for row in rows}
    wanted = {row.name for row in rows if any(word.lower() in row.name.lower() for word in only)}
    todo = list(wanted)
    while todo:
        for need in by_name[todo.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                todo.append(need)
    return [row for row in rows if row.name in wanted]


def run_row(row: Row, work: Path) -> None:
    """`row` in its own process group with its timeout; its output goes to logs/<row>.log."""
    log_file = work / "logs" / (re.sub(r"[^a-z0-9]+", "_", row.name.lower()).strip("_") + ".log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EDGEKD_CACHE": str(work / "cache"), "EDGEKD_ARTIFACTS": str(work / "artifacts"),
           "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "edgekd.doctor.row", TARGETS[row.kind], json.dumps(row.kwargs)]
    started = time.perf_counter()
    with open(log_file, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env,
                                 start_new_session=True)  # its own group: a timeout ends torchrun's workers too
        try:
            code = child.wait(timeout=row.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = None
    row.seconds = time.perf_counter() - started
    lines = log_file.read_text(errors="replace").splitlines()
    results = [json.loads(line[len(RESULT_MARK):]) for line in lines if line.startswith(RESULT_MARK)]
    if code is None:
        row.status, row.detail = "failed", f"timed out after {row.timeout:.0f} s (log: {log_file})"
    elif results and "detail" in results[-1] and code == 0:
        row.status, row.detail = "ok", results[-1]["detail"]
    elif results and "error" in results[-1]:
        row.status, row.detail = "failed", results[-1]["error"]
    else:
        tail = " | ".join(line.strip() for line in lines[-3:] if line.strip())
        row.status, row.detail = "failed", f"process exited with status {code}: {tail[-300:] or 'no output'}"


def smoke(work: Path | None = None, only: list[str] | None = None,
          on_row: Callable[[Row], None] | None = None, parallel: int | None = None) -> list[Row]:
    """Run the smoke rows (all, or those `only` names) in `work` (default: a temporary folder, removed);
    `on_row` sees each row as it finishes. Writes smoke.json and smoke.md into `work`.

    `parallel` rows run at a time (default: one per usable core, at most 4): most of a row is starting
    Python and importing torch, one core's work, and the rows share nothing a neighbour could break (their
    own run names and export folders; the decoded-image cache is built atomically)."""
    temporary = work is None
    work = Path(tempfile.mkdtemp(prefix="edgekd-smoke-")) if temporary else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        write_data(work)
        rows = select(plan(machine_offer(), work), only)
        _run_all(rows, work, on_row or (lambda row: None), parallel or min(4, _usable_cores()))
        return rows
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_all(rows: list[Row], work: Path, on_row: Callable[[Row], None], parallel: int) -> None:
    """Each pending row once the rows it needs are ok (skipped, naming them, when one is not)."""
    by_name = {row.name: row for row in rows}

    def finished(row: Row) -> None:
        on_row(row)
        _write_tables(work, rows)  # after every row: a smoke killed from outside still leaves its table

    for row in rows:
        if row.status == "skipped":
            finished(row)
    with ThreadPoolExecutor(parallel) as pool:
        running: dict = {}
        while True:
            for row in rows:
                if row.status != "pending":
                    continue
                needs = [by_name[name] for name in row.needs]
                if any(need.status in ("failed", "skipped") for need in needs):
                    row.status = "skipped"
                    row.detail = f"needs {', '.join(n.name for n in needs if n.status != 'ok')}, which did not run ok"
                    finished(row)
                elif all(need.status == "ok" for need in needs) and len(running) < parallel:
                    row.status = "running"
                    running[pool.submit(run_row, row, work)] = row
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()
                finished(running.pop(future))
    _write_tables(work, rows)


def _write_tables(work: Path, rows: list[Row]) -> None:
    (work / "smoke.json").write_text(json.dumps([row.to_dict() for row in rows], indent=1))
    (work / "smoke.md").write_text(markdown(rows))


def markdown(rows: list[Row]) -> str:
    lines = ["| path | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {row.name} | {row.status} | {row.seconds:.1f} | {row.detail.replace('|', '/')} |" for row in rows]
    counts = {status: sum(row.status == status for row in rows) for status in ("ok", "failed", "skipped")}
    return "\n".join(lines) + f"\n\n{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped\n"
