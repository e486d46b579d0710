import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from edgekd.classify import ExportedModel, Failure, expand_inputs
from edgekd.cli import cli
from edgekd.errors import EdgekdError
from edgekd.export import ExportPlan, export_checkpoint
from edgekd.runtime.preprocess import ImageDecodeError, load_rgb, open_image


@pytest.fixture(scope="module")
def model_file(distilled_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("classify-model")
    export_checkpoint(ExportPlan(distilled_run / "best.pt", ["int8"], out, calibration_images=12))
    return out / "tiny_student.int8.onnx"


@pytest.fixture
def photos(tmp_path):
    """Good photos in every mode a camera or a web page produces, and one of each kind of bad input."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    rgb.save(folder / "rgb.jpg")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("LA").save(folder / "gray_alpha.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(folder / "sixteen_bit.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("this is not a picture")
    (bad / "truncated.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:300])
    Image.new("1", (10_000, 9_000)).save(bad / "bomb.png")  # 90 M pixels: over Pillow's limit
    return folder, bad


def _invoke(*args):
    return CliRunner().invoke(cli, ["classify", *map(str, args)])


def test_every_image_mode_is_classified(model_file, photos):
    folder, _ = photos
    result = _invoke("--model", model_file, "--json", folder)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 7
    for line in lines:
        assert line["label"] in ("buildings", "forest", "sea")
        assert 0 < line["probability"] <= 1 and len(line["top_k"]) == 3
        assert sum(k["probability"] for k in line["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs_each_get_one_error_line_and_the_rest_are_answered(model_file, photos, tmp_path):
    folder, bad = photos
    missing = tmp_path / "missing.jpg"
    result = _invoke("--model", model_file, folder / "rgb.jpg", missing, bad, folder / "gray.png")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    errors = {Path(line.split("\t")[0]).name: line for line in lines if "\terror: " in line}
    assert set(errors) == {"missing.jpg", "empty.jpg", "notes.png", "truncated.jpg", "bomb.png"}
    assert "no such file" in errors["missing.jpg"]
    assert "empty file" in errors["empty.jpg"]
    assert "not an image" in errors["notes.png"]
    assert "truncated" in errors["truncated.jpg"]
    assert "decompression-bomb" in errors["bomb.png"]
    assert len(lines) == 7 and "5 file(s) could not be classified" in result.output
    assert "Traceback" not in result.output


def test_json_lines_parse_for_answers_and_errors(model_file, photos):
    folder, bad = photos
    result = _invoke("--model", model_file, "--json", folder / "rgb.jpg", bad / "empty.jpg")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["label"] and rows[1]["error"] == "an empty file"


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = np.asarray(Image.fromarray(pixels).rotate(-90, expand=True).resize((16, 16), Image.BILINEAR))
    np.testing.assert_allclose(load_rgb(tmp_path / "rotated.jpg", 16).astype(int), upright.astype(int), atol=40)


def test_a_model_without_edgekd_metadata_is_refused_clearly(model_file, photos, tmp_path):
    foreign = onnx.load(model_file)
    del foreign.metadata_props[:]
    onnx.save(foreign, tmp_path / "foreign.onnx")
    result = _invoke("--model", tmp_path / "foreign.onnx", photos[0] / "rgb.jpg")
    assert result.exit_code == 1 and "not an edgekd export" in result.output
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage")
    result = _invoke("--model", tmp_path / "garbage.onnx", photos[0] / "rgb.jpg")
    assert result.exit_code == 1 and "cannot load it" in result.output and "Traceback" not in result.output


def _classify_in_a_fresh_process(model_file, photo, prelude: str, report: str) -> subprocess.CompletedProcess:
    """`edgekd classify` in a new interpreter after `prelude`; `report` is printed to stderr at its end."""
    script = (f"import json, sys\n{prelude}from edgekd.cli import main\n"
              f"sys.argv = ['edgekd', 'classify', '--model', {str(model_file)!r}, {str(photo)!r}]\n"
              f"try:\n    main()\nfinally:\n    print({report}, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_classify_runs_with_torch_unimportable(model_file, photos):
    done = _classify_in_a_fresh_process(
        model_file, photos[0], "sys.modules['torch'] = None\n",
        "'HEAVY', [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx')]")
    assert len(done.stdout.splitlines()) == 7
    assert "HEAVY ['torch']" in done.stderr  # only our blocker: nothing imported torch, torchvision or onnx


def test_classify_imports_no_training_stack(model_file, photos):
    done = _classify_in_a_fresh_process(
        model_file, photos[0] / "rgb.jpg", "",
        "'MODULES', json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('edgekd', 'torch', 'yaml', 'onnx')))")
    modules = json.loads(done.stderr.split("MODULES ")[-1])
    assert set(modules) <= {"edgekd", "edgekd.cli", "edgekd.errors", "edgekd.classify", "edgekd.runtime",
                            "edgekd.runtime.model_info", "edgekd.runtime.preprocess", "edgekd.runtime.session",
                            "edgekd.runtime.openvino_session"}


def test_batches_in_threads_give_the_answers_of_one_by_one_classification(model_file, photos):
    folder, bad = photos
    files = expand_inputs([str(bad), str(folder)])  # bad files first, so batches mix failures and photos
    model = ExportedModel(model_file)
    threaded = list(model.classify(files, top_k=3, batch_size=3, workers=4))
    alone = [next(model.classify([path], top_k=3)) for path in files]  # one file: no threads
    assert [r.file for r in threaded] == [str(p) for p in files]
    assert sum(isinstance(r, Failure) for r in threaded) == 4
    for got, want in zip(threaded, alone):
        assert type(got) is type(want)
        if isinstance(got, Failure):
            assert got.error == want.error
        else:
            assert got.label == want.label and [k for k, _ in got.top_k] == [k for k, _ in want.top_k]
            assert got.probability == pytest.approx(want.probability, abs=1e-5)


def test_large_jpegs_are_drafted_only_with_room_to_spare(tmp_path):
    smooth = Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth.resize((400, 300), Image.BICUBIC).save(tmp_path / "large.jpg", quality=95)
    smooth.resize((120, 90), Image.BICUBIC).save(tmp_path / "small.jpg", quality=95)
    assert open_image(tmp_path / "large.jpg", draft_to=64).size == (100, 75)  # 1/4 scale keeps >= 64 px
    drafted, full = load_rgb(tmp_path / "large.jpg", 16, draft=True), load_rgb(tmp_path / "large.jpg", 16)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 1.5
    # 120x90 is under 4x the 16 px input on one side: decoded whole, the very pixels training saw
    np.testing.assert_array_equal(load_rgb(tmp_path / "small.jpg", 16, draft=True),
                                  load_rgb(tmp_path / "small.jpg", 16))


def test_images_over_the_pixel_limit_are_refused_in_every_decoding_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    Image.new("RGB", (120, 100)).save(tmp_path / "bomb.png")  # 12,000 pixels: Pillow itself only warns
    Image.new("RGB", (50, 50)).save(tmp_path / "fine.png")

    def refused(path: Path) -> bool:
        try:
            open_image(path)
        except ImageDecodeError as exc:
            return "decompression-bomb" in str(exc)
        return False

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(refused, [tmp_path / "bomb.png", tmp_path / "fine.png"] * 100))
    assert outcomes == [True, False] * 100


def test_without_a_model_the_newest_export_suits_the_provider(distilled_run, photos, monkeypatch):
    monkeypatch.setenv("EDGEKD_ARTIFACTS", str(distilled_run.parent))
    export_checkpoint(ExportPlan(distilled_run / "best.pt", ["fp16", "int8"], distilled_run / "exports",
                                 calibration_images=12))
    result = _invoke(photos[0] / "rgb.jpg")
    assert result.exit_code == 0, result.output
    assert "using the newest export:" in result.output and "tiny_student.int8.onnx" in result.output


def _outputs_nan(model_file, path):
    """The real export with its logits multiplied by NaN: a model that learnt NaN weights answers so."""
    model = onnx.load(model_file)
    graph = model.graph
    logits = graph.output[0].name
    for node in graph.node:  # the last node now writes an inner tensor that one Mul turns into NaN
        node.output[:] = [f"{o}_inner" if o == logits else o for o in node.output]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    graph.node.append(onnx.helper.make_node("Mul", [f"{logits}_inner", "nan"], [logits]))
    onnx.save(model, path)
    return path


def test_a_model_that_outputs_nan_is_refused_not_printed(model_file, photos, tmp_path):
    result = _invoke("--model", _outputs_nan(model_file, tmp_path / "nan.onnx"), photos[0])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the model's output is not finite (NaN or inf)" in result.output and "nan" not in result.stdout


def test_a_folder_without_photos_is_an_error(model_file, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _invoke("--model", model_file, tmp_path / "empty")
    assert result.exit_code == 1 and f"no photos in {tmp_path / 'empty'}" in result.output
    with pytest.raises(EdgekdError, match="no photos"):
        expand_inputs([str(tmp_path / "empty")])


def test_tampered_metadata_of_a_real_export_names_the_field(model_file, photos, tmp_path):
    for key, value, message in (("class_names", '"abc"', "class_names must be a non-empty JSON list"),
                                ("class_names", '["buildings", "forest"]', "lists 2 classes, the graph outputs 3"),
                                ("image_size", "20000", "image_size 20000 is outside"),
                                ("std", "[0, 1, 1]", "std [0.0, 1.0, 1.0] must be finite and positive"),
                                ("precision", "int4", "precision 'int4' is not one of")):
        model = onnx.load(model_file)
        next(p for p in model.metadata_props if p.key == key).value = value
        onnx.save(model, tmp_path / "tampered.onnx")
        result = _invoke("--model", tmp_path / "tampered.onnx", photos[0] / "rgb.jpg")
        assert result.exit_code == 1 and message in result.output and result.stdout == "", (key, result.output)


def test_a_file_name_with_a_newline_or_tab_cannot_forge_output_lines(model_file, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    Image.new("RGB", (30, 20), (200, 60, 60)).save(folder / "a\nfake.jpg\tsea\t1.000\t(x).jpg", "JPEG")
    (folder / "b\n.jpg").write_text("not an image")
    result = _invoke("--model", model_file, folder)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines  # one line a photo, whatever its name holds
    assert all(len(line.split("\t")) in (2, 4) for line in lines), lines
    assert any(line.startswith(str(folder / "a\\nfake.jpg\\tsea\\t1.000\\t(x).jpg") + "\t") for line in lines)
    assert any(line.startswith(str(folder / "b\\n.jpg") + "\terror: ") for line in lines)
