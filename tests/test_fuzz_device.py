"""Bad input on the device side never crashes, hangs or passes silently: classify and export driven through
the CLI with tampered metadata, files that are not files, garbage, NaN models and bad photos.

Models are tiny graphs built with onnx.helper (a pooled colour → Gemm, milliseconds to build and run), so
hundreds of generated inputs cost seconds. Every command runs under a timeout in a worker thread: a call
still running when it expires is a hang, and fails the test instead of blocking the suite.
"""

import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgekd.cli import cli
from edgekd.runtime.model_info import MAX_IMAGE_SIZE, ModelInfo

CLASSES = ["buildings", "forest", "sea"]
SIZE = 8
TIMEOUT = 30.0  # seconds; every call here takes well under one
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----- helpers ------------------------------------------------------------------------------------------

def invoke(*args, timeout: float = TIMEOUT):
    """`edgekd ARGS` through CliRunner in a worker thread; a call that outlives `timeout` is a hang."""
    outcome = {}

    def target():
        outcome["result"] = CliRunner().invoke(cli, [str(a) for a in args])

    worker = threading.Thread(target=target, daemon=True)  # a hung call must not keep pytest alive
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"edgekd {' '.join(map(str, args))} hung (over {timeout:.0f} s)"
    return outcome["result"]


