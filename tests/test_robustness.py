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

# How long a subprocess may take to reach a point it is waited for: a hang guard, not a speed test. Starting
# python and torch takes seconds alone but can take minutes with the suite's workers and a training sharing
# 2 cores, and 120 s has timed out there.
STARTUP_SECONDS = 300
CHECKPOINT_KEYS = {"train_loss", "val_loss", "val_acc", "lr", "precision", "epoch"}


def _slow_recipe(tmp_path, image_dataset, epochs=12):
    """Epochs long enough (~0.5 s) that a signal lands mid-epoch."""
    return write_recipe(tmp_path / "slow.yaml", image_dataset, model={"blocks": 6},
                        data={"image_size": 32}, train={"epochs": epochs, "batch_size": 4})


def _as_in_a_terminal() -> None:
    # A command typed in a terminal gets SIGINT's default action; the test suite itself may run where it is
    # ignored (started with `&` from a script, or nohup), and a child would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(recipe: Path, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "EDGEKD_ARTIFACTS": str(tmp_path / "artifacts"), "EDGEKD_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "edgekd", "-q", "train", str(recipe), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_in_a_terminal)


def _wait_for_epochs(metrics: Path, count: int, process: subprocess.Popen,
                     timeout: float = STARTUP_SECONDS) -> None:
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
    deadline = time.time() + STARTUP_SECONDS
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
    deadline = time.time() + STARTUP_SECONDS
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


@pytest.mark.slow
def test_sigterm_saves_where_it_stopped_and_the_resume_matches_an_uninterrupted_run(tmp_path, image_dataset):
    # `kill`, `docker stop`, `timeout` or a cluster preempting the job: the batch in hand is finished and saved
    recipe = _slow_recipe(tmp_path, image_dataset, epochs=3)
    _finish(recipe, tmp_path / "whole")
    run_dir = tmp_path / "artifacts" / "slow"
    process = _start(recipe, tmp_path)
    _wait_for_epochs(run_dir / "metrics.jsonl", 1, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "stopped; the training state at " in err and "--resume" in err and "Traceback" not in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    # the saved state is where the message says: inside an epoch, or at an epoch's end
    assert _mid_epoch_saved(run_dir / "last.pt") == (", batch " in err)
    _finish(recipe, tmp_path, "--resume")
    _same_run(tmp_path / "whole" / "artifacts" / "slow", run_dir)


def test_interrupts_are_deferred_until_the_writes_finish(sigint_as_in_a_terminal):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished.append(True)
    assert finished == [True]


def test_deferring_interrupts_keeps_an_ignored_sigint_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup or a script's `&`
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_deferred_interrupt_goes_to_the_handler_that_was_there():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert calls == []  # not during the block
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


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


# ----- the training side of issue 29: damaged caches and run folders, unwritable places, continue lines ----

def _decode_entry(tmp_path, split="train"):
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(f"{split}-")]
    return entry


@pytest.mark.parametrize("damage", ["truncated images.npy", "garbled index.json", "index.json of another shape",
                                    "index.json a list", "labels of another length"])
def test_a_damaged_decode_cache_is_decoded_again_with_one_warning(tmp_path, image_dataset, damage, caplog):
    config = DataConfig(root=str(image_dataset), image_size=16)
    good = np.array(open_dataset(config).splits["train"].images)
    entry = _decode_entry(tmp_path)
    if damage == "truncated images.npy":
        (entry / "images.npy").write_bytes((entry / "images.npy").read_bytes()[:-500])
    elif damage == "garbled index.json":
        (entry / "index.json").write_bytes(b"\x89{not json")
    elif damage == "index.json of another shape":
        (entry / "index.json").write_text(json.dumps({"ids": "abc", "skipped": [], "labeled": True, "image_size": 16}))
    elif damage == "index.json a list":
        (entry / "index.json").write_text("[1, 2, 3]")
    else:
        np.save(entry / "labels.npy", np.zeros(3, np.int64))
    with caplog.at_level("WARNING", logger="edgekd"):
        again = open_dataset(config)
    np.testing.assert_array_equal(np.array(again.splits["train"].images), good)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and "decoding it again" in damaged[0]
    assert not [p for p in (tmp_path / "cache").iterdir() if "damaged" in p.name]


