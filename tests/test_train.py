import json
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import RECIPES, write_recipe
from edgekd.errors import CheckpointError
from edgekd.recipe import load_recipe
from edgekd.runs import MetricsLog
from edgekd.train.checkpoint import load_model
from edgekd.train.losses import kd_loss
from edgekd.train.trainer import Callbacks, EarlyStopping, run

TIMING_KEYS = {"seconds", "train_seconds", "images_per_s"}


def test_kd_loss_matches_a_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
    labels = [1, 2]
    T, alpha = 2.0, 0.25

    def softmax(row):
        exps = [math.exp(v / T) for v in row]
        return [e / sum(exps) for e in exps]

    kl = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = softmax(s_row), softmax(t_row)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    kl /= len(student)  # batchmean
    ce = 0.0
    for row, y in zip(student, labels):
        ce -= math.log(math.exp(row[y]) / sum(math.exp(v) for v in row))
    ce /= len(student)
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_extremes_are_pure_kl_and_pure_ce():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    pure_kl = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    assert kd_loss(s, t, y, 1.0, 1.0).item() == pytest.approx(pure_kl.item(), rel=1e-6)
    assert kd_loss(s, t, y, 3.0, 0.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert kd_loss(t, t, y, 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(1, 0.5) and not stopper.should_stop
    assert not stopper.update(2, 0.5)
    assert stopper.update(3, 0.6)
    assert not stopper.update(4, 0.4) and not stopper.should_stop
    assert not stopper.update(5, 0.55) and stopper.should_stop
    assert (stopper.best_epoch, stopper.best_acc) == (3, 0.6)


def test_train_writes_a_self_describing_run(tmp_path, teacher_recipe):
    summary = run(load_recipe(teacher_recipe), "train", tmp_path / "artifacts")
    run_dir = tmp_path / "artifacts" / "tiny_teacher"
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert summary["precision"]["mode"] == "fp32" and summary["precision"]["native"] and summary["device"] == "cpu"
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "seconds", "images_per_s", "precision"} <= set(records[0])
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "best.pt").is_file()
    # The checkpoint rebuilds its model with no recipe file around.
    teacher_recipe.unlink()
    (run_dir / "recipe.yaml").unlink()
    model, meta = load_model(run_dir / "best.pt")
    assert meta["class_names"] == ["buildings", "forest", "sea"] and meta["image_size"] == 16
    assert meta["recipe"]["model"]["blocks"] == 3 and meta["precision"]["mode"] == "fp32"
    assert model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 3)


def test_a_second_run_of_a_recipe_never_overwrites_the_first(tmp_path, teacher_recipe):
    recipe = load_recipe(teacher_recipe, ["train.epochs=1"])
    run(recipe, "train", tmp_path / "a")
    second = run(recipe, "train", tmp_path / "a")
    assert second["run"] == "tiny_teacher-2"


def test_distill_learns_from_the_latest_teacher_run(tmp_path, teacher_recipe, student_recipe):
    teacher = run(load_recipe(teacher_recipe, ["train.epochs=3"]), "train", tmp_path / "artifacts")
    summary = run(load_recipe(student_recipe, ["train.epochs=3"]), "distill", tmp_path / "artifacts")
    assert summary["mode"] == "distill" and summary["teacher"]["checkpoint"].endswith("tiny_teacher/best.pt")
    assert len(summary["teacher"]["sha256"]) == 64
    assert teacher["best_val_acc"] > 0.6  # colour classes are easy: learning happened
    assert summary["best_val_acc"] > 0.6
    model, meta = load_model(tmp_path / "artifacts" / "tiny_student" / "best.pt")
    assert meta["role"] == "student" and meta["teacher"]["sha256"] == summary["teacher"]["sha256"]


def test_distill_without_a_trained_teacher_fails_before_any_work(tmp_path, student_recipe):
    with pytest.raises(CheckpointError, match="edgekd train"):
        run(load_recipe(student_recipe), "distill", tmp_path / "artifacts")
    assert not (tmp_path / "cache").exists()  # no image was decoded
    assert not (tmp_path / "artifacts").exists()


