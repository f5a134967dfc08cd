"""The supervisor of `stella serve` with several workers, and each worker's app."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from stella import logs

# `stella serve`'s command-line overrides, as JSON, for its workers: each worker reads
# the configuration again, and a flag must win there as it did in `stella serve` (over
# PORT too, which wins over any STELLA_SERVER__PORT).
FLAGS_VARIABLE = "STELLA_SERVE_FLAGS"
# A worker whose configuration is bad exits as `stella serve` does.
CONFIG_ERROR = 2
# Workers that die in one place before they ever serve, in a row, before the server
# stops (a crash at start-up, not a fluke such as two models loading out of memory).
MAX_FAILED_STARTS = 3
_PR_SET_PDEATHSIG = 1


def _stdout_lock() -> tuple[int, str] | None:
    """The file whose lock the processes of this server take around each write to their
    one stdout, and the path a worker opens it by (its descriptor and that path); None
    where there is none to make (stdout is then written unlocked)."""
    # An anonymous file in memory, opened by its /proc path: no directory it needs to
    # be written in (a read-only root, no /tmp), none it is left in when the supervisor
    # is killed, none a cleaner can delete it from while the workers run. Each opening
    # is a description of its own, as flock needs to keep processes apart.
    try:
        fd = os.memfd_create("stella-stdout-lock", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux
        return None
    path = f"/proc/{os.getpid()}/fd/{fd}"
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError:  # no /proc to reach it by
        os.close(fd)
        return None
    return fd, path


def pass_flags(overrides: Mapping[str, Any]) -> None:
    """Hand the command line's overrides to the workers about to be started."""
    os.environ[FLAGS_VARIABLE] = json.dumps(overrides)


