"""Two processes with gloo on 127.0.0.1 (CPU), through torchrun and through `edgekd train --nproc 2`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from edgekd.recipe import load_recipe
from edgekd.runs import MetricsLog
from edgekd.train.trainer import run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _env(tmp_path):
    return {**os.environ, "EDGEKD_ARTIFACTS": str(tmp_path / "ddp"), "EDGEKD_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1"}


def _torchrun(tmp_path, *args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "edgekd", "-q", *args]
    done = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_train_one_model_and_write_one_run(tmp_path, teacher_recipe):
    done = _torchrun(tmp_path, "train", str(teacher_recipe), "--set", "train.epochs=5", "--set", "train.lr=0.003")
    runs = list((tmp_path / "ddp").iterdir())
    assert [r.name for r in runs] == ["tiny_teacher"]
    run_dir = runs[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "recipe.yaml",
                                                         "summary.json"]
    assert [r["epoch"] for r in MetricsLog(run_dir / "metrics.jsonl").read()] == [1, 2, 3, 4, 5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo", "processes_per_node": 2,
                                      "ranks_identical": True}
    assert done.stdout.count("saved ") == 1  # rank 0 alone speaks

    # The same global batch in one process ends at the same validation accuracy, within one image
    # (on CPU there is no SyncBatchNorm, so each process normalises its half of the batch).
    single = run(load_recipe(teacher_recipe, ["train.epochs=5", "train.lr=0.003"]), "train", tmp_path / "single")
    final_single = MetricsLog(tmp_path / "single" / single["run"] / "metrics.jsonl").read()[-1]["val_acc"]
    final_ddp = MetricsLog(run_dir / "metrics.jsonl").read()[-1]["val_acc"]
    assert abs(final_single - final_ddp) <= 1 / 18 + 1e-9


def test_a_distributed_run_resumes_in_one_process(tmp_path, teacher_recipe):
    _torchrun(tmp_path, "train", str(teacher_recipe), "--set", "train.epochs=2")
    resumed = run(load_recipe(teacher_recipe, ["train.epochs=3"]), "train", tmp_path / "ddp", resume=True)
    assert resumed["epochs_done"] == 3
    records = MetricsLog(tmp_path / "ddp" / "tiny_teacher" / "metrics.jsonl").read()
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_nproc_starts_torchrun_and_distills(tmp_path, teacher_recipe, student_recipe):
    run(load_recipe(teacher_recipe), "train", tmp_path / "ddp")
    command = [sys.executable, "-m", "edgekd", "distill", str(student_recipe), "--nproc", "2",
               "--set", "train.epochs=2"]
    done = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 processes" in done.stderr and "processes 2 (gloo" in done.stdout
    summary = json.loads((tmp_path / "ddp" / "tiny_student" / "summary.json").read_text())
    assert summary["distributed"]["ranks_identical"] and summary["mode"] == "distill"


def test_an_uneven_global_batch_is_refused(tmp_path, teacher_recipe):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "edgekd", "train", str(teacher_recipe), "--set", "train.batch_size=7"]
    done = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "does not split evenly over 2 processes" in done.stderr


@pytest.mark.slow
def test_mid_epoch_saves_under_ddp_are_collective_and_change_nothing(tmp_path, teacher_recipe):
    """Every rank joins each mid-epoch save (no deadlock), the saved sums cover both ranks, and saving
    after every batch leaves the run's metrics exactly as without."""
    args = ["train", str(teacher_recipe), "--set", "train.epochs=2"]
    _torchrun(tmp_path / "plain", *args, "--set", "train.checkpoint_seconds=null")
    _torchrun(tmp_path / "saving", *args, "--set", "train.checkpoint_seconds=1e-6")
    timing = {"seconds", "train_seconds", "images_per_s"}
    records = {name: [{k: v for k, v in r.items() if k not in timing}
                      for r in MetricsLog(tmp_path / name / "ddp" / "tiny_teacher" / "metrics.jsonl").read()]
               for name in ("plain", "saving")}
    assert records["saving"] == records["plain"]
    summary = json.loads((tmp_path / "saving" / "ddp" / "tiny_teacher" / "summary.json").read_text())
    assert summary["checkpointing"]["mid_epoch_saves"] >= 6  # 4 batches an epoch: a save after each