def test_teacher_with_other_classes_is_refused(tmp_path, image_dataset, teacher_recipe):
    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other" / "train", per_class=4,
                              classes={"cat": (1, 2, 3), "dog": (200, 100, 0)}).parent
    run(load_recipe(teacher_recipe, ["train.epochs=1", f"data.root={other}"]), "train", tmp_path / "artifacts")
    student = write_recipe(tmp_path / "s.yaml", image_dataset, teacher={"recipe": str(teacher_recipe)})
    with pytest.raises(CheckpointError, match="trained on classes"):
        run(load_recipe(student), "distill", tmp_path / "artifacts")


class StopAfter(Callbacks):
    """Simulates Ctrl-C right after an epoch's checkpoint was written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# Every option that carries state across batches or epochs: augmentation RNG, per-batch lr schedule,
# weight average, distillation ramp.
PLUS = ["augment.crop=resized", "augment.flip=true", "augment.color_jitter=0.2", "train.scheduler=cosine",
        "train.warmup_epochs=1", "train.ema_decay=0.9", "train.grad_clip=1.0", "train.label_smoothing=0.1",
        "train.optimizer=adamw", "train.weight_decay=0.05"]


@pytest.mark.parametrize("mode, plus", [("train", False), ("distill", False), ("train", True), ("distill", True)],
                         ids=["train", "distill", "train-plus", "distill-plus"])
def test_an_interrupted_run_resumed_ends_like_an_uninterrupted_one(tmp_path, teacher_recipe, student_recipe,
                                                                   mode, plus):
    recipe_path = teacher_recipe if mode == "train" else student_recipe
    overrides = ["train.epochs=4", "train.scheduler=step", "train.step_size=1", "train.gamma=0.5"]
    if plus:
        overrides = ["train.epochs=4", *PLUS]
        # distill: the live teacher on one forward for both runs (`auto` measures and may pick another under
        # load, e.g. bf16 in one run and fp32 in the other; onnxruntime is one path, fp32)
        overrides += ["distill.method=dkd", "distill.warmup_epochs=1",
                      "distill.teacher_forward=onnxruntime"] if mode == "distill" else []
    if mode == "distill":
        run(load_recipe(teacher_recipe), "train", tmp_path / "whole")
        run(load_recipe(teacher_recipe), "train", tmp_path / "cut")
    whole = run(load_recipe(recipe_path, overrides), mode, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(recipe_path, overrides), mode, tmp_path / "cut", callbacks=StopAfter(2))
    cut_dir = tmp_path / "cut" / whole["run"]
    assert json.loads((cut_dir / "summary.json").read_text())["status"] == "interrupted"
    # A crash can also tear the metrics file mid-line; resume must drop that line.
    with open(cut_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    resumed = run(load_recipe(recipe_path, overrides), mode, tmp_path / "cut", resume=True)
    assert resumed["epochs_done"] == whole["epochs_done"] == 4
    whole_records = MetricsLog(tmp_path / "whole" / whole["run"] / "metrics.jsonl").read()
    cut_records = MetricsLog(cut_dir / "metrics.jsonl").read()
    assert [r["epoch"] for r in cut_records] == [1, 2, 3, 4]
    assert _strip_timing(cut_records) == _strip_timing(whole_records)
    a = torch.load(tmp_path / "whole" / whole["run"] / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(cut_dir / "last.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _same_run_bit_for_bit(whole_dir, cut_dir):
    """The same metrics but for timing, and the same weights bit for bit, in both checkpoints."""
    assert _strip_timing(MetricsLog(cut_dir / "metrics.jsonl").read()) == \
        _strip_timing(MetricsLog(whole_dir / "metrics.jsonl").read())
    for name in ("last.pt", "best.pt"):
        a = torch.load(whole_dir / name, weights_only=True)["state_dict"]
        b = torch.load(cut_dir / name, weights_only=True)["state_dict"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


class StopAtBatch(Callbacks):
    """Simulates a crash in the middle of an epoch, after some mid-epoch saves."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch, self.current, self.seen = epoch, batch, 0, 0

    def on_epoch_start(self, epoch, epochs, batches):
        self.current, self.seen = epoch, 0

    def on_batch(self, images, loss):
        self.seen += 1
        if (self.current, self.seen) == (self.epoch, self.batch):
            raise KeyboardInterrupt