def test_training_over_a_damaged_decode_cache_leaves_no_failed_run(tmp_path, teacher_recipe):
    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "artifacts")
    images = _decode_entry(tmp_path) / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    result = CliRunner().invoke(cli, ["train", str(teacher_recipe), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    statuses = {d.name: json.loads((d / "summary.json").read_text())["status"]
                for d in (tmp_path / "artifacts").iterdir()}
    assert statuses == {"tiny_teacher": "finished", "tiny_teacher-2": "finished"}


@pytest.mark.parametrize("content", ['[1, 2]', '"finished"', '{"status": 3, "mode": "train"}',
                                     '{"status": "running", "process": "pid 7"}',
                                     '{"status": "running", "process": {"pid": "x", "host": "%HOST%"}}',
                                     '{"status": "running", "process": {"pid": 99999999999999999999, "host": "%HOST%"}}',
                                     '{"updated": 5, "mode": "distill"}', '{"status": "finished", "best_val_acc": "x"}',
                                     '\x00\x01'])
def test_a_damaged_summary_of_the_right_json_but_wrong_shape_never_blocks_a_lookup(tmp_path, teacher_recipe,
                                                                                  content, caplog):
    import socket

    from edgekd.runs import latest_run, read_summary

    artifacts = tmp_path / "artifacts"
    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", artifacts)
    bad = artifacts / "zz_damaged"
    bad.mkdir()
    (bad / "best.pt").write_bytes(b"")
    (bad / "summary.json").write_text(content.replace("%HOST%", socket.gethostname()))
    with caplog.at_level("WARNING", logger="edgekd"):
        assert latest_run(artifacts) == artifacts / "tiny_teacher"
        summary = read_summary(bad)
    assert summary.get("status") in (None, "running")
    result = CliRunner().invoke(cli, ["evaluate", "--split", "val"])
    assert result.exit_code == 0 and "using the newest run" in result.output and "Traceback" not in result.output


def test_metrics_lines_that_are_json_but_not_records_end_the_log(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n[2]\n{"epoch": 3}\n')
    assert log.read() == [{"epoch": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": "2"}\n')
    assert log.truncate_to_epoch(5) == [{"epoch": 1}]


@pytest.mark.parametrize("command", ["train", "distill", "sweep"])
@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_an_unwritable_artifacts_folder_is_one_clear_error_before_any_work(tmp_path, teacher_recipe,
                                                                            student_recipe, command, where):
    (tmp_path / "a-file").write_text("")
    artifacts = str(tmp_path / "a-file" / "runs") if where == "under a file" else "/proc/edgekd-artifacts"
    target = {"train": teacher_recipe, "distill": student_recipe}.get(command)
    if command == "sweep":
        target = tmp_path / "s_sweep.yaml"
        target.write_text(f"teacher: {teacher_recipe}\nbaselines: none\n")
    if command == "distill":  # a teacher to distil from, so the refusal is about the folder
        run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "artifacts")
        student = write_recipe(tmp_path / "st.yaml", tmp_path / "colours",
                               teacher={"checkpoint": str(tmp_path / "artifacts" / "tiny_teacher")})
        target = student
    result = CliRunner().invoke(cli, [command, str(target), "--artifacts", artifacts])
    assert result.exit_code == 1, result.output
    assert f"Error: cannot write runs under {artifacts}" in result.output and "--artifacts DIR" in result.output
    assert isinstance(result.exception, SystemExit)
    cache_entries = list((tmp_path / "cache").glob("*px-*")) if (tmp_path / "cache").exists() else []
    assert command == "distill" or not cache_entries  # refused before decoding


def test_the_continue_command_resumes_that_very_run(tmp_path, teacher_recipe, monkeypatch):
    import shlex

    import edgekd.cli as cli_module
    from edgekd.train.trainer import Callbacks

    class CtrlC(Callbacks):
        def on_epoch_end(self, record):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_progress_callbacks", lambda quiet: CtrlC())
    other = tmp_path / "elsewhere runs"
    args = ["train", str(teacher_recipe), "--set", "name=my run'x", "--set", "name=renamed",
            "--set", "train.lr=0.02", "--artifacts", str(other), "--precision", "fp32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130
    line = result.output.split("Continue with: ")[1].strip()
    words = shlex.split(line)
    assert words == ["edgekd", *args, "--resume"]
    monkeypatch.undo()
    again = CliRunner().invoke(cli, words[1:])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in other.iterdir()) == ["renamed"] and not (tmp_path / "artifacts").exists()
    summary = json.loads((other / "renamed" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert "resuming" in again.output


def test_a_resume_with_no_best_checkpoint_does_not_claim_one(tmp_path, teacher_recipe):
    run(load_recipe(teacher_recipe), "train", tmp_path / "artifacts")
    (tmp_path / "artifacts" / "tiny_teacher" / "best.pt").unlink()
    result = CliRunner().invoke(cli, ["train", str(teacher_recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert "saved     " not in result.output and "no best.pt in" in result.output


def test_a_cache_that_cannot_be_written_or_would_not_fit_is_refused_before_decoding(tmp_path, image_dataset,
                                                                                   monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError, match="cannot write the decode cache under .*a-file"):
        open_dataset(DataConfig(root=str(image_dataset), image_size=16, cache_dir=str(tmp_path / "a-file" / "c")))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6 - 1000, 1000))
    with pytest.raises(DataError, match=r"needs 0\.0 GB; .* has 0\.0 GB free") as err:
        open_dataset(DataConfig(root=str(image_dataset), image_size=16))
    assert "data.cache_dir" in err.value.hint
    assert not list((tmp_path / "cache").glob("*px-*"))


def test_a_fifo_in_the_decode_cache_is_never_opened(tmp_path, image_dataset):
    config = DataConfig(root=str(image_dataset), image_size=16)
    open_dataset(config)
    images = _decode_entry(tmp_path) / "images.npy"
    images.unlink()
    os.mkfifo(images)
    assert len(open_dataset(config).splits["train"].images) == 48  # decoded again; no hang on the pipe


def test_a_run_whose_last_checkpoint_is_gone_is_never_started_over(tmp_path, teacher_recipe):
    run(load_recipe(teacher_recipe), "train", tmp_path / "artifacts")
    run_dir = tmp_path / "artifacts" / "tiny_teacher"
    (run_dir / "last.pt").unlink()
    best = (run_dir / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match="has finished epochs but no last.pt"):
        run(load_recipe(teacher_recipe), "train", tmp_path / "artifacts", resume=True)
    assert (run_dir / "best.pt").read_bytes() == best and len(MetricsLog(run_dir / "metrics.jsonl").read()) == 2


@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("change, message", [
    (["--set", "data.root=[unclosed"], "not valid YAML"),
    (["--set", "train.seed=" + str(2 ** 64 + 1)], "train.seed: 18446744073709551617 must be in [0, 4294967295]"),
    (["--set", "train.lr=1e30"], "train.lr: 1e+30 is more than the largest sane value"),
    (["--set", "train.lr=.inf"], "train.lr: inf is not a finite number"),
    (["--set", "data.image_size=100000"], "data.image_size: 100000 is more than the largest sane value"),
    ("binary", "not a text file"),
    ("duplicate", "duplicate key 'train' (first on line"),
])
def test_the_issues_bad_recipes_exit_2_with_one_message_and_no_work(tmp_path, student_recipe, command, change,
                                                                   message):
    recipe, args = student_recipe, list(change) if isinstance(change, list) else []
    if change == "binary":
        recipe = tmp_path / "binary.yaml"
        recipe.write_bytes(bytes(range(256)))
    elif change == "duplicate":
        recipe = tmp_path / "dup.yaml"
        recipe.write_text(student_recipe.read_text() + "train:\n  epochs: 3\n  epochs: 4\n")
    result = CliRunner().invoke(cli, [command, str(recipe), *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: ") and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "artifacts").exists()


def test_a_run_still_being_trained_is_known_as_such(tmp_path):
    from edgekd.runs import process_identity, still_running

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    assert still_running(run_dir) is None  # no summary at all
    (run_dir / "summary.json").write_text(json.dumps({"status": "running", "process": process_identity()}))
    assert still_running(run_dir)["pid"] == os.getpid()
    dead = {**process_identity(), "start_ticks": -1}  # this pid, but another process's start time
    (run_dir / "summary.json").write_text(json.dumps({"status": "running", "process": dead}))
    assert still_running(run_dir) is None
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_evaluate_in_a_read_only_run_folder_still_answers(tmp_path, teacher_recipe, monkeypatch):
    import edgekd.runs

    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "artifacts")

    def read_only(path, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(edgekd.runs, "atomic_write_json", read_only)
    result = CliRunner().invoke(cli, ["evaluate", "--split", "val"])
    assert result.exit_code == 0 and "val accuracy" in result.output
    assert "warning: could not write" in result.output and "written" not in result.output


def _check_writable_many(args) -> int:
    from edgekd.runs import check_writable

    root, times = args
    failures = 0
    for _ in range(times):
        try:
            check_writable(root, keep=False)
        except Exception:  # noqa: BLE001 - counted: the assertion says how many
            failures += 1
    return failures


def test_runs_checking_one_missing_artifacts_folder_side_by_side_never_fail(tmp_path):
    """`doctor --smoke` starts rows side by side on one artifacts folder: one run's check removes the folders
    it made while another's is between making the folder and writing its probe."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(3) as pool:
        failures = pool.map(_check_writable_many, [(tmp_path / "a" / "b", 1500)] * 3)
    assert failures == [0, 0, 0]
