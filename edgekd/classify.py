"""`edgekd classify`: photos → labels with an exported model, on the device.

Imports only numpy, Pillow and onnxruntime (through runtime/): a device needs `pip install edgekd`, one
.onnx file, and nothing of torch. Preprocessing comes from the model's own metadata.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.runtime.model_info import ModelInfo, NotAnEdgekdModel
from edgekd.runtime.openvino_session import OpenVINOSession, auto_provider, openvino_installed
from edgekd.runtime.preprocess import IMAGE_SUFFIXES, RESIZE_METHOD, ImageDecodeError, load_rgb
from edgekd.runtime.session import (as_input, available_providers, check_model_file, open_session,
                                    session_model_info)

log = logging.getLogger(__name__)

# Which exported variant suits a provider best, most preferred first.
PREFERRED = {"cpu": ("int8", "fp32", "fp8", "fp16"), "cuda": ("fp16", "fp32", "int8", "fp8"),
             "tensorrt": ("fp16", "int8", "fp32", "fp8"), "openvino": ("int8", "fp32", "fp16", "fp8")}


@dataclass
class Prediction:
    file: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"file": self.file, "label": self.label, "probability": self.probability,
                "top_k": [{"label": label, "probability": p} for label, p in self.top_k]}


@dataclass
class Failure:
    file: str
    error: str

    def to_dict(self) -> dict:
        return {"file": self.file, "error": self.error}


@dataclass
class ExportedModel:
    """An exported model loaded in onnxruntime, with the preprocessing its metadata describes."""

    path: Path
    provider: str = "cpu"
    threads: int | None = None  # onnxruntime threads per batch; default 1: batches run side by side instead
    info: ModelInfo = field(init=False)

    def __post_init__(self) -> None:
        check_model_file(self.path)  # before any runtime opens it: a named pipe would block it forever
        offered = available_providers() + (["openvino"] if openvino_installed() else [])
        if self.provider not in offered:
            raise EdgekdError(f"there is no {self.provider} runtime here" if self.provider == "openvino" else
                              f"onnxruntime here has no {self.provider} provider",
                              hint=f"available: {', '.join(offered)}" +
                                   ("; pip install openvino" if self.provider == "openvino" else ""))
        runtime = "OpenVINO" if self.provider == "openvino" else "onnxruntime"
        try:
            self.session = (OpenVINOSession(self.path, self.threads or _usable_cores())
                            if self.provider == "openvino" else
                            open_session(self.path, self.provider, self.session_threads, spinning=False))
        except Exception as exc:  # both runtimes raise their own exception types for unreadable files
            raise EdgekdError(f"{self.path}: {runtime} cannot load it ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from exc
        try:
            self.info = session_model_info(self.session, str(self.path))
        except NotAnEdgekdModel as exc:
            raise EdgekdError(str(exc), hint="re-export the model with `edgekd export`") from exc
        if self.info.resize != RESIZE_METHOD:
            raise EdgekdError(f"{self.path}: resize method {self.info.resize!r} is unknown to this edgekd",
                              hint="upgrade edgekd")
        self._check_metadata_fits_graph()

    @property
    def session_threads(self) -> int:
        return self.threads or 1

    def _check_metadata_fits_graph(self) -> None:
        """The metadata must describe this graph: its input name, image size and number of classes."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        size, classes = self.info.image_size, len(self.info.class_names)
        problem = None
        if self.info.input_name not in inputs:
            problem = f"names input {self.info.input_name!r}, the graph takes {', '.join(inputs)}"
        elif [d for d in inputs[self.info.input_name][1:] if isinstance(d, int)] not in ([3, size, size], [3], []):
            problem = f"says {size}px RGB, the graph takes {inputs[self.info.input_name]}"
        else:
            out = self.session.get_outputs()[0].shape
            if out and isinstance(out[-1], int) and out[-1] != classes:
                problem = f"lists {classes} classes, the graph outputs {out[-1]}"
        if problem:
            raise EdgekdError(f"{self.path}: its edgekd metadata does not fit the model: it {problem}",
                              hint="re-export the model with `edgekd export`")

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        try:
            raw = self.session.run(None, {self.info.input_name: as_input(pixels)})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise EdgekdError(f"{self.path}: the model failed to run ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from exc
        self._check_outputs(raw, len(pixels))
        logits = raw.astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def _check_outputs(self, raw: np.ndarray, images: int) -> None:
        """Pixels are always bounded, so logits of the wrong shape or NaN/inf mean a broken model, not a bad
        photo: refuse it rather than print `nan` as a probability."""
        classes = len(self.info.class_names)
        if raw.shape != (images, classes):
            raise EdgekdError(f"{self.path}: the model returned logits of shape {list(raw.shape)} for {images} "
                              f"photo(s), its metadata lists {classes} classes",
                              hint="re-export the model with `edgekd export`")
        if not np.isfinite(raw).all():
            bad = int((~np.isfinite(raw)).any(axis=1).sum())
            raise EdgekdError(f"{self.path}: the model's output is not finite (NaN or inf) for {bad} photo(s) "
                              f"of a batch of {images}: the model is broken",
                              hint="a model trained to NaN loss or exported from NaN weights cannot classify; "
                                   "retrain (e.g. with a lower train.lr) and export again")

    def classify(self, files: list[Path], top_k: int = 3, batch_size: int = 16,
                 workers: int | None = None) -> Iterator[Prediction | Failure]:
        """One result per file, in order; unreadable files become Failures and do not stop the rest.

        Batches are classified side by side, `workers` at a time (default: usable cores divided by the
        onnxruntime threads of one batch). While one worker decodes its batch the others run the model:
        Pillow and onnxruntime both release Python's lock, and no core waits for another's share of a
        batch. Every batch goes through `classify_batch`, so the results equal one-by-one classification.
        """
        batches = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
        if len(files) <= 1:  # one photo: starting threads would only lengthen the cold start
            yield from (result for batch in batches for result in self.classify_batch(batch, top_k))
            return
        workers = workers or max(1, _usable_cores() // self.session_threads)
        yield from _in_order(self.classify_batch, batches, top_k, workers)

    def classify_batch(self, files: list[Path], top_k: int = 3) -> list[Prediction | Failure]:
        """The files decoded one after another in this thread, then one run of the model."""
        decoded = [self.decode(path) for path in files]
        pixels = [item for item in decoded if not isinstance(item, Failure)]
        rows = iter(self.probabilities(np.stack(pixels)) if pixels else ())
        return [item if isinstance(item, Failure) else self._prediction(str(path), next(rows), top_k)
                for path, item in zip(files, decoded)]

    def decode(self, path: Path) -> np.ndarray | Failure:
        """The one way classify prepares a photo: training's preprocessing, JPEG draft where harmless."""
        try:
            return load_rgb(path, self.info.image_size, draft=True)
        except ImageDecodeError as exc:
            return Failure(str(path), str(exc))

    def _prediction(self, file: str, probs: np.ndarray, top_k: int) -> Prediction:
        order = np.argsort(-probs)[:max(1, top_k)]
        names = self.info.class_names
        return Prediction(file, names[order[0]], float(probs[order[0]]),
                          [(names[j], float(probs[j])) for j in order])


def _usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _in_order(classify_batch, batches: list[list[Path]], top_k: int,
              workers: int) -> Iterator[Prediction | Failure]:
    """classify_batch over the batches in `workers` threads, a few batches ahead, results in order."""
    from concurrent.futures import ThreadPoolExecutor  # imported here: a single photo never needs it

    pool = ThreadPoolExecutor(workers, thread_name_prefix="edgekd-classify")
    in_flight: deque = deque()
    try:
        for batch in batches:
            in_flight.append(pool.submit(classify_batch, batch, top_k))
            if len(in_flight) > workers:  # one batch more than workers: none waits for the reader
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()
    finally:  # on an error or Ctrl-C, finish only the batches already running
        pool.shutdown(wait=True, cancel_futures=True)


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files as given (missing ones too: they fail later with a clear line); folders → their images.

    Nothing to classify at all is an error, so an empty or mistyped folder never passes as success."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not found and len(paths) > 1:
                log.warning("%s holds no photos", path)
            files += found
        else:
            files.append(path)
    if not files:
        raise EdgekdError(f"no photos in {', '.join(paths)}",
                          hint=f"pass image files, or folders holding {', '.join(sorted(IMAGE_SUFFIXES))} files")
    return files


def newest_export(root: Path, provider: str) -> Path:
    """The newest export under artifacts/, in the variant that suits the provider."""
    found = {path: _regular_file_mtime(path) for path in root.glob("*/exports/*.onnx")}
    exports = sorted((p for p, mtime in found.items() if mtime is not None), key=found.__getitem__)
    if not exports:
        skipped = sorted(str(p) for p, mtime in found.items() if mtime is None)
        raise EdgekdError(f"no exported model under {root}/" + (f" (skipped, not regular files: "
                                                                f"{', '.join(skipped)})" if skipped else ""),
                          hint="run `edgekd export --int8` first, or pass --model FILE")
    newest_dir = exports[-1].parent
    by_precision = {p.name.rsplit(".", 2)[-2]: p for p in exports if p.parent == newest_dir}
    for precision in PREFERRED[provider]:
        if precision in by_precision:
            return by_precision[precision]
    return exports[-1]


def _regular_file_mtime(path: Path) -> float | None:
    """A file's modification time; None (and a warning) for what is not a regular file: a named pipe, a
    directory, a dangling link or a link loop named *.onnx must not be chosen, nor crash the lookup."""
    try:
        info = path.stat()
    except OSError as exc:
        log.warning("skipping %s: %s", path, exc.strerror or exc)
        return None
    if not stat.S_ISREG(info.st_mode):
        log.warning("skipping %s: not a regular file", path)
        return None
    return info.st_mtime


def open_exported(path: Path, provider: str, threads: int | None, photos: int) -> ExportedModel:
    """The model on `provider`; `auto` takes OpenVINO for a folder where it is installed and faster
    (runtime/openvino_session.auto_provider), and onnxruntime's CPU provider when OpenVINO cannot load the file."""
    if provider != "auto":
        return ExportedModel(path, provider, threads)
    chosen = auto_provider(photos, path)
    if chosen == "openvino":
        try:
            return ExportedModel(path, "openvino", threads)
        except EdgekdError as exc:
            log.warning("OpenVINO cannot run %s (%s); classifying with onnxruntime", path, exc.message)
    return ExportedModel(path, "cpu", threads)