@pytest.mark.parametrize("mode, extra", [
    ("train", PLUS),
    ("distill", [*PLUS, "distill.method=dkd", "distill.warmup_epochs=1", "distill.teacher_forward=onnxruntime"]),
    # One teacher forward for both runs: each fills its own views, and `auto` picks the fastest forward by
    # measuring it, so under load one run could fill in bf16 and the other in fp32 (onnxruntime: one path, fp32).
    ("distill", ["augment.crop=resized", "augment.flip=true", "augment.color_jitter=0.2", "augment.render_size=24",
                 "distill.teacher_views=2", "distill.teacher_forward=onnxruntime", "train.scheduler=cosine",
                 "train.ema_decay=0.9"]),
    # Function matching: mixed views (mixup and cutmix, one or the other per batch) and a live teacher, a
    # label term (alpha 0.5) on the mixed labels; partners and λ come from (seed, epoch, batch).
    ("distill", ["augment.crop=resized", "augment.flip=true", "augment.render_size=24",
                 "augment.mixup_probability=0.5", "augment.cutmix_probability=0.5",
                 "distill.teacher_forward=onnxruntime", "distill.temperature=1"]),
    ("train", ["augment.mixup_probability=1.0", "train.scheduler=cosine"]),
], ids=["train-plus", "distill-plus", "distill-teacher-views", "distill-mixing-live", "train-mixup"])
def test_a_run_stopped_mid_epoch_resumes_from_that_batch_bit_for_bit(tmp_path, teacher_recipe, student_recipe,
                                                                    mode, extra):
    recipe_path = teacher_recipe if mode == "train" else student_recipe
    overrides = ["train.epochs=3", "train.checkpoint_seconds=1e-6", *extra]  # a save after every batch
    if mode == "distill":
        run(load_recipe(teacher_recipe), "train", tmp_path / "whole")
        run(load_recipe(teacher_recipe), "train", tmp_path / "cut")
    whole = run(load_recipe(recipe_path, overrides), mode, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # batch 3 of epoch 2 raises: last.pt holds epoch 2, batch 2
        run(load_recipe(recipe_path, overrides), mode, tmp_path / "cut", callbacks=StopAtBatch(2, 3))
    cut_dir = tmp_path / "cut" / whole["run"]
    state = torch.load(cut_dir / "last.pt", weights_only=True)["train_state"]
    assert state["epoch_progress"]["epoch"] == 2 and state["epoch_progress"]["next_batch"] == 2
    resumed = run(load_recipe(recipe_path, overrides), mode, tmp_path / "cut", resume=True)
    assert resumed["epochs_done"] == 3
    _same_run_bit_for_bit(tmp_path / "whole" / whole["run"], cut_dir)


class SignalAtBatch(Callbacks):
    """Sends this process `signum` (as `kill` or Ctrl-C would) once the loop has taken batch `batch` of `epoch`."""

    def __init__(self, signum, epoch, batch, times=1):
        self.signum, self.epoch, self.batch, self.times, self.current, self.seen = signum, epoch, batch, times, 0, 0

    def on_epoch_start(self, epoch, epochs, batches):
        self.current, self.seen = epoch, 0

    def on_batch(self, images, loss):
        self.seen += 1
        if (self.current, self.seen) == (self.epoch, self.batch):
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
                time.sleep(0.01)  # the handler runs at once: between bytecodes, in this (main) thread


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_saves_the_batch_in_hand_and_the_resume_is_bit_for_bit(tmp_path, teacher_recipe, signum,
                                                                             sigint_as_in_a_terminal):
    from edgekd.train.stop_signals import Stopped

    overrides = ["train.epochs=3", "train.checkpoint_seconds=null"]  # no periodic save: only the stop saves
    whole = run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "whole")
    with pytest.raises(Stopped) as stopped:
        run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "cut", callbacks=SignalAtBatch(signum, 2, 3))
    assert stopped.value.exit_code == 128 + signum and "epoch 2, batch 3 of" in stopped.value.saved
    cut_dir = tmp_path / "cut" / whole["run"]
    assert json.loads((cut_dir / "summary.json").read_text())["status"] == "interrupted"
    state = torch.load(cut_dir / "last.pt", weights_only=True)["train_state"]
    assert state["epoch_progress"]["epoch"] == 2 and state["epoch_progress"]["next_batch"] == 3
    resumed = run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "cut", resume=True)
    assert resumed["epochs_done"] == 3
    _same_run_bit_for_bit(tmp_path / "whole" / whole["run"], cut_dir)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with it


