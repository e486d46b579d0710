"""onnxruntime sessions for edgekd exports: provider choice, metadata, batched logits. No torch."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgekd.errors import EdgekdError
from edgekd.runtime.model_info import ModelInfo, NotAnEdgekdModel, model_info_from_metadata

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def available_providers() -> list[str]:
    """Short names (cpu, cuda, tensorrt) of the providers this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [short for short, name in PROVIDERS.items() if name in offered]


def check_model_file(path: str | Path) -> Path:
    """`path` if it is a readable, non-empty regular file; one clear EdgekdError otherwise.

    onnxruntime opens whatever it is given: a named pipe blocks it forever, and a directory, a symlink loop
    or an unreadable file come back as numbered system errors. The file is opened without blocking and
    checked through that open descriptor, so a pipe put in its place between the check and the open
    cannot hang this either.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _not_a_model(path, _open_failure(path, exc)) from exc
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_model(path, f"is {_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not a model file")
    if info.st_size == 0:
        raise _not_a_model(path, "is an empty file")
    return path


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _open_failure(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"is a symlink to a missing file ({os.readlink(path)})" if path.is_symlink() else "does not exist"
    reasons = {errno.ELOOP: "is a symlink loop", errno.EACCES: "cannot be read (permission denied)",
               errno.EPERM: "cannot be read (permission denied)", errno.EISDIR: "is a directory",
               errno.ENOTDIR: "does not exist (a part of its path is a file)"}
    if exc.errno in reasons:
        return reasons[exc.errno]
    try:  # a socket or a device opens with errors of its own (ENXIO, ENODEV): name what it is instead
        kind = _KINDS.get(stat.S_IFMT(os.stat(path).st_mode))
    except OSError:
        kind = None
    return f"is {kind}, not a model file" if kind else f"cannot be opened ({exc.strerror or exc})"


def _not_a_model(path: Path, reason: str) -> EdgekdError:
    return EdgekdError(f"model {path} {reason}", hint="pass an .onnx file written by `edgekd export`")


def open_session(path: str | Path, provider: str = "cpu", threads: int | None = None,
                 spinning: bool = True) -> ort.InferenceSession:
    """A session on `provider` (falling back to CPU for nodes it lacks).

    `spinning=False` lets idle intra-op threads sleep instead of busy-waiting for the next run: on a CPU
    shared with decoding threads or other jobs, spinning takes the cores they need (measured on 2 cores:
    session start and first run 2x faster without it). A path that is not a regular file is refused
    (check_model_file) before onnxruntime sees it.
    """
    check_model_file(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are noise to users
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), options, providers=providers)


def session_model_info(session: ort.InferenceSession, source: str) -> ModelInfo:
    try:
        metadata = dict(session.get_modelmeta().custom_metadata_map)
    except UnicodeDecodeError as exc:  # onnxruntime decodes metadata keys/values as UTF-8: a damaged byte
        raise NotAnEdgekdModel(f"{source}: its metadata is damaged (not UTF-8 at byte {exc.start})") from exc
    return model_info_from_metadata(metadata, source)


def as_input(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB → the (N, 3, H, W) float32 0-255 tensor edgekd models take."""
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)


def run_logits(session: ort.InferenceSession, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: as_input(pixels[i:i + batch_size])})[0]
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out).astype(np.float32)
