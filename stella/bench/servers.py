"""Start the processes a benchmark compares, each on a free loopback port."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from stella.bench.loadgen import BenchError, inband_error


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process now (or `field`="VmHWM": its peak) from Linux /proc; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory a process has had (its high-water mark), or 0 if unknown."""
    return rss_bytes(pid, "VmHWM")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a process has used (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Proc:
    """A started server: its URL, PID and start-up time."""

    def __init__(
        self, popen: subprocess.Popen[bytes], url: str, started_s: float, log: Any = None
    ) -> None:
        self.popen = popen
        self.url = url
        self.started_s = started_s
        self._log = log

    def log_events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log events called `name` that the server has written so far."""
        if self._log is None:
            return []
        self._log.seek(0)
        out = []
        for line in self._log.read().splitlines():
            if line.startswith(b"{") and b'"event":"' + name.encode() + b'"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    @property
    def pid(self) -> int:
        """The server's PID."""
        return self.popen.pid

    def rss(self) -> int:
        """Its resident memory now."""
        return rss_bytes(self.popen.pid)


def _find_prctl() -> Any:
    """libc's prctl, looked up in the parent so that the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1
_prctl = _find_prctl()
_parent = os.getpid()  # the process that will fork the children


def die_with_parent() -> None:
    """In a child before exec: be killed when the bench process dies, however it dies (Linux)."""
    # A SIGKILLed bench runs no cleanup; without this its servers would live on,
    # re-parented to PID 1, still listening and pinned to a core.
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _parent:  # the bench died before prctl took hold
        os._exit(1)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A benchmarked process's environment: the caller's without stella's settings, plus `env`."""
    # A STELLA_API_KEYS or PORT exported in the caller's shell would otherwise reach
    # every server and measure 401s or the wrong port instead of the setup compared.
    # STELLA_CACHE_DIR only says where model files are: the MLX bench needs it.
    keep = {k: v for k, v in os.environ.items() if not is_setting(k)}
    return {**keep, **(env or {})}


# The signal a running bench was asked to stop with (0: none; see commands.bench). The
# handler raises SystemExit at once, but an exception raised while a finalizer (a
# __del__) runs is printed and dropped by Python: the bench's steps check this too, so
# such a signal still stops it, at the next step.
stop_requested = 0


def check_stop() -> None:
    """End the bench here (SystemExit, 128 + the signal) if a signal asked it to stop."""
    if stop_requested:
        raise SystemExit(128 + stop_requested)


def is_setting(name: str) -> bool:
    """Whether an environment variable configures stella (STELLA_CACHE_DIR only locates files)."""
    return (name.startswith("STELLA_") and name != "STELLA_CACHE_DIR") or name == "PORT"


@contextmanager
def spawn(
    args: list[str],
    *,
    port: int,
    env: Mapping[str, str] | None = None,
    cpu: int | None = None,
    ready_path: str = "/health",
    timeout: float = 60.0,
) -> Iterator[Proc]:
    """Run `args` in `child_env(env)` until the port answers `ready_path`; stop it (by PID) after."""
    full_env = child_env(env)
    log = tempfile.TemporaryFile()

    def pin() -> None:
        die_with_parent()
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu})

    t0 = time.perf_counter()
    popen = subprocess.Popen(
        args, env=full_env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = t0 + timeout
        # One client for the polls: each new one builds an SSL context (~55 ms of CPU).
        with httpx.Client(timeout=1) as client:
            while True:
                check_stop()
                if popen.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(
                        f"{args[0]} exited: {log.read().decode(errors='replace')[-2000:]}"
                    )
                try:
                    if client.get(url + ready_path).status_code < 500:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{' '.join(args)} did not start")
                time.sleep(0.02)
        yield Proc(popen, url, time.perf_counter() - t0, log)
    finally:
        end(popen, 20)
        log.close()


def end(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """Stop a process this bench started: SIGTERM, then SIGKILL after `grace_s`."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def sample(url: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
    """The body of one POST to `url`; a BenchError unless it was answered with a 200."""
    r = httpx.post(
        url,
        content=body,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=30,
    )
    if r.status_code != 200 or inband_error(r.content):
        text = " ".join(r.text.split())[:200]
        raise BenchError(f"{url} answered {r.status_code} to a sample request: {text}")
    return r.content


def uvicorn_args(
    app: str, port: int, *, factory: bool = False, http: str = "httptools"
) -> list[str]:
    """uvicorn with uvloop and httptools (or `http`), one worker, no access log."""
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        http,
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return [*args, "--factory"] if factory else args


def stella_args(port: int) -> list[str]:
    """`stella serve` on a port."""
    return [
        sys.executable,
        "-m",
        "stella",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-format",
        "json",
    ]