def test_a_second_stop_signal_stops_at_once_without_saving(tmp_path, teacher_recipe):
    from edgekd.train.stop_signals import Stopped

    overrides = ["train.epochs=3", "train.checkpoint_seconds=null"]
    with pytest.raises(Stopped) as stopped:
        run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "cut",
            callbacks=SignalAtBatch(signal.SIGTERM, 2, 3, times=2))
    assert stopped.value.saved is None  # the state on disk is epoch 1's end, as the CLI then says
    run_dir = next((tmp_path / "cut").iterdir())
    assert torch.load(run_dir / "last.pt", weights_only=True)["train_state"]["epoch_progress"] is None
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_stop_signals_ask_while_the_loop_listens_and_stop_at_once_otherwise():
    from edgekd.train.stop_signals import Stopped, StopSignals, stop_signals

    stops = StopSignals()
    with pytest.raises(Stopped) as stopped:  # before the loop: nothing to save, stop now
        stops.handle(signal.SIGTERM, None)
    assert stopped.value.exit_code == 143 and stopped.value.saved is None
    stops.listening = True
    stops.handle(signal.SIGINT, None)
    assert stops.requested == signal.SIGINT and stops.stopped("epoch 1, batch 2 of 9").exit_code == 130
    with pytest.raises(Stopped):
        stops.handle(signal.SIGINT, None)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # started under nohup: stays ignored
    try:
        with stop_signals() as stops:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stops.handle
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_live_run_is_not_resumed_by_another_process(tmp_path, teacher_recipe):
    from edgekd.errors import EdgekdError
    from edgekd.runs import process_identity

    first = run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "artifacts")
    path = tmp_path / "artifacts" / first["run"] / "summary.json"
    # as if this very process were still training it
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "running", "process": process_identity()}))
    with pytest.raises(EdgekdError, match="still being trained"):
        run(load_recipe(teacher_recipe, ["train.epochs=2"]), "train", tmp_path / "artifacts", resume=True)


def test_resume_without_a_run_says_so_and_starts_one(tmp_path, teacher_recipe, caplog):
    # `--resume` in a restart loop on a preemptible machine must also work when the first attempt died
    # before its run folder existed
    summary = run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "artifacts", resume=True)
    assert "nothing to resume" in caplog.text and "starting a new run" in caplog.text
    assert summary["status"] == "finished" and summary["run"] == "tiny_teacher"


def test_frozen_backbone_only_changes_the_head(tmp_path, image_dataset):
    recipe = write_recipe(tmp_path / "frozen.yaml", image_dataset, model={"freeze": "backbone"},
                          train={"epochs": 1})
    run(load_recipe(recipe), "train", tmp_path / "artifacts")
    model, meta = load_model(tmp_path / "artifacts" / "frozen" / "best.pt")
    torch.manual_seed(0)  # the same seed the trainer used: the initial backbone
    from edgekd.models import create_model

    initial = create_model("paper_cnn", 3, blocks=2).state_dict()
    trained = model.net.state_dict()
    assert torch.equal(initial["stem.0.weight"], trained["stem.0.weight"])
    assert torch.equal(initial["stem.1.running_mean"], trained["stem.1.running_mean"])
    assert not torch.equal(initial["head.0.weight"], trained["head.0.weight"])


class Explode(Callbacks):
    def on_epoch_end(self, record):
        raise RuntimeError("disk on fire")


