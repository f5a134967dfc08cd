"""Run stella as a real process on a free loopback port, and read what it logged."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent

_T = TypeVar("_T")

# Every test server starts from this overlay: echo is the default, MLX stays unloaded.
NO_MLX: dict[str, Any] = {
    "models": {"default": "echo"},
    "backends": {"local": {"enabled": False}},
}


# Ports handed out by this process: never handed out twice (a test may keep one that
# must stay closed, to see a refused connection, while it starts servers).
_handed: set[int] = set()
# Below the kernel's ephemeral range (32768 and up on Linux), split between the pytest
# workers: a port one worker picked and binds a moment later is never the other's pick,
# nor a port the kernel gives a client connection meanwhile.
PORTS = range(20000, 32000)


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a port of 127.0.0.1 from this pytest worker's share of
    PORTS, kept bound: a server given it listens on a port no other process can take
    meanwhile (another test run on this machine, whose share is the same)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    index = int(worker) % count if worker.isdigit() else 0
    span = len(PORTS) // count
    first = PORTS.start + index * span
    for _ in range(1000):
        port = random.randrange(first, first + span)
        if port in _handed:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        _handed.add(port)
        return s
    raise RuntimeError(f"no free port in {first}-{first + span - 1}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, from this pytest worker's share of PORTS.
    Another process may take it before a server binds it: a server started on it is
    waited for with wait_serving, on another port when this one was taken (see
    on_free_port), or is given a loopback_socket instead."""
    with loopback_socket() as s:
        return int(s.getsockname()[1])


# How many ports a test's server is started on before its test fails: another process (a
# second test run on this machine) may take the one free_port() handed out before the
# server binds it, and the next is very likely free.
PORT_TRIES = 5


class PortTaken(Exception):
    """Another process listens on the port a test's server was started on."""


def _listening_inodes(port: int) -> set[str] | None:
    """The inodes of the sockets listening on TCP `port` (any address), or None where
    /proc does not list them (not Linux)."""
    inodes: set[str] = set()
    tables = 0
    hex_port = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for row in rows:
            if hex_port not in row:  # most rows, split no further
                continue
            # sl local_address rem_address st ... inode: an address is HEXIP:HEXPORT,
            # and state 0A is LISTEN.
            fields = row.split()
            if fields[3] == "0A" and fields[1].endswith(hex_port[:-1]):
                inodes.add(fields[9])
    return inodes if tables else None


