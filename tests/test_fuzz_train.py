"""Generated bad input for the training side: recipes, --set values, sweep files, checkpoints and damaged run
folders, driven through the CLI. Whatever comes in: no traceback, no hang, and a refusal says `Error:`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_image_folder, write_recipe
from edgekd.cli import cli

# EDGEKD_FUZZ_SCALE=20 for a deeper search by hand; CI runs the small default.
SCALE = int(os.environ.get("EDGEKD_FUZZ_SCALE", "1"))
CALL_SECONDS = 120  # far above what any of these takes (well under a second alone): only a hang reaches it
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)


def invoke(args: list[str]):
    """Run the CLI in a thread and fail if it has not returned in CALL_SECONDS; then check how it ended."""
    box = {}

    def call():
        box["result"] = CliRunner().invoke(cli, args)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(CALL_SECONDS)
    assert not worker.is_alive(), f"edgekd {' '.join(args)} hung"
    result = box["result"]
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"edgekd {args}: {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert "Error:" in result.output, result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny finished teacher run (1 epoch), its recipe and a student recipe, sharing one decode cache."""
    from edgekd.recipe import load_recipe
    from edgekd.train.trainer import run

    base = tmp_path_factory.mktemp("fuzz-train")
    root = base / "colours"
    make_image_folder(root / "train", per_class=4, seed=1)
    make_image_folder(root / "val", per_class=2, seed=2)
    common = {"data": {"cache_dir": str(base / "cache"), "image_size": 8}, "train": {"batch_size": 4, "epochs": 1}}
    teacher = write_recipe(base / "fz_teacher.yaml", root, model={"blocks": 1}, **common)
    student = write_recipe(base / "fz_student.yaml", root, model={"blocks": 1},
                           teacher={"recipe": str(teacher)}, **common)
    run(load_recipe(teacher), "train", base / "artifacts")
    return {"base": base, "teacher": teacher, "student": student, "run": base / "artifacts" / "fz_teacher"}


KEYS = ["data.image_size", "data.root", "data.val_fraction", "data.classes", "data.max_per_class", "train.lr",
        "train.seed", "train.batch_size", "train.epochs", "train.optimizer", "train.checkpoint_seconds",
        "train.ema_decay", "distill.temperature", "distill.teacher_views", "augment.crop", "augment.render_size",
        "model.blocks", "model.width", "model.classifier", "model.name", "precision", "name", "train", "nosuch.key"]
HOSTILE = ["[unclosed", "{a: 1", "&a [*a]", "!!python/object:os.system {}", "\x00", "1e999", "-.inf", ".nan",
           "99999999999999999999999", "-1", "0", "100000", "true", "null", "[]", "{}", "'", '"', "%TAG", "- a",
           "a: b: c", "\udcff", "\u202e", "2024-01-01", "0x10", "1_000", "~", "*a", "@x", "`x`"]
VALUES = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12), st.integers().map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


@settings(FUZZ, max_examples=40 * SCALE)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_set_value_is_accepted_or_refused_in_one_line(trained, key, value):
    # data.root is a folder that does not exist, so a value that passes fails at the data, before training
    args = ["train", str(trained["teacher"]), "--set", f"data.root={trained['base'] / 'absent'}",
            "--set", f"{key}={value}", "--artifacts", str(trained["base"] / "fuzz-artifacts")]
    result = invoke(args)
    assert result.exit_code != 0


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
SECTIONS = ["data", "model", "train", "teacher", "distill", "augment", "export", "name", "precision", "x"]
FIELDS = ["root", "image_size", "lr", "seed", "epochs", "blocks", "checkpoint", "recipe", "crop", "method",
          "classes", "kind", "name", "batch_size"]
RECIPES = st.dictionaries(st.sampled_from(SECTIONS), st.one_of(
    SCALARS, st.lists(SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(SCALARS, st.lists(SCALARS, max_size=3)), max_size=4)),
    max_size=5)