def test_a_crashed_run_says_so_in_its_summary(tmp_path, teacher_recipe):
    with pytest.raises(RuntimeError):
        run(load_recipe(teacher_recipe), "train", tmp_path / "a", callbacks=Explode())
    summary = json.loads((tmp_path / "a" / "tiny_teacher" / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk on fire" in summary["error"]
    assert (tmp_path / "a" / "tiny_teacher" / "last.pt").is_file()  # epoch 1 was saved before the crash


def test_cosine_schedule_warms_up_then_decays_per_batch():
    from edgekd.train.trainer import make_scheduler

    recipe = load_recipe(RECIPES / "intel_8block_plus.yaml",
                         ["train.epochs=3", "train.warmup_epochs=1", "train.lr=1.0"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, recipe, batches_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = [0.25, 0.5, 0.75, 1.0]  # one epoch of 4 batches
    cosine = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # from the peak towards 0
    assert lrs == pytest.approx(warmup + cosine)


def test_warmup_with_a_step_schedule_is_refused():
    from edgekd.errors import RecipeError

    with pytest.raises(RecipeError, match="warmup_epochs works with scheduler none or cosine"):
        load_recipe(RECIPES / "intel_8block_plus.yaml", ["train.scheduler=step"])


def test_ema_weights_are_validated_saved_and_resumable(tmp_path, teacher_recipe):
    overrides = ["train.epochs=2", "train.ema_decay=0.5"]
    summary = run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "a")
    last = torch.load(tmp_path / "a" / summary["run"] / "last.pt", weights_only=True)
    raw, average = last["train_state"]["raw_state_dict"], last["state_dict"]
    assert last["train_state"]["ema_updates"] == 2 * 4  # 48 images, batch 12: 4 steps per epoch
    weight = "net.head.weight" if "net.head.weight" in raw else next(k for k in raw if k.endswith("weight"))
    assert not torch.equal(raw[weight], average[weight])
    # What was validated is what was saved: re-evaluating best.pt reproduces the recorded accuracy.
    from edgekd.evaluate import evaluate_checkpoint

    best = tmp_path / "a" / summary["run"] / "best.pt"
    assert evaluate_checkpoint(best, split="val").accuracy == pytest.approx(summary["best_val_acc"], abs=1e-6)


def test_augmented_distillation_runs_the_teacher_per_batch_and_says_so(tmp_path, teacher_recipe, student_recipe,
                                                                      caplog):
    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "a")
    student = load_recipe(student_recipe, ["train.epochs=1", "augment.flip=true", "data.image_size=12"])
    with caplog.at_level("INFO", logger="edgekd"):
        summary = run(student, "distill", tmp_path / "a")
    assert "augmentation is on, so the teacher runs on every batch" in caplog.text
    assert summary["status"] == "finished"  # the 16 px teacher saw each 12 px view resized to 16 px
    assert not (tmp_path / "cache" / "teacher-logits").exists() or not any(
        (tmp_path / "cache" / "teacher-logits").iterdir())


def test_an_ensemble_teacher_averages_its_members_logits(tmp_path, teacher_recipe, student_recipe):
    from edgekd.train.teacher import TeacherEnsemble

    first = run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "a")
    second = run(load_recipe(teacher_recipe, ["train.epochs=1", "train.seed=1"]), "train", tmp_path / "a")
    paths = [tmp_path / "a" / s["run"] / "best.pt" for s in (first, second)]
    members = [load_model(path)[0] for path in paths]
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(TeacherEnsemble(members)(pixels), (members[0](pixels) + members[1](pixels)) / 2)
    summary = run(load_recipe(student_recipe, ["train.epochs=1", f"teacher.checkpoint={paths[0]}",
                                               f"teacher.ensemble=[{paths[1]}]"]), "distill", tmp_path / "a")
    assert summary["teacher"]["model"]["name"] == "ensemble of 2"
    assert summary["teacher"]["checkpoint"] == f"{paths[0]} + {paths[1]}"
    with pytest.raises(CheckpointError, match="teacher.ensemble member"):
        run(load_recipe(student_recipe, [f"teacher.ensemble=[{tmp_path / 'missing.pt'}]"]), "distill", tmp_path / "a")


# ----- bad input on the training side (issue 29) --------------------------------------------------------

def _nan_on_call(monkeypatch, call: int):
    """Make the training loss NaN from its `call`-th evaluation on (as a 1e30 learning rate would)."""
    import edgekd.train.trainer as trainer_module

    real, calls = trainer_module.ce_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) >= call else value

    monkeypatch.setattr(trainer_module, "ce_loss", loss)