def assert_clean(result, exit_codes=(0, 1, 2)):
    """No traceback: the command ended through sys.exit with a known code, and said why when it failed."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code in exit_codes, result.output
    if result.exit_code:
        assert "Error" in result.output or "error:" in result.output, result.output


def metadata(**changes) -> dict[str, str]:
    info = ModelInfo(CLASSES, SIZE, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "bilinear", "in-graph", "pixels",
                     "fp32", {"recipe": "tiny"})
    return {**info.to_metadata(), **changes}


def tiny_model(path: Path, classes: int = len(CLASSES), bias=None, weight=None, dynamic_classes=False,
               meta: dict[str, str] | None = None) -> Path:
    """An edgekd-shaped model: pixels (N, 3, S, S) → mean colour → Gemm → logits (N, classes)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (3, classes)).astype(np.float32) if weight is None else weight
    bias = np.zeros(classes, np.float32) if bias is None else np.asarray(bias, np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["pixels"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", "classes" if dynamic_classes else classes])],
        [numpy_helper.from_array(np.asarray(weight, np.float32), "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata() if meta is None else meta)
    onnx.save(model, path)
    return path


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def good_model(tmp_path) -> Path:
    return tiny_model(tmp_path / "good.onnx")


def answered(result) -> list[list[str]]:
    """The answer lines of a successful classify, checked for shape: file, a known label, a finite probability."""
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    for row in rows:
        assert len(row) == 4 and row[1] in CLASSES, row
        assert 0 <= float(row[2]) <= 1 and "nan" not in row[3], row
    return rows


def test_the_tiny_model_classifies(good_model, photo):
    result = invoke("classify", "--model", good_model, photo)
    assert_clean(result, (0,))
    assert len(answered(result)) == 1


# ----- model paths that are not model files ---------------------------------------------------------------

def _fifo(path):
    os.mkfifo(path)


def _directory(path):
    path.mkdir()


def _loop(path):
    path.symlink_to(path.name)


def _dangling(path):
    path.symlink_to("nowhere.onnx")


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    path.write_bytes(os.urandom(300))


def _device(path):
    path.symlink_to("/dev/zero")  # reading it never ends


def _socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    _SOCKETS.append(server)


_SOCKETS: list[socket.socket] = []
NOT_MODELS = {_fifo: "named pipe", _directory: "is a directory", _loop: "symlink loop",
              _dangling: "symlink to a missing file", _empty: "empty file", _garbage: "cannot load it",
              _device: "character device", _socket: "socket"}


@pytest.mark.parametrize("make", NOT_MODELS, ids=[f.__name__[1:] for f in NOT_MODELS])
def test_a_model_path_that_is_no_model_file_gets_one_clear_error(tmp_path, photo, make):
    path = tmp_path / "model.onnx"
    make(path)
    result = invoke("classify", "--model", path, photo)
    assert_clean(result, (1, 2))
    assert NOT_MODELS[make] in result.output and result.stdout == ""


def test_a_fifo_model_does_not_hang_the_real_command(tmp_path, photo):
    """The same in a fresh interpreter, as a user runs it (a thread would hide a hang in process exit)."""
    os.mkfifo(tmp_path / "pipe.onnx")
    done = subprocess.run([sys.executable, "-m", "edgekd", "classify", "--model", str(tmp_path / "pipe.onnx"),
                           str(photo)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "named pipe" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_model_gets_one_clear_error(good_model, photo):
    good_model.chmod(0)
    result = invoke("classify", "--model", good_model, photo)
    assert_clean(result, (1,))
    assert "permission denied" in result.output


def test_an_unreadable_model_gets_one_clear_error_even_as_root(good_model, photo, monkeypatch):
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if Path(path) == good_model:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    result = invoke("classify", "--model", good_model, photo)
    assert_clean(result, (1,))
    assert "cannot be read (permission denied)" in result.output


@pytest.mark.parametrize("make", [_fifo, _directory, _loop, _dangling, _device],
                         ids=["fifo", "directory", "loop", "dangling", "device"])
def test_the_newest_export_lookup_skips_what_is_not_a_file(tmp_path, photo, make):
    artifacts = tmp_path / "artifacts"
    older = tiny_model(_folder(artifacts / "old") / "old.fp32.onnx")
    os.utime(older, (1, 1))
    make(_folder(artifacts / "new") / "new.int8.onnx")  # newer, and preferred on CPU: must still be skipped
    result = invoke("classify", "--artifacts", artifacts, photo)
    assert_clean(result, (0,))
    assert "skipping" in result.output and f"using the newest export: {older}" in result.output
    assert len(answered(result)) == 1


def _folder(run: Path) -> Path:
    (run / "exports").mkdir(parents=True, exist_ok=True)
    return run / "exports"


def test_the_newest_export_lookup_with_only_non_files_is_a_clear_error(tmp_path, photo):
    artifacts = tmp_path / "artifacts"
    _fifo(_folder(artifacts / "run") / "run.fp32.onnx")
    result = invoke("classify", "--artifacts", artifacts, photo)
    assert_clean(result, (1,))
    assert "no exported model" in result.output and "not regular files" in result.output


# ----- tampered metadata ----------------------------------------------------------------------------------

def _text(max_size=12):
    return st.text(max_size=max_size)


_CONTROL = st.sampled_from(["\n", "\r", "\t", "\x00", "\x1b[31m", "\u2028", "\x7f"])
BAD_VALUES = {
    "class_names": st.one_of(
        _text().filter(lambda t: not _is_json_list(t)),  # not JSON, or JSON that is no list
        st.just('"buildings"'), st.just("[]"), st.just("{}"), st.just("null"),
        st.lists(st.one_of(st.integers(), st.none(), st.floats(), st.booleans(), st.just("")), min_size=3,
                 max_size=3).map(json.dumps),
        st.tuples(_text(6), _CONTROL, _text(6)).map(lambda p: json.dumps(["forest", "".join(p), "sea"])),
        st.just(json.dumps(["sea", "sea", "forest"])),
        st.lists(st.sampled_from(CLASSES), min_size=1, max_size=2, unique=True).map(json.dumps),  # too few
        st.just(json.dumps(CLASSES + ["desert"])),  # too many for the 3-output graph
        st.just(json.dumps(["x" * 201, "forest", "sea"]))),
    "image_size": st.one_of(
        st.integers(max_value=0).map(str), st.integers(min_value=MAX_IMAGE_SIZE + 1).map(str),
        st.just("20000"), st.floats(allow_nan=True).map(str), _text().filter(lambda t: not t.strip().isdigit()),
        st.integers(1, 64).filter(lambda s: s != SIZE).map(str)),  # in range, but not the graph's size
    "mean": st.one_of(
        _text(), st.lists(st.floats(-2, 2), max_size=6).filter(lambda v: len(v) != 3).map(json.dumps),
        st.just("[NaN, 0, 0]"), st.just("[Infinity, 0, 0]"), st.just('["a", "b", "c"]'),
        st.just("[true, false, true]"), st.just('{"r": 1}')),
    "std": st.one_of(st.just("[0, 1, 1]"), st.just("[-1, 1, 1]"), st.just("[1, 1]"), st.just("[NaN, 1, 1]"),
                     st.just("1e999"), st.just("[1e999, 1, 1]")),
    "precision": _text().filter(lambda t: t not in ("fp32", "fp16", "int8", "fp8")),
    "normalization": _text().filter(lambda t: t != "in-graph"),
    "resize": _text().filter(lambda t: t != "bilinear"),
    "input_name": _text().filter(lambda t: t != "pixels"),
    "edgekd_format": _text().filter(lambda t: t != "edgekd.onnx/1"),
}
# What a refusal must name: the field (or, for a size or count that only the graph contradicts, what it says).
NAMED = {"class_names": ("class_names", "classes"), "image_size": ("image_size", "px"), "mean": ("mean",),
         "std": ("std",), "precision": ("precision",), "normalization": ("normalization",), "resize": ("resize",),
         "input_name": ("input", "input_name"), "edgekd_format": ("not an edgekd export",)}


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


@FUZZ
@given(data=st.data())
def test_tampered_metadata_is_refused_naming_its_field(tmp_path, photo, data):
    field = data.draw(st.sampled_from(sorted(BAD_VALUES)), label="field")
    value = data.draw(BAD_VALUES[field], label="value")
    model = tiny_model(tmp_path / "tampered.onnx", meta=metadata(**{field: value}))
    result = invoke("classify", "--model", model, photo)
    assert_clean(result, (1,))
    assert result.stdout == "", "no answer line may come from a model whose metadata is wrong"
    assert any(word in result.output for word in NAMED[field]), result.output


@FUZZ
@given(field=st.sampled_from(["class_names", "image_size", "mean", "std", "precision", "input_name",
                              "normalization", "resize"]))
def test_missing_metadata_fields_are_named(tmp_path, photo, field):
    meta = metadata()
    del meta[field]
    result = invoke("classify", "--model", tiny_model(tmp_path / "partial.onnx", meta=meta), photo)
    assert_clean(result, (1,))
    assert f"{field} missing" in result.output


@FUZZ
@given(names=st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
                              min_size=1, max_size=20).filter(str.strip), min_size=2, max_size=6, unique=True),
       precision=st.sampled_from(["fp32", "fp16", "int8", "fp8"]),
       mean=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
       std=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3))
def test_any_sound_metadata_is_accepted_and_answers_one_line_per_photo(tmp_path, photo, names, precision, mean,
                                                                      std):
    model = tiny_model(tmp_path / "sound.onnx", classes=len(names),
                       meta=metadata(class_names=json.dumps(names), precision=precision, mean=json.dumps(mean),
                                     std=json.dumps(std)))
    result = invoke("classify", "--model", model, "--json", photo, photo)
    assert_clean(result, (0,))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(row["label"] in names and math.isfinite(row["probability"]) for row in rows)


def test_class_names_given_as_a_string_are_not_split_into_letters(tmp_path, photo):
    result = invoke("classify", "--model", tiny_model(tmp_path / "m.onnx", meta=metadata(class_names='"abc"')),
                    photo)
    assert_clean(result, (1,))
    assert "class_names must be a non-empty JSON list of strings" in result.output


def test_a_class_name_with_a_newline_cannot_forge_an_output_line(tmp_path, photo):
    forged = json.dumps(["buildings", f"forest\n{photo}\tsea\t1.000\t(sea 1.000)", "sea"])
    result = invoke("classify", "--model", tiny_model(tmp_path / "m.onnx", meta=metadata(class_names=forged)),
                    photo)
    assert_clean(result, (1,))
    assert "class_names[1]" in result.output and "control or invisible characters" in result.output
    assert result.stdout == ""


def test_a_huge_image_size_is_refused_before_any_photo_is_decoded(tmp_path, photo):
    result = invoke("classify", "--model", tiny_model(tmp_path / "m.onnx", meta=metadata(image_size="20000")),
                    photo)
    assert_clean(result, (1,))
    assert f"image_size 20000 is outside 1..{MAX_IMAGE_SIZE} px" in result.output


# ----- broken models: NaN, inf, garbage bytes -------------------------------------------------------------

@pytest.mark.parametrize("bias", [[math.nan, 0, 0], [math.inf, 0, 0], [0, -math.inf, 0]], ids=["nan", "inf", "-inf"])
def test_a_model_with_non_finite_output_is_refused_not_printed(tmp_path, photo, bias):
    result = invoke("classify", "--model", tiny_model(tmp_path / "m.onnx", bias=bias), photo, photo)
    assert_clean(result, (1,))
    assert "not finite" in result.output and "nan" not in result.stdout


def test_a_model_whose_output_overflows_is_refused(tmp_path, photo):
    weight = np.full((3, 3), 3e38, np.float32)  # finite weights, but 255 x 3e38 overflows float32
    result = invoke("classify", "--model", tiny_model(tmp_path / "m.onnx", weight=weight), photo)
    assert_clean(result, (1,))
    assert "not finite" in result.output


def test_logits_of_another_width_than_the_classes_are_refused_at_run_time(tmp_path, photo, monkeypatch):
    from edgekd.classify import ExportedModel

    model = tiny_model(tmp_path / "m.onnx", classes=4, dynamic_classes=True)  # metadata lists 3 classes
    result = invoke("classify", "--model", model, photo)
    assert_clean(result, (1,))
    assert "lists 3 classes, the graph outputs 4" in result.output  # the load-time check, from the shapes
    # a graph whose width only shows when it runs (a shape onnxruntime cannot infer) meets the run-time check
    monkeypatch.setattr(ExportedModel, "_check_metadata_fits_graph", lambda self: None)
    result = invoke("classify", "--model", model, photo)
    assert_clean(result, (1,))
    assert "logits of shape [1, 4]" in result.output and "lists 3 classes" in result.output


@FUZZ
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                                  max_size=8))
def test_truncated_or_corrupted_model_files_never_crash(tmp_path, photo, cut, flips):
    raw = bytearray(tiny_model(tmp_path / "good.onnx").read_bytes())
    for position, mask in flips:
        raw[position % len(raw)] ^= mask
    raw = raw[:max(1, len(raw) - cut % len(raw))]
    (tmp_path / "bad.onnx").write_bytes(bytes(raw))
    result = invoke("classify", "--model", tmp_path / "bad.onnx", photo)
    assert_clean(result)
    if result.exit_code == 0:  # a flip in a weight still makes a model: its answer must be sound
        answered(result)


# ----- bad photos -----------------------------------------------------------------------------------------

BAD_PHOTOS = {_fifo: "not a file", _loop: "symlink", _dangling: "symlink",
              _empty: "an empty file", _garbage: "not an image", _device: "not a file"}


@pytest.mark.parametrize("make", BAD_PHOTOS, ids=[f.__name__[1:] for f in BAD_PHOTOS])
def test_a_bad_photo_gets_its_own_error_line_and_the_rest_are_answered(tmp_path, good_model, photo, make):
    bad = tmp_path / "bad.jpg"
    make(bad)
    result = invoke("classify", "--model", good_model, photo, bad, photo)
    assert_clean(result, (1,))
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith(f"{bad}\terror: ") and BAD_PHOTOS[make] in lines[1]
    assert "1 file(s) could not be classified" in result.output


def test_an_unreadable_photo_says_so(tmp_path, good_model, photo, monkeypatch):
    from PIL import Image as PILImage

    real_open = PILImage.open

    def denied(path, *args, **kwargs):
        if Path(path) == photo:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PILImage, "open", denied)
    result = invoke("classify", "--model", good_model, photo)
    assert_clean(result, (1,))
    assert "cannot be read (permission denied)" in result.stdout


