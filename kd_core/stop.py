"""A cooperative stop. The command line's SIGINT/SIGTERM handler (flows/console.py) sets the
flag; every long loop in kd_core (training steps, augmentation chunks, corpus documents,
evaluation batches) checks it, so a stop never waits for a stage to run to its end."""

from __future__ import annotations

import threading
from contextlib import contextmanager

STOP_REQUESTED = threading.Event()
_ACTIVE = [0]
_ACTIVE_LOCK = threading.Lock()


class StopRequested(RuntimeError):
    """Work ended early because STOP_REQUESTED was set."""


class TrainingInterrupted(StopRequested):
    """A stop was requested: the trainer checkpointed at ``step``, and a rerun resumes there."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"stopped at step {step} on request; checkpoint {checkpoint}; rerun the same command to resume")
        self.step = step
        self.checkpoint = checkpoint


def check_stop(where: str) -> None:
    if STOP_REQUESTED.is_set():
        raise StopRequested(f"{where} stopped on request; rerun the same command to continue")


@contextmanager
def stoppable():
    """Marks work that checks STOP_REQUESTED; while any runs, a stop is left to it."""
    with _ACTIVE_LOCK:
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE[0] -= 1


def stoppable_work_running() -> bool:
    return _ACTIVE[0] > 0
