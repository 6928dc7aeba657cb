"""How `kd run` and `kd stage` end: the root cause as the last line, and Ctrl-C / SIGTERM that stop.

- A user error (kd_core.errors.UserError, a full disk, a stage that failed on one) ends the
  command with one line naming the stage, the message and its fix, exit 2; its traceback goes
  to a log file under ``$KD_HOME/logs`` whose path is printed. Prefect's console logs of the same
  exception lose their traceback (the log file has it); real bugs keep theirs.
- The first SIGINT or SIGTERM asks the running trainer to checkpoint and stop (one step at most);
  with no stage running it stops the flow at once. A second signal stops at once. The flow
  run's logs reach the ephemeral Prefect server before the last line (Prefect stops it at exit),
  and the exit code is 130 / 143.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from kd_core.errors import user_error_in
from kd_core.stop import STOP_REQUESTED, StopRequested, stoppable_work_running

console = Console(stderr=True)
EXIT_USER_ERROR = 2


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the flow run (Prefect records it as Crashed); a rerun resumes."""


def _shown_as_one_line(exc: BaseException | None) -> BaseException | None:
    """The exception a console line stands for: a user error or a requested stop in the chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (StopRequested, RunInterrupted)):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


class _TracebackToFile(logging.Filter):
    """On Prefect's console handler: a user error's traceback goes to the log file, not the screen."""

    def __init__(self, log_path: Path):
        super().__init__()
        self.log_path = log_path

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if user_error_in(exc) is not None or _shown_as_one_line(exc) is not None:
                _append_log(self.log_path, f"{record.name}: {record.getMessage()}", exc)
                record.exc_info, record.exc_text = None, None
        return True


def _append_log(log_path: Path, title: str, exc: BaseException) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as handle:
        handle.write(f"--- {time.strftime('%H:%M:%S')} {title}\n")
        handle.write("".join(traceback.format_exception(exc)))


def _prefect_console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    found = []
    for logger in [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
        found += [h for h in getattr(logger, "handlers", []) if isinstance(h, PrefectConsoleHandler)]
    return found


def _quiet_ephemeral_server_exit() -> None:
    """Before the command's last line: the flow run's logs and events reach the ephemeral server
    now, and Prefect's own INFO lines at exit ("Stopping temporary server") are silenced, so the
    root cause stays the last thing printed. Prefect still stops the server at exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)
    logging.getLogger("prefect").setLevel(logging.WARNING)


_SIGNAL = [signal.SIGINT]


@contextmanager
def stop_on_signals():
    """While a flow body runs: SIGINT/SIGTERM ask the running trainer to checkpoint and stop.

    Entered inside the flow, so it sits above Prefect's own SIGTERM handler; with no trainer
    running (or on a second signal) it hands the signal to that handler (Prefect then records the
    run as Crashed) or raises RunInterrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        _SIGNAL[0] = signum
        if STOP_REQUESTED.is_set() or not stoppable_work_running():
            STOP_REQUESTED.set()  # a training stage that starts later stops at its first step
            handler = previous[signum]
            if signum == signal.SIGTERM and callable(handler):
                return handler(signum, frame)
            raise RunInterrupted(f"{name}: stopped")
        STOP_REQUESTED.set()
        console.print(f"[yellow]{name}:[/] stopping the running stages (a training stage checkpoints first; "
                      f"send it again to stop at once)", soft_wrap=True)

    for signum in previous:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_exit_handlers() -> dict:
    """Outside a flow body (and when Prefect re-sends SIGTERM after recording a crash), a signal
    ends the command through ``user_facing``'s cleanup, never by the default handler, which would
    skip it and leave the ephemeral server running."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):
        _SIGNAL[0] = signum
        STOP_REQUESTED.set()
        raise RunInterrupted(f"{signal.Signals(signum).name}: stopped")

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}


def reap_orphans(home: Path) -> list[int]:
    """What a ``kill -9`` of an earlier command on this KD_HOME left: its ephemeral Prefect server
    (now a child of init) is stopped. Only servers that are ephemeral, orphaned and started for
    this KD_HOME are touched. Returns their pids."""
    import psutil

    reaped: list = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        try:
            if proc.info["ppid"] != 1 or "prefect.server.api.server:create_app" not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
            if env.get("PREFECT__SERVER_EPHEMERAL") == "1" and Path(env.get("KD_HOME", "/nonexistent")).resolve() == home.resolve():
                proc.terminate()
                reaped.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs(reaped, timeout=5)
    return [proc.pid for proc in reaped]


def log_path_for(command: str) -> Path:
    from kd_core.models.registry import kd_home

    return kd_home() / "logs" / f"kd-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def user_facing(command: str):
    """Wrap one `kd` command: signals, the log file, and the one-line ending."""
    from kd_core.models.registry import kd_home

    log_path = log_path_for(command)
    for pid in reap_orphans(kd_home()):
        console.print(f"[yellow]stopped an ephemeral Prefect server (pid {pid}) left by a killed kd command[/]")
    handlers = _prefect_console_handlers()
    traceback_filter = _TracebackToFile(log_path)
    for handler in handlers:
        handler.addFilter(traceback_filter)
    previous_handlers = _install_exit_handlers()
    try:
        yield
    except typer.Exit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every ending is decided here
        _append_log(log_path, f"kd {command}", exc)
        stopped = _shown_as_one_line(exc) if not isinstance(exc, SystemExit) else None
        if stopped is not None or isinstance(exc, KeyboardInterrupt):
            _quiet_ephemeral_server_exit()
            console.print(f"[bold yellow]stopped:[/] {stopped or exc} (log: {log_path})", soft_wrap=True)
            raise typer.Exit(128 + int(_SIGNAL[0])) from None
        user = user_error_in(exc)
        if user is not None:
            _quiet_ephemeral_server_exit()
            stage = getattr(exc, "stage", None)
            where = f"stage {stage}: " if stage else ""
            console.print(f"[bold red]error:[/] {where}{user} (traceback: {log_path})", soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        console.print(f"[bold red]bug:[/] {type(exc).__name__}: {exc} (also in {log_path})", soft_wrap=True)
        raise
    finally:
        for handler in handlers:
            handler.removeFilter(traceback_filter)
        for signum, previous in previous_handlers.items():
            signal.signal(signum, previous)
