"""Nothing lost, nothing crashes: interruption and bad input across the whole pipeline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import make_image_folder, write_image, write_recipe
from edgekd.cli import cli
from edgekd.data import open_dataset
from edgekd.errors import CheckpointError, DataError, RecipeError
from edgekd.recipe import DataConfig, load_recipe
from edgekd.runs import MetricsLog, interrupts_deferred
from edgekd.train.trainer import run

CHECKPOINT_KEYS = {"train_loss", "val_loss", "val_acc", "lr", "precision", "epoch"}


def _slow_recipe(tmp_path, image_dataset, epochs=12):
    """Epochs long enough (~0.5 s) that a signal lands mid-epoch."""
    return write_recipe(tmp_path / "slow.yaml", image_dataset, model={"blocks": 6},
                        data={"image_size": 32}, train={"epochs": epochs, "batch_size": 4})


def _start(recipe: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "EDGEKD_ARTIFACTS": str(tmp_path / "artifacts"), "EDGEKD_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "edgekd", "-q", "train", str(recipe), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epochs(metrics: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the epoch in time")


def test_sigkill_mid_epoch_loses_no_finished_epoch(tmp_path, image_dataset):
    recipe = _slow_recipe(tmp_path, image_dataset, epochs=6)
    run_dir = tmp_path / "artifacts" / "slow"
    process = _start(recipe, tmp_path)
    _wait_for_epochs(run_dir / "metrics.jsonl", 2, process)
    time.sleep(0.2)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(MetricsLog(run_dir / "metrics.jsonl").read())
    assert done_before >= 2
    resumed = _start(recipe, tmp_path, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert not list(run_dir.glob(".*.tmp"))  # no half-written checkpoint left behind


def _finish(recipe: Path, tmp_path: Path, *extra: str) -> str:
    process = _start(recipe, tmp_path, *extra)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return err


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _same_run(a: Path, b: Path) -> None:
    """Same weights bit for bit and the same metrics but for timing."""
    for name in ("last.pt", "best.pt"):
        wa, wb = _weights(a / name), _weights(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    timing = {"seconds", "train_seconds", "images_per_s"}
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert strip(MetricsLog(a / "metrics.jsonl").read()) == strip(MetricsLog(b / "metrics.jsonl").read())


def _mid_epoch_saved(last: Path) -> bool:
    try:
        progress = torch.load(last, weights_only=True)["train_state"]["epoch_progress"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return False
    return bool(progress) and progress["next_batch"] > 0


def test_sigkill_after_a_mid_epoch_save_resumes_to_the_uninterrupted_weights(tmp_path, image_dataset):
    from edgekd.runs import read_summary

    recipe = _slow_recipe(tmp_path, image_dataset, epochs=3)
    saving = ("--set", "train.checkpoint_seconds=0.05")
    _finish(recipe, tmp_path / "whole", *saving)
    run_dir = tmp_path / "artifacts" / "slow"
    process = _start(recipe, tmp_path, *saving)
    deadline = time.time() + 120
    while not _mid_epoch_saved(run_dir / "last.pt"):
        assert process.poll() is None and time.time() < deadline, "no mid-epoch save seen"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # it died without a word
    assert read_summary(run_dir)["status"] == "interrupted"  # the next look settles it...
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"  # ...on disk
    err = _finish(recipe, tmp_path, "--resume", *saving)
    assert "resuming" in err and ", batch " in err
    _same_run(tmp_path / "whole" / "artifacts" / "slow", run_dir)


def test_sigkill_before_the_first_save_restarts_the_same_folder(tmp_path, image_dataset):
    recipe = _slow_recipe(tmp_path, image_dataset, epochs=2)
    _finish(recipe, tmp_path / "whole")
    run_dir = tmp_path / "artifacts" / "slow"
    process = _start(recipe, tmp_path)
    deadline = time.time() + 120
    while not (run_dir / "summary.json").is_file():  # the folder is claimed; the first epoch is under way
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "last.pt").exists()
    err = _finish(recipe, tmp_path, "--resume")
    assert "restarting it from the beginning in the same folder" in err
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["slow"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    _same_run(tmp_path / "whole" / "artifacts" / "slow", run_dir)


def test_a_dead_runs_summary_is_settled_as_interrupted_and_a_live_ones_is_not(tmp_path):
    from edgekd.runs import process_identity, read_summary

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cases = {"dead": {**process_identity(), "pid": int(dead.stdout)},
             "reused": {**process_identity(), "start_ticks": 1},  # this pid, but not the process that wrote it
             "live": process_identity(),
             "elsewhere": {**process_identity(), "host": "another-machine"}}  # cannot tell: left as it is
    for name, owner in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"status": "running", "process": owner}))
    statuses = {name: read_summary(tmp_path / name)["status"] for name in cases}
    assert statuses == {"dead": "interrupted", "reused": "interrupted", "live": "running", "elsewhere": "running"}


def test_ctrl_c_leaves_a_resumable_run_and_says_how(tmp_path, image_dataset):
    recipe = _slow_recipe(tmp_path, image_dataset)
    run_dir = tmp_path / "artifacts" / "slow"
    process = _start(recipe, tmp_path)
    _wait_for_epochs(run_dir / "metrics.jsonl", 1, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    epochs = [r["epoch"] for r in MetricsLog(run_dir / "metrics.jsonl").read()]
    assert epochs == list(range(1, len(epochs) + 1))


def test_interrupts_are_deferred_until_the_writes_finish():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished.append(True)
    assert finished == [True]


def test_every_kind_of_image_in_a_dataset_is_converted_or_skipped_and_counted(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=3)
    make_image_folder(root / "val", per_class=1, seed=4)
    rng = np.random.default_rng(0)
    folder = root / "train" / "forest"
    base = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    base.convert("L").save(folder / "gray.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (20, 20)).astype(np.uint16)).save(folder / "deep.png")
    base.resize((1, 1)).save(folder / "tiny.png")
    base.save(folder / "really_a_png.jpg", format="PNG")  # wrongly named: decoded by content
    Image.new("1", (10_000, 9_000)).save(folder / "bomb.png")
    (folder / "truncated.jpg").write_bytes((root / "train" / "sea" / "0.jpg").read_bytes()[:150])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not listed")
    dataset = open_dataset(DataConfig(root=str(root), image_size=16))
    assert dataset.summary()["skipped_images"]["train"] == 3
    skipped = sorted(Path(f).name for f in dataset.summary()["skipped_files"]["train"])
    assert skipped == ["bomb.png", "empty.jpg", "truncated.jpg"]
    assert len(dataset.splits["train"]) == 9 + 6


def test_dataset_layout_problems_are_refused_with_the_folder_named(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=2)
    (root / "train" / "glacier").mkdir()
    with pytest.raises(DataError, match="glacier holds no images"):
        open_dataset(DataConfig(root=str(root), image_size=16))
    (root / "train" / "glacier").rmdir()
    make_image_folder(root / "test", per_class=2, classes={"forest": (0, 200, 0), "volcano": (250, 0, 0)})
    with pytest.raises(DataError, match="volcano are not training classes"):
        open_dataset(DataConfig(root=str(root), image_size=16), splits=("test",))


def test_a_class_missing_from_the_test_split_is_fine(tmp_path, teacher_recipe, image_dataset):
    make_image_folder(image_dataset / "test", per_class=2, classes={"forest": (40, 180, 60)})
    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "artifacts")
    from edgekd.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(tmp_path / "artifacts" / "tiny_teacher", "test")
    assert result.images == 2 and result.per_class_accuracy[0] is None and result.per_class_accuracy[2] is None


@pytest.mark.parametrize("overrides, error, message", [
    (["train.lr=0"], RecipeError, "train.lr: 0.0 must be > 0"),
    (["train.batch_size=2.5"], RecipeError, "train.batch_size: expected an integer"),
    (["model.name=vgg"], RecipeError, "unknown model 'vgg'"),
    (["distill.alpha=-0.1"], RecipeError, "must be in [0, 1]"),
    (["distill.T=0"], RecipeError, "distill.temperature: 0.0 must be > 0"),
    (["teacher.checkpoint=/nonexistent/best.pt"], CheckpointError, "teacher.checkpoint /nonexistent/best.pt"),
    (["precision=fp4"], RecipeError, "'fp4' is not one of fp32, bf16, fp16, fp8"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path, student_recipe, overrides, error, message):
    with pytest.raises(error) as err:
        run(load_recipe(student_recipe, overrides), "distill", tmp_path / "artifacts")
    assert message in str(err.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()


def test_export_to_an_unwritable_folder_and_a_damaged_export_in_validate(tmp_path, distilled_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["export", str(distilled_run), "--out", str(blocker / "sub")])
    assert result.exit_code == 1 and "cannot write exports" in result.output and "Traceback" not in result.output
    run_dir = tmp_path / "run"
    (run_dir / "exports").mkdir(parents=True)
    (run_dir / "best.pt").write_bytes((distilled_run / "best.pt").read_bytes())
    (run_dir / "exports" / "run.fp32.onnx").write_bytes(b"\x08\x07garbage")
    result = CliRunner().invoke(cli, ["validate", str(run_dir), "--providers", "cpu"])
    assert result.exit_code == 1 and "onnxruntime cannot load it" in result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def tiny_model(distilled_run, tmp_path_factory):
    from edgekd.export import ExportPlan, export_checkpoint

    out = tmp_path_factory.mktemp("fuzz-model")
    return export_checkpoint(ExportPlan(distilled_run / "best.pt", ["fp32"], out))[0].path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=2048),
                         st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM"]).flatmap(
                             lambda magic: st.binary(max_size=512).map(lambda rest: magic + rest))))
def test_random_and_mutated_bytes_as_photos_never_crash_classify(tiny_model, tmp_path, payload):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(payload)
    result = CliRunner().invoke(cli, ["classify", "--model", str(tiny_model), "--json", str(photo)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    line = json.loads(result.stdout.splitlines()[0])
    assert ("error" in line) == (result.exit_code == 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metadata=st.dictionaries(st.sampled_from(["edgekd_format", "class_names", "image_size", "mean", "std",
                                                 "resize", "normalization", "input_name", "precision", "other"]),
                                st.one_of(st.text(max_size=20), st.just("edgekd.onnx/1"), st.just("[1, 2, 3]"),
                                          st.just('["a"]'), st.just("16"), st.just("bilinear"))))
def test_random_metadata_as_a_model_gives_a_clear_message(tiny_model, tmp_path, metadata):
    model = onnx.load(tiny_model)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    path = tmp_path / "random.onnx"
    onnx.save(model, path)
    photo = tmp_path / "photo.png"
    write_image(photo, (10, 200, 10), np.random.default_rng(0), fmt="PNG")
    result = CliRunner().invoke(cli, ["classify", "--model", str(path), str(photo)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code != 0:
        assert "Error:" in result.output or "error:" in result.output