def test_a_nan_loss_stops_the_run_at_once_naming_epoch_and_batch(tmp_path, teacher_recipe, monkeypatch):
    from edgekd.errors import EdgekdError

    _nan_on_call(monkeypatch, 6)  # 4 batches per epoch: epoch 2, batch 2
    with pytest.raises(EdgekdError, match=r"training diverged: the training loss is nan at epoch 2, batch 2 of 4"):
        run(load_recipe(teacher_recipe, ["train.epochs=5"]), "train", tmp_path / "artifacts")
    summary = json.loads((tmp_path / "artifacts" / "tiny_teacher" / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]
    assert [r["epoch"] for r in MetricsLog(tmp_path / "artifacts" / "tiny_teacher" / "metrics.jsonl").read()] == [1]


def _poison(path, value=float("nan")):
    payload = torch.load(path, weights_only=True)
    for tensor in payload["state_dict"].values():
        if tensor.is_floating_point():
            tensor.fill_(value)
    torch.save(payload, path)


def test_a_nan_teacher_never_teaches(tmp_path, teacher_recipe, student_recipe, image_dataset, caplog):
    import shutil

    artifacts = tmp_path / "artifacts"
    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", artifacts)
    # a newer teacher run that "finished" at NaN (as edgekd before the divergence check let one)
    shutil.copytree(artifacts / "tiny_teacher", artifacts / "tiny_teacher-2")
    _poison(artifacts / "tiny_teacher-2" / "best.pt")
    summary = run(load_recipe(student_recipe, ["train.epochs=1"]), "distill", artifacts)
    assert summary["teacher"]["checkpoint"].endswith("tiny_teacher/best.pt")
    assert "passing over" in caplog.text and "NaN or infinite weights" in caplog.text
    explicit = write_recipe(tmp_path / "explicit.yaml", image_dataset,
                            teacher={"checkpoint": str(artifacts / "tiny_teacher-2")})
    with pytest.raises(CheckpointError, match="holds NaN or infinite weights .* cannot be a teacher"):
        run(load_recipe(explicit), "distill", artifacts)
    _poison(artifacts / "tiny_teacher" / "best.pt", float("inf"))
    with pytest.raises(CheckpointError, match=r"tiny_teacher-2, tiny_teacher cannot teach"):
        run(load_recipe(student_recipe), "distill", artifacts)


def test_a_checkpoint_whose_model_does_not_fit_its_weights_is_a_checkpoint_error(tmp_path, teacher_recipe,
                                                                                 student_recipe):
    from edgekd.evaluate import evaluate_checkpoint

    artifacts = tmp_path / "artifacts"
    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", artifacts)
    best = artifacts / "tiny_teacher" / "best.pt"
    payload = torch.load(best, weights_only=True)
    payload["model"]["args"]["blocks"] = 5  # the metadata now describes another model
    torch.save(payload, best)
    with pytest.raises(CheckpointError, match="its stored model does not fit its weights"):
        evaluate_checkpoint(best, "val")
    with pytest.raises(CheckpointError, match="its stored model does not fit its weights"):
        run(load_recipe(student_recipe, ["train.epochs=1", f"teacher.checkpoint={best}"]), "distill", artifacts)
    last = artifacts / "tiny_teacher" / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload["state_dict"] = {k: v[:1] if v.dim() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, last)
    with pytest.raises(CheckpointError, match="last.pt does not fit this run's model"):
        run(load_recipe(teacher_recipe, ["train.epochs=2"]), "train", artifacts, resume=True)
    # the failed attempt to continue leaves the finished run finished
    summary = json.loads((artifacts / "tiny_teacher" / "summary.json").read_text())
    assert summary["status"] == "finished" and "does not fit" in summary["resume_failed"]


def test_resuming_with_a_changed_recipe_is_refused_before_anything_is_written(tmp_path, teacher_recipe):
    from edgekd.errors import RecipeError

    artifacts = tmp_path / "artifacts"
    run(load_recipe(teacher_recipe), "train", artifacts)
    run_dir = artifacts / "tiny_teacher"
    before = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", "summary.json", "last.pt")}
    for override, named in [("data.image_size=24", "data.image_size: 16 then, 24 now"),
                            ("model.blocks=2", "model.blocks: 3 then, 2 now"),
                            ("precision=bf16", "precision: 'fp32' then, 'bf16' now"),
                            ("train.lr=0.5", "train.lr: 0.01 then, 0.5 now")]:
        with pytest.raises(RecipeError, match="cannot resume .* with another recipe") as err:
            run(load_recipe(teacher_recipe, [override]), "train", artifacts, resume=True)
        assert named in str(err.value) and "recipe.yaml" in err.value.hint
    with pytest.raises(RecipeError, match="it has done 2 epochs"):
        run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", artifacts, resume=True)
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not (artifacts / "tiny_teacher-2").exists()
    # what only says how long to train may change
    summary = run(load_recipe(teacher_recipe, ["train.epochs=3", "train.checkpoint_seconds=30"]), "train",
                  artifacts, resume=True)
    assert summary["status"] == "finished" and summary["epochs_done"] == 3


def test_nproc_that_does_not_divide_the_batch_is_refused_before_torchrun(tmp_path, teacher_recipe, monkeypatch):
    import subprocess

    from click.testing import CliRunner

    from edgekd.cli import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("torchrun was started"))
    result = CliRunner().invoke(cli, ["train", str(teacher_recipe), "--nproc", "5"])
    assert result.exit_code == 2 and "train.batch_size 12 does not split evenly over 5 processes" in result.output
    assert "--set train.batch_size=10" in result.output


