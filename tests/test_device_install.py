"""The device install: the wheel alone (numpy, Pillow, onnxruntime, click, PyYAML; no torch) in a fresh venv.

Builds the wheel from a copy of the sources, installs it into a new virtual environment (its dependencies
from the package index pip is configured with), classifies a photo there, and checks that every training
command answers with the install hint. About 20-40 s, most of it pip.
"""

import os
import shutil
import subprocess
import sys
import venv

import pytest
from PIL import Image

from conftest import REPO
from edgekd.cli import TRAINING_COMMANDS
from edgekd.export import ExportPlan, export_checkpoint

# The venv sees only what was installed into it: not this checkout (PYTHONPATH) nor another venv.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
OFFLINE = ("No matching distribution", "Could not find a version", "Failed to establish a new connection",
           "Temporary failure in name resolution", "Network is unreachable")


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("device")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "edgekd", source / "edgekd", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(base / "dist")], check=True, timeout=300)
    wheel = next((base / "dist").glob("edgekd-*.whl"))
    venv.create(base / "venv", with_pip=True)
    python = base / "venv" / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                          timeout=600, env=CLEAN_ENV)
    if done.returncode and any(sign in done.stderr for sign in OFFLINE):
        pytest.skip(f"the wheel's dependencies cannot be installed here (no package index): {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    return base / "venv" / "bin"


def _run(bin_dir, *args):
    return subprocess.run([str(bin_dir / "edgekd"), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=CLEAN_ENV)


def test_the_wheel_installs_without_torch_and_classifies_a_photo(device_venv, distilled_run, tmp_path):
    missing = subprocess.run([str(device_venv / "python"), "-c", "import torch"], capture_output=True, text=True,
                             env=CLEAN_ENV)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    export_checkpoint(ExportPlan(distilled_run / "best.pt", ["int8"], tmp_path, calibration_images=12))
    photo = tmp_path / "red.jpg"
    Image.new("RGB", (40, 30), (200, 60, 60)).save(photo)
    done = _run(device_venv, "classify", "--model", tmp_path / "tiny_student.int8.onnx", photo)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\t")[1] in ("buildings", "forest", "sea")


def test_training_commands_there_exit_1_with_the_install_hint(device_venv, tmp_path):
    (tmp_path / "r.yaml").write_text("name: r\n")
    for command in sorted(TRAINING_COMMANDS):
        done = _run(device_venv, command, tmp_path / "r.yaml")
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "pip install 'edgekd[train]'" in done.stderr and "Traceback" not in done.stderr, command
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    listing = {line.split()[0]: line for line in _run(device_venv, "--help").stdout.splitlines()
               if line.startswith("  ") and not line.startswith("   ")}
    assert "[train extra]" in listing["train"] and "[train extra]" not in listing["classify"]
    assert _run(device_venv, "train", "--help").returncode == 0


def test_doctor_there_reports_the_machine_and_what_training_needs(device_venv):
    import json

    done = _run(device_venv, "doctor", "--json")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert report["torch"]["version"] is None and "pip install 'edgekd[train]'" in report["torch"]["missing"]
    assert report["onnxruntime"]["version"] and report["cpu"]
    assert _run(device_venv, "doctor").returncode == 0