def _holds(pid: int, sockets: set[str]) -> bool:
    """Whether process `pid` has one of these sockets (`socket:[inode]`) open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and by those, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def owns_port(pid: int, port: int) -> bool | None:
    """Whether process `pid` (or one it started: a supervisor's worker) holds the socket
    listening on TCP `port`; None where /proc does not say (not Linux)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    sockets = {f"socket:[{inode}]" for inode in inodes}
    if not sockets:
        return False
    return _holds(pid, sockets) or any(_holds(p, sockets) for p in _descendants(pid))


def wait_serving(
    proc: subprocess.Popen[Any],
    port: int,
    up: Callable[[], bool],
    timeout: float,
    what: str,
    output: Callable[[], str] = lambda: "",
) -> None:
    """Wait until `up()` (a probe of the server on `port`) is true and the answer came
    from `proc`'s server. PortTaken when another process listens on `port` (it answered
    the probe, or `proc` exited for want of the port); RuntimeError, with `output()`,
    when `proc` exits otherwise or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = output()
            # Its own line, when it says why; else whoever listens there now.
            if "address already in use" in said.lower() or _listening_inodes(port):
                raise PortTaken(f"{what} could not listen on port {port}: taken:\n{said}")
            raise RuntimeError(f"{what} exited at start:\n{said}")
        if up():
            # Another test run's server on this port answers as well as ours would.
            if owns_port(proc.pid, port) is False:
                raise PortTaken(f"another process answers on port {port}, not {what}")
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not come up:\n{output()}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """SIGTERM `proc` and wait for it; SIGKILL when it outlasts `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def on_free_port(start: Callable[[int], _T], what: str) -> _T:
    """`start(port)` on a free port (it waits with wait_serving), on another while another
    process takes the one it was given (up to PORT_TRIES ports)."""
    taken: PortTaken | None = None
    for _ in range(PORT_TRIES):
        try:
            return start(free_port())
        except PortTaken as exc:
            taken = exc
    raise RuntimeError(f"{what} found each of {PORT_TRIES} ports taken") from taken


def to_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for test configs (tables, scalars, lists, inline tables)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    def table(prefix: list[str], node: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in node.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            lines.append("[" + ".".join(json.dumps(p) for p in prefix) + "]")
        for k, v in scalars.items():
            lines.append(f"{json.dumps(k)} = {value(v)}")
        for k, v in tables.items():
            table([*prefix, k], v)

    table([], data)
    return "\n".join(lines) + "\n"


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two config dicts."""
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
        )
    return out


class LiveServer:
    """A stella process: its URL, its stdout log, and a way to stop it."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.proc = proc
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.log_path = log_path

    def lines(self) -> list[str]:
        """Every line the server wrote so far (stdout and stderr), once its log has been
        quiet for a moment while it runs."""
        # stella writes its log off the request path, handing lines to a writer thread
        # every 10 ms: a test that reads right after an answer could miss the event the
        # answer's call logged. The log's size is read until it stands still.
        if self.proc.poll() is None:
            deadline = time.monotonic() + 2.0
            size = -1
            while time.monotonic() < deadline:
                now = self.log_path.stat().st_size
                if now == size:
                    break
                size = now
                time.sleep(0.05)
        return self._read()

    def _read(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Parsed JSON log events, optionally only those named `name`."""
        return self._events(name, self.lines())

    def _events(self, name: str | None, lines: list[str]) -> list[dict[str, Any]]:
        out = []
        for line in lines:
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0, name: str = "inference"
    ) -> dict[str, Any]:
        """The first event matching `pred`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self._events(name, self._read()):  # polled: no need to wait for quiet
                if pred(ev):
                    return ev
            time.sleep(0.02)
        raise AssertionError(
            f"no matching {name} event within {timeout}s; log:\n" + "\n".join(self.lines()[-30:])
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextmanager
def run_stella(
    config: Mapping[str, Any] | None = None,
    env: Mapping[str, str | None] | None = None,
    *,
    base: Mapping[str, Any] = NO_MLX,
    args: tuple[str, ...] = (),
    ready_timeout: float = 60.0,
    check_ready: bool = True,
    stdout: int | None = None,
) -> Iterator[LiveServer]:
    """Start `python -m stella serve` with `config` overlaid (`env` over the environment,
    a None leaving a variable out); stop it afterwards. Its stdout and stderr go to the
    log file, or stdout to `stdout` (subprocess.PIPE: the test reads it from
    `server.proc.stdout`, and closes it)."""
    tmp = Path(tempfile.mkdtemp(prefix="stella-test-"))
    conf = tmp / "stella.toml"
    conf.write_text(to_toml(merge(base, config or {})))
    log_path = tmp / "server.log"

    def start(port: int) -> LiveServer:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
        full_env.update({"STELLA_CONFIG": str(conf), "PORT": str(port), "PYTHONUNBUFFERED": "1"})
        for key, value in (env or {}).items():  # None: not in its environment at all
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        with log_path.open("wb") as log:  # a new log for each try
            proc = subprocess.Popen(
                [sys.executable, "-m", "stella", "serve", "--log-format", "json", *args],
                stdout=log if stdout is None else stdout,
                stderr=subprocess.STDOUT if stdout is None else log,
                env=full_env,
                cwd=tmp,
            )
        server = LiveServer(proc, f"http://127.0.0.1:{port}", log_path)
        if check_ready:
            try:
                _wait_up(server, ready_timeout)
            except BaseException:
                server.stop()
                if server.proc.stdout is not None:
                    server.proc.stdout.close()
                raise
        return server

    # Not ready-checked, a server's start is the test's to watch: it is not started again.
    server = on_free_port(start, "stella") if check_ready else start(free_port())
    try:
        yield server
    finally:
        server.stop()
        # Kept when a test failed, for its log (pytest shows where); else removed.
        if sys.exc_info()[0] is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_up(server: LiveServer, timeout: float) -> None:
    """Wait until this server (not another process on its port) answers /health."""

    def up() -> bool:
        try:
            return httpx.get(server.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_serving(server.proc, server.port, up, timeout, "stella", lambda: "\n".join(server.lines()))


def ndjson(text: str) -> list[dict[str, Any]]:
    """Parse an NDJSON body into a list of objects."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def reasoned(path: str, stream: bool, r: httpx.Response) -> tuple[str, str, str]:
    """An answer's reasoning and text, each where the API at `path` carries it (the native
    API, chat completions, Ollama's chat and generate), and for a stream the order of its
    pieces: `r` for one with reasoning, `t` for one with text (a piece may have both)."""
    assert r.status_code == 200, r.text
    order = ""
    if not stream:
        body = r.json()
        if path == "/api/v1/chat":
            return body["message"].get("reasoning", ""), body["message"]["content"], order
        if path == "/v1/chat/completions":
            message = body["choices"][0]["message"]
            return message.get("reasoning_content", ""), message["content"], order
        if path == "/api/generate":
            return body.get("thinking", ""), body["response"], order
        return body["message"].get("thinking", ""), body["message"]["content"], order
    if path == "/v1/chat/completions":
        data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        pieces = [
            (c["choices"][0]["delta"].get("reasoning_content", ""), c["choices"][0]["delta"])
            for c in map(json.loads, data[:-1])  # the last is [DONE]
            if c["choices"]
        ]
        pieces = [(thought, delta.get("content") or "") for thought, delta in pieces]
    elif path == "/api/v1/chat":
        lines = [line for line in ndjson(r.text) if line["type"] == "delta"]
        assert all("text" in line for line in lines)  # there for a client that reads it alone
        pieces = [(line.get("reasoning", ""), line["text"]) for line in lines]
    elif path == "/api/generate":
        pieces = [(line.get("thinking", ""), line["response"]) for line in ndjson(r.text)]
    else:
        pieces = [
            (ln["message"].get("thinking", ""), ln["message"]["content"]) for ln in ndjson(r.text)
        ]
    for thought, text in pieces:
        order += ("r" if thought else "") + ("t" if text else "")
    return "".join(p[0] for p in pieces), "".join(p[1] for p in pieces), order


def install_plugin(
    where: Path, module: str, source: str, kinds: Mapping[str, str]
) -> dict[str, str]:
    """Install `source` under `where` as a distribution with these backends (kind -> class
    name), a module and its .dist-info; the environment a server needs to find it."""
    (where / f"{module}.py").write_text(source)
    dist = where / f"{module}-1.0.dist-info"
    dist.mkdir()
    name = module.replace("_", "-")
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{kind} = {module}:{cls}\n" for kind, cls in kinds.items())
    (dist / "entry_points.txt").write_text("[stella.backends]\n" + lines)
    return {"PYTHONPATH": os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")])}


# `stella` in a process where MLX cannot be imported (as on a machine without it).
_WITHOUT_MLX = (
    "import sys; sys.modules['mlx'] = sys.modules['mlx.core'] = None;"
    "from stella.cli import main; sys.exit(main(sys.argv[1:]))"
)


def stella_cli(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    without_mlx: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the `stella` command with these arguments (`without_mlx`: MLX not importable);
    its output as text."""
    command = ["-c", _WITHOUT_MLX] if without_mlx else ["-m", "stella"]
    return subprocess.run(
        [sys.executable, *command, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def wait_in_kernel(pid: int, wait: str) -> None:
    """Wait until process `pid` blocks in the kernel in a wait named like `wait` (its
    /proc wchan: "pipe_read", "poll"): a signal sent then interrupts that wait (one
    sent just before it is seen only when the wait ends, CPython's own race)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/wchan") as f:
            if wait in f.read():
                return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never waited in {wait}")


def stella_to_dev_full(
    *args: str, unbuffered: bool, env: dict[str, str] | None = None
) -> list[str]:
    """Run `stella ARGS` with stdout on /dev/full (a disk that is full); its exit code and
    stderr's lines."""
    env = {"PATH": "/usr/bin:/bin", **(env or {})}
    if unbuffered:  # each print fails at once; else the last flush does
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        out = subprocess.run(
            [sys.executable, "-m", "stella", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
        )
    return [str(out.returncode), *out.stderr.strip().splitlines()]


def stella_without_stdin(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m stella ARGS` with fd 0 closed (Python's sys.stdin is then None)."""
    return _stella_with_closed(0, args)


def in_ci() -> bool:
    """Whether this is a CI run (CI set, and not to a false value): a test there fails for
    a missing tool where a developer's run would skip it."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def stella_without_stdout(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m stella ARGS` with fd 1 closed (Python's sys.stdout is then None)."""
    return _stella_with_closed(1, args, env)


def _stella_with_closed(
    fd: int, args: tuple[str, ...], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m stella ARGS` with file descriptor `fd` closed."""
    quoted = " ".join(shlex.quote(a) for a in args)
    return subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -m stella {quoted} {fd}<&-'],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