@pytest.mark.parametrize("contents", [[], ["notes.txt", "model.onnx"], [".hidden.jpg"]],
                         ids=["empty", "no-images", "hidden-only"])
def test_a_folder_without_photos_is_an_error_not_a_silent_success(tmp_path, good_model, contents):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in contents:
        (folder / name).write_text("x")
    result = invoke("classify", "--model", good_model, folder)
    assert_clean(result, (1,))
    assert f"no photos in {folder}" in result.output and result.stdout == ""


def test_an_empty_folder_beside_photos_is_named_and_the_photos_answered(tmp_path, good_model, photo):
    (tmp_path / "empty").mkdir()
    result = invoke("classify", "--model", good_model, tmp_path / "empty", photo)
    assert_clean(result, (0,))
    assert "holds no photos" in result.output and len(answered(result)) == 1


# ----- export ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 1-block model trained for one epoch on generated colours: a real checkpoint in about a second."""
    from conftest import make_image_folder, write_recipe
    from edgekd.recipe import load_recipe
    from edgekd.train.trainer import run

    base = tmp_path_factory.mktemp("small-run")
    make_image_folder(base / "colours" / "train", per_class=4, seed=1)
    make_image_folder(base / "colours" / "val", per_class=2, seed=2)
    recipe = write_recipe(base / "small.yaml", base / "colours", model={"blocks": 1}, train={"epochs": 1},
                          data={"cache_dir": str(base / "cache"), "image_size": SIZE})
    run(load_recipe(recipe), "train", base / "artifacts")
    return base / "artifacts" / "small"