@settings(FUZZ, max_examples=40 * SCALE)
@given(content=st.one_of(RECIPES.map(lambda r: yaml.safe_dump(r).encode()), st.binary(max_size=200),
                         st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_any_recipe_file_is_refused_in_one_line(trained, content):
    folder = Path(tempfile.mkdtemp(dir=trained["base"]))
    recipe = folder / "fuzzed.yaml"
    recipe.write_bytes(content)
    for command in ("train", "distill"):
        invoke([command, str(recipe), "--artifacts", str(folder / "artifacts"), "--set", "train.epochs=1",
                "--set", f"data.root={folder / 'absent'}"])
    invoke(["summary", str(recipe)])


SWEEPS = st.dictionaries(
    st.sampled_from(["name", "teacher", "students", "precisions", "baselines", "export", "description", "x"]),
    st.one_of(SCALARS, st.lists(st.one_of(SCALARS, st.just("t.yaml")), max_size=3), st.just("t.yaml"),
              st.dictionaries(st.sampled_from(["t.yaml", "enabled", "precisions", "runs", "batch_sizes"]),
                              st.one_of(SCALARS, st.lists(SCALARS, max_size=2)), max_size=3)),
    max_size=5)


@settings(FUZZ, max_examples=30 * SCALE)
@given(spec=SWEEPS)
def test_any_sweep_file_is_planned_or_refused_in_one_line(trained, spec):
    folder = Path(tempfile.mkdtemp(dir=trained["base"]))
    shutil.copy(trained["teacher"], folder / "t.yaml")
    path = folder / "s_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    invoke(["sweep", str(path), "--dry-run", "--artifacts", str(folder / "artifacts")])


def _mutations():
    truncate = st.integers(0, 4000).map(lambda n: ("truncate", n))
    garbage = st.binary(max_size=64).map(lambda b: ("bytes", b))
    shaped = st.one_of(st.lists(SCALARS, max_size=3), SCALARS,
                       st.dictionaries(st.sampled_from(["status", "mode", "run", "updated", "process", "epoch",
                                                        "members", "pid"]),
                                       st.one_of(SCALARS, st.dictionaries(st.sampled_from(["pid", "host"]), SCALARS)),
                                       max_size=4)).map(lambda v: ("json", json.dumps(v)))
    return st.tuples(st.sampled_from(["summary.json", "best.pt", "last.pt", "metrics.jsonl", "recipe.yaml"]),
                     st.one_of(truncate, garbage, shaped))


def _damage(path: Path, how: tuple) -> None:
    kind, value = how
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[:value])
    elif kind == "bytes":
        path.write_bytes(value)
    else:
        path.write_text(value)


@settings(FUZZ, max_examples=25 * SCALE)
@given(mutation=_mutations(), command=st.sampled_from(["evaluate", "evaluate-newest", "resume", "teacher"]))
def test_a_damaged_run_folder_never_crashes_a_command(trained, mutation, command):
    folder = Path(tempfile.mkdtemp(dir=trained["base"]))
    artifacts = folder / "artifacts"
    run_dir = artifacts / "fz_teacher"
    shutil.copytree(trained["run"], run_dir)
    name, how = mutation
    _damage(run_dir / name, how)
    if command == "evaluate":
        invoke(["evaluate", str(run_dir), "--split", "val"])
    elif command == "evaluate-newest":
        invoke(["evaluate", "--split", "val", "--artifacts", str(artifacts)])
    elif command == "resume":  # the run finished its one epoch: a resume that works trains nothing
        invoke(["train", str(trained["teacher"]), "--resume", "--artifacts", str(artifacts)])
    else:
        invoke(["distill", str(trained["student"]), "--set", f"teacher.checkpoint={run_dir}",
                "--set", f"data.root={folder / 'absent'}", "--artifacts", str(artifacts)])


TRAIN_STATE = st.dictionaries(st.sampled_from(["optimizer", "scheduler", "torch_rng", "early_stopping",
                                               "epoch_progress", "raw_state_dict", "started"]),
                              st.one_of(SCALARS, st.dictionaries(st.sampled_from(["epoch", "next_batch", "x"]),
                                                                 SCALARS, max_size=2)), max_size=3)
PAYLOAD_FIELDS = st.dictionaries(
    st.sampled_from(["model", "class_names", "image_size", "mean", "std", "state_dict", "recipe", "epoch",
                     "format_version", "train_state"]),
    st.one_of(SCALARS, st.lists(SCALARS, max_size=3), TRAIN_STATE,
              st.dictionaries(st.sampled_from(["name", "args", "data"]), SCALARS, max_size=2)),
    max_size=4)


@settings(FUZZ, max_examples=25 * SCALE)
@given(changes=PAYLOAD_FIELDS)
def test_an_edgekd_checkpoint_with_fields_of_any_shape_is_a_clear_error(trained, changes):
    folder = Path(tempfile.mkdtemp(dir=trained["base"]))
    payload = torch.load(trained["run"] / "best.pt", weights_only=True)
    payload.update(changes)
    path = folder / "best.pt"
    torch.save(payload, path)
    invoke(["evaluate", str(path), "--split", "val"])
    invoke(["distill", str(trained["student"]), "--set", f"teacher.checkpoint={path}",
            "--set", f"data.root={folder / 'absent'}", "--artifacts", str(folder / "artifacts")])
    run_dir = folder / "artifacts" / "fz_teacher"  # the same fields in the last.pt a resume continues from
    shutil.copytree(trained["run"], run_dir)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    last.update(changes)
    torch.save(last, run_dir / "last.pt")
    invoke(["train", str(trained["teacher"]), "--resume", "--artifacts", str(folder / "artifacts")])
