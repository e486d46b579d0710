"""Ctrl-C (SIGINT) and SIGTERM (`kill`, `docker stop`, `timeout`, a cluster preempting the job) as requests
to stop training, so that stopping loses nothing.

While the epoch loop runs, the first signal only asks: the loop finishes the batch in hand, saves the
training state at that batch, and raises Stopped; `--resume` then continues from that very batch. A second
signal stops at once (a step that hangs still answers Ctrl-C), and so does any signal before the loop starts
(there is nothing to save yet). A signal the process was started ignoring (`nohup`, a script's `&`) stays
ignored.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal; `saved` says where the saved state stands (None: only the last save)."""

    def __init__(self, signum: int, saved: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    def __init__(self) -> None:
        self.requested: int | None = None  # the first signal received while the loop listened
        self.listening = False  # set by the loop while it can stop at a batch boundary

    def handle(self, signum: int, frame) -> None:
        if self.listening and self.requested is None:
            self.requested = signum
            log.warning("%s received: stopping after this batch, once the training state is saved "
                        "(send it again to stop at once)", signal.Signals(signum).name)
            return
        raise Stopped(signum)

    def stopped(self, saved: str) -> Stopped:
        return Stopped(self.requested or signal.SIGTERM, saved)  # under DDP another rank may have heard it


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGINT and SIGTERM handled by a StopSignals for the block (main thread only; elsewhere unhandled)."""
    stops = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, stops.handle)
    try:
        yield stops
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