def test_retrying_a_run_that_failed_before_any_epoch_takes_its_folder(tmp_path, teacher_recipe, monkeypatch):
    import edgekd.train.trainer as trainer_module
    from edgekd.errors import DataError

    real = trainer_module.render_split

    def broken(recipe, dataset):
        raise DataError("the photos moved")

    artifacts = tmp_path / "artifacts"
    monkeypatch.setattr(trainer_module, "render_split", broken)
    for _ in range(2):
        with pytest.raises(DataError):
            run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", artifacts)
    assert [p.name for p in artifacts.iterdir()] == ["tiny_teacher"]
    assert json.loads((artifacts / "tiny_teacher" / "summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(trainer_module, "render_split", real)
    assert run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", artifacts)["run"] == "tiny_teacher"
    # a run with finished epochs is never taken over by the next one
    assert run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", artifacts)["run"] == "tiny_teacher-2"


NAN_ON_RANK_1 = """
import os, sys
import edgekd.train.trainer as trainer
real = trainer.ce_loss
def loss(*args, **kwargs):  # only this rank's share diverges
    value = real(*args, **kwargs)
    return value * float("nan") if os.environ["RANK"] == "1" else value
trainer.ce_loss = loss
from edgekd.cli import main
sys.argv = ["edgekd", *sys.argv[1:]]
main()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_a_nan_on_one_rank_stops_every_rank_without_a_hang(tmp_path, teacher_recipe):
    import os
    import subprocess
    import sys

    script = tmp_path / "nan_rank.py"
    script.write_text(NAN_ON_RANK_1)
    env = {**os.environ, "EDGEKD_ARTIFACTS": str(tmp_path / "ddp"), "EDGEKD_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               "-q", "train", str(teacher_recipe)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "training diverged: the training loss is nan at epoch 1, batch 1 of 4" in done.stderr
    assert "the training loss is not finite on another process at epoch 1, batch 1 of 4" in done.stderr
    assert json.loads((tmp_path / "ddp" / "tiny_teacher" / "summary.json").read_text())["status"] == "failed"