def worker_app() -> Any:
    """The app of one worker: the configuration read again, `stella serve`'s flags on top;
    a bad configuration is one line and exit 2 (the supervisor then stops)."""
    from stella.app import create_app
    from stella.backends import ConfigError
    from stella.settings import blamed, load_settings

    die_with_supervisor()
    overrides = json.loads(os.environ.get(FLAGS_VARIABLE) or "{}")
    try:
        return create_app(load_settings(overrides))
    except ConfigError as exc:
        print(f"stella: config error: {blamed(exc, overrides)}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_ERROR) from None


def die_with_supervisor() -> None:
    """In a worker: get SIGTERM (and drain) when the supervisor dies, however it dies (Linux)."""
    # A SIGKILLed supervisor runs no cleanup: its workers would go on serving, orphans
    # nobody restarts or stops, holding the port.
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent.pid:  # it died before the signal was asked for
        raise SystemExit(0)


class Worker(Process):
    """A uvicorn worker that tells its supervisor, through shared memory, once it serves:
    the supervisor's health check comes every half second, and a worker can die between
    its start and the next one."""

    def __init__(self, config: Any, sockets: list[Any]) -> None:
        # Made before the process: a shared value crosses to it only as it is spawned.
        self.serving = multiprocessing.get_context("spawn").RawValue("b", 0)
        super().__init__(config, sockets)

    def target(self, sockets: list[Any] | None = None) -> None:  # pragma: no cover
        """In the worker: serve, and set `serving` once the server has started."""
        server = self.server
        threading.Thread(target=self._tell, args=(server,), daemon=True).start()
        super().target(sockets)

    def _tell(self, server: Any) -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            self.serving.value = 1


class SignalWakeEvent(threading.Event):
    """An Event whose wait, in the main thread, ends as soon as a signal arrives there
    or it is set, not only at its timeout; within `woken()`."""

    def __init__(self) -> None:
        super().__init__()
        self._pipe: tuple[int, int] | None = None

    @contextlib.contextmanager
    def woken(self) -> Iterator[None]:
        """While inside: a signal handled by Python wakes `wait` (signal.set_wakeup_fd)."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._pipe = (r, w)
        try:
            yield
        finally:
            signal.set_wakeup_fd(old)
            self._pipe = None
            os.close(r)
            os.close(w)

    def set(self) -> None:
        """Set the flag and wake a wait in progress."""
        super().set()
        if (pipe := self._pipe) is not None:
            with contextlib.suppress(OSError):
                os.write(pipe[1], b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set, a signal, or `timeout`; whether the flag is set."""
        pipe = self._pipe
        if (
            pipe is None
            or self.is_set()
            or threading.current_thread() is not threading.main_thread()
        ):
            return super().wait(timeout)
        # The byte a signal writes stays in the pipe until read: one that came just
        # before this wait ends it at once, as one during it does.
        select.select([pipe[0]], [], [], timeout)
        with contextlib.suppress(OSError):
            while os.read(pipe[0], 512):
                pass
        return self.is_set()


class Workers(Multiprocess):
    """uvicorn's worker supervisor, answering signals at once, letting go of the
    listening socket at shutdown, saying when a worker died, and stopping when one
    cannot start.

    Each worker closes its copy of the socket as it starts draining; the
    supervisor's copy kept it listening, so new connections queued where nobody
    would accept them, then were reset. With it closed too they are refused at
    once, as with one worker, and a load balancer tries another replica.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # 0, or the exit code of the worker that could not start (2: its configuration).
        self.exit_code = 0
        # Per place in `processes`, how many workers in a row died there before they
        # ever served.
        self._failed_starts: dict[int, int] = {}
        # uvicorn makes its workers (at start, on SIGHUP, on SIGTTIN) from this module
        # name: this process supervises, nothing else in it makes uvicorn workers.
        multiprocess.Process = Worker  # type: ignore[misc]
        # uvicorn's loop looks at the signals it queued once per `should_exit.wait(0.5)`:
        # a SIGTERM would go unanswered, the port still taking connections, for up to
        # half a second. Woken by the signal, it is handled at once.
        self._woken = SignalWakeEvent()
        self.should_exit = self._woken

    def run(self) -> None:
        """Supervise the workers until told to stop, their stdout lines kept whole."""
        # One stdout for all: each process takes this file's lock around each write to
        # it (stella.logs), so no worker's line lands inside another's.
        lock = _stdout_lock()
        if lock is not None:
            os.environ[logs.STDOUT_LOCK_VARIABLE] = lock[1]
            if (sink := logs.sink()) is not None:
                sink.share_stdout(lock[1])  # its own lines (worker_died) too
        try:
            with self._woken.woken():
                super().run()
        finally:
            os.environ.pop(logs.STDOUT_LOCK_VARIABLE, None)
            if lock is not None:
                with contextlib.suppress(OSError):
                    os.close(lock[0])

    def terminate_all(self) -> None:
        """Tell every worker to stop, then stop listening."""
        super().terminate_all()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def keep_subprocess_alive(self) -> None:
        """Replace a worker that died (a warning says so); stop all when one cannot start."""
        # uvicorn's own restarts a dead worker with an INFO line only, and restarts one
        # whose configuration is bad forever (it stops only on its STARTUP_FAILURE).
        if self.should_exit.is_set():
            return
        log = logs.get_logger()
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            hung = process.process.is_alive()  # running, but no answer to the health check
            process.kill()
            process.join()
            code = process.exitcode
            served = isinstance(process, Worker) and bool(process.serving.value)
            how: dict[str, Any] = {"exit_code": code}
            if code is not None and code < 0:
                with contextlib.suppress(ValueError):
                    how = {"signal": signal.Signals(-code).name}
            failed = 0 if served else self._failed_starts.get(idx, 0) + 1
            self._failed_starts[idx] = failed
            if code in (CONFIG_ERROR, STARTUP_FAILURE) or failed >= MAX_FAILED_STARTS:
                # It would fail the same way on every restart (a worker crashing before
                # it serves, again and again, as one whose start fails). A config error
                # was said in one line by the worker; the rest is said here.
                if code != CONFIG_ERROR:
                    log.error(
                        "worker_failed",
                        pid=process.pid,
                        **how,
                        failed_starts=failed,
                        detail="stopping the server",
                    )
                self.exit_code = (
                    code if code in (CONFIG_ERROR, STARTUP_FAILURE) else STARTUP_FAILURE
                )
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning(
                "worker_died",
                pid=process.pid,
                hung=hung,
                **how,
                served=served,
                detail="restarting it",
            )
            replacement = Worker(self.config, self.sockets)
            replacement.start()
            self.processes[idx] = replacement
