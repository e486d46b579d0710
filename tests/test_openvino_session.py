"""`edgekd classify --provider openvino|auto`: OpenVINO's CPU device gives onnxruntime's labels on real photos.

The classify runs are fresh processes: openvino is never imported beside torch (validate does the same).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgekd.errors import EdgekdError
from edgekd.export.exporter import ExportPlan, export_checkpoint
from edgekd.runtime import openvino_session

SAMPLE = Path("/work/shared/datasets/intel-sample")
if not SAMPLE.is_dir():
    SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "intel-sample"
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")


@pytest.fixture(scope="module")
def exports(distilled_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino-model")
    export_checkpoint(ExportPlan(distilled_run / "best.pt", ["int8"], out, calibration_images=12))
    return out


@pytest.fixture(scope="module")
def real_photos(tmp_path_factory):
    """40 real photos of the Intel sample (a few of each class), symlinked into one folder."""
    if not SAMPLE.is_dir():
        pytest.skip("the Intel sample is not on this machine")
    folder = tmp_path_factory.mktemp("real-photos")
    for label in sorted(p for p in (SAMPLE / "val").iterdir() if p.is_dir()):
        for photo in sorted(label.glob("*.jpg"))[:7]:
            (folder / f"{label.name}_{photo.name}").symlink_to(photo)
    return folder


def _classify(*args) -> dict[str, dict]:
    done = subprocess.run([sys.executable, "-m", "edgekd", "classify", "--json", *map(str, args)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {Path(row["file"]).name: row for row in rows}


@needs_openvino
def test_openvino_gives_onnxruntimes_labels_on_real_photos(exports, real_photos):
    fp32 = next(exports.glob("*.fp32.onnx"))
    ort = _classify("--provider", "cpu", "--model", fp32, real_photos)
    openvino = _classify("--provider", "openvino", "--model", fp32, real_photos)
    assert len(ort) == 42 and set(openvino) == set(ort)
    assert all(openvino[f]["label"] == ort[f]["label"] for f in ort)
    assert max(abs(openvino[f]["probability"] - ort[f]["probability"]) for f in ort) < 1e-4
    int8 = next(exports.glob("*.int8.onnx"))  # both runtimes run the same QDQ graph; rounding may differ
    ort8 = _classify("--provider", "cpu", "--model", int8, real_photos)
    auto8 = _classify("--model", int8, real_photos)  # auto: OpenVINO here (int8, 42 photos)
    assert sum(auto8[f]["label"] == ort8[f]["label"] for f in ort8) >= 0.9 * len(ort8)


@needs_openvino
def test_one_photo_on_auto_never_loads_openvino(exports, real_photos):
    """auto keeps onnxruntime's cold start for a single photo: openvino is not even imported."""
    int8 = next(exports.glob("*.int8.onnx"))
    photo = sorted(real_photos.iterdir())[0]
    script = (f"import sys\nfrom edgekd.cli import main\nsys.argv = ['edgekd', 'classify', '--model', {str(int8)!r}, "
              f"{str(photo)!r}]\ntry:\n    main()\nfinally:\n    print('OV', 'openvino' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OV False" in done.stderr, done.stderr


def test_auto_takes_openvino_only_for_int8_files_and_enough_photos(monkeypatch):
    monkeypatch.setattr(openvino_session, "openvino_installed", lambda: True)
    monkeypatch.setattr(openvino_session.platform, "machine", lambda: "x86_64")
    precision = {"a.int8.onnx": "int8", "a.fp32.onnx": "fp32"}
    monkeypatch.setattr(openvino_session, "file_precision", lambda path: precision[str(path)])
    many = openvino_session.AUTO_OPENVINO_FROM
    assert openvino_session.auto_provider(1, "a.int8.onnx") == "cpu"
    assert openvino_session.auto_provider(many, "a.int8.onnx") == "openvino"
    assert openvino_session.auto_provider(many, "a.fp32.onnx") == "cpu"
    monkeypatch.setattr(openvino_session.platform, "machine", lambda: "aarch64")
    assert openvino_session.auto_provider(many, "a.int8.onnx") == "cpu"
    monkeypatch.setattr(openvino_session.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(openvino_session, "openvino_installed", lambda: False)
    assert openvino_session.auto_provider(many, "a.int8.onnx") == "cpu"


def test_openvino_missing_is_one_clear_error(exports, monkeypatch):
    import edgekd.classify as classify

    monkeypatch.setattr(classify, "openvino_installed", lambda: False)
    with pytest.raises(EdgekdError) as error:
        classify.ExportedModel(next(exports.glob("*.int8.onnx")), "openvino")
    assert "no openvino runtime" in error.value.message and "pip install openvino" in error.value.hint