def _poison(state: dict, name: str, value: float) -> None:
    tensor = state[name]
    tensor.view(-1)[0] = value


def _tamper(payload: dict, kind: str, draw) -> str:
    """Damage a checkpoint one way; the phrase its refusal must hold."""
    state = payload["state_dict"]
    floats = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel())
    if kind == "non-finite":
        _poison(state, draw(st.sampled_from(floats)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))
        return "non-finite weights"
    if kind == "missing":
        del state[draw(st.sampled_from(sorted(state)))]
        return "does not fit its weights"
    if kind == "extra":
        state["net.ghost.weight"] = torch.zeros(2)
        return "does not fit its weights"
    if kind == "shape":
        name = draw(st.sampled_from([k for k in floats if state[k].dim() >= 1 and state[k].shape[0] > 1]))
        state[name] = state[name][:-1].clone()
        return "does not fit its weights"
    if kind == "model":
        payload["model"]["args"] = draw(st.sampled_from([{"blocks": 2}, {"blocks": 1, "bogus": 1}, {"blocks": "x"}]))
        return "does not fit its weights"
    payload["model"]["name"] = draw(st.text(max_size=10).filter(lambda t: t != "paper_cnn"))
    return "does not fit its weights"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoints_are_never_exported(small_run, tmp_path, data):
    payload = torch.load(small_run / "best.pt", weights_only=True)
    kind = data.draw(st.sampled_from(["non-finite", "missing", "extra", "shape", "model", "name"]), label="kind")
    phrase = _tamper(payload, kind, data.draw)
    folder = tmp_path / f"damaged-{kind}"
    folder.mkdir(exist_ok=True)
    torch.save(payload, folder / "best.pt")
    result = invoke("export", folder, "--int8", "--calibration-images", "4", "--out", folder / "out")
    assert_clean(result, (1,))
    assert phrase in result.output and "scale issue" not in result.output
    assert not list((folder / "out").glob("*.onnx")), "nothing may be written from a damaged checkpoint"


@pytest.mark.parametrize("out", ["file/sub", "/proc/edgekd-exports", "target-is-a-folder"])
def test_an_unwritable_export_folder_is_one_clear_error(small_run, tmp_path, out):
    (tmp_path / "file").write_text("")
    if out == "target-is-a-folder":
        (tmp_path / out / "small.fp32.onnx").mkdir(parents=True)
    result = invoke("export", small_run / "best.pt", "--out", tmp_path / out if not out.startswith("/") else out)
    assert_clean(result, (1,))
    assert "cannot write" in result.output and "--out" in result.output
