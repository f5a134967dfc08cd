"""A fast CBLAS for MLX's CPU matrix products on Linux, loaded before MLX is."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

# MLX's Linux CPU wheels (mlx-cpu) bundle the reference BLAS, whose float32 matrix product
# runs ~16x slower than OpenBLAS's on one core (~30x against OpenBLAS on two): reading a
# 256-token prompt took 29 s with it and 0.9 s with OpenBLAS, and a token 0.13 s against
# 0.06. MLX calls cblas_sgemm (and LAPACK) by name, and the dynamic linker looks a name
# up in the global scope before a dlopen'd library's own dependencies: a CBLAS loaded
# RTLD_GLOBAL before MLX's library is loaded provides them. Once MLX is loaded its names
# are bound (Python loads extensions RTLD_NOW), so the choice is made once per process,
# before the first `import mlx.core`. Only float32/float64 products go through a BLAS
# (float16, bfloat16 and quantized ones run on MLX's own kernels).
OPENBLAS = ("libopenblas.so.0", "libopenblas.so")  # Debian/Ubuntu/Fedora's sonames

BUNDLED = "bundled"
# Variables that set OpenBLAS's thread count; without one stella sets it (default_threads).
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")

CGROUP_ROOT = Path("/sys/fs/cgroup")

_lock = threading.Lock()
_chosen: str | None = None  # the library in use, "" for MLX's own; None until settled
_why = ""  # why MLX's own is in use on Linux though a faster one was asked for


class BlasError(Exception):
    """A CBLAS named in the config that cannot be loaded; the message says why."""


def use_blas(choice: str) -> str:
    """Load the CBLAS `choice` names ("auto", "bundled", a library) before MLX; the one in
    use, or "" for MLX's own."""
    global _chosen
    with _lock:
        if _chosen is None:
            _chosen = _settle(choice)
        return _chosen


def why_bundled() -> str:
    """Why MLX's own (slow) BLAS is in use where a faster one was asked for, and what to
    do; "" otherwise."""
    return _why


def threads() -> int | None:
    """How many threads the CBLAS in use runs a product on, when it says (OpenBLAS)."""
    if not _chosen:
        return None
    get = getattr(ctypes.CDLL(None), "openblas_get_num_threads", None)
    return int(get()) if get is not None else None


def check(choice: str) -> str:
    """What is wrong with `choice` as a CBLAS for MLX, without making it this process's
    (`config --check`); "" when nothing."""
    if choice in ("auto", BUNDLED) or sys.platform != "linux":
        return ""
    try:
        _open(choice, 0)
    except BlasError as exc:
        return str(exc)
    return ""


def usable_cpus(root: Path | None = None) -> int:
    """The CPUs this process may use: its affinity, within the CPU quota of its cgroup
    and every one above it (a container given 2 CPUs of a 64-core node)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota(root or CGROUP_ROOT)
    if quota is not None:
        cpus = min(cpus or 1, int(quota))
    return max(1, cpus or 1)


def _cgroup_quota(root: Path) -> float | None:
    """The smallest CPU quota (in CPUs) from this process's cgroup up to the hierarchy's
    root, cgroup v2's cpu.max or v1's cfs quota; None when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        base: Path | None
        files: tuple[str, ...]
        if controllers == "":  # v2, one hierarchy at the root
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1, where its cpu controller is mounted
            base = next((root / d for d in (controllers, "cpu") if (root / d).is_dir()), None)
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if base is None:
                continue
        else:
            continue
        # Inside a cgroup namespace the path is relative to what is mounted at `root`.
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            quota = _quota_in(base.joinpath(*parts[:depth]), files)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _quota_in(where: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:  # "max 100000" or "200000 100000"
            max_text, _, period_text = (where / files[0]).read_text().partition(" ")
            return None if max_text == "max" else int(max_text) / int(period_text)
        limit, period = (int((where / f).read_text()) for f in files)
    except (OSError, ValueError):
        return None
    return limit / period if limit > 0 and period > 0 else None


def default_threads(workers: int = 1) -> int:
    """OpenBLAS threads for one of `workers` processes: its share of the usable CPUs, one
    of them left for its event loop, at least one."""
    return threads_for(usable_cpus(), workers)


def threads_for(cpus: int, workers: int) -> int:
    """A worker's share of `cpus` less one, at least one."""
    # OpenBLAS's threads wait for work spinning: more of them than free CPUs, and a
    # token took 8-10x longer on a loaded 2-core machine (a thread a CPU), ~2x with one.
    return max(1, cpus // max(1, workers) - 1)


def threads_set() -> bool:
    """Whether the environment sets OpenBLAS's thread count (0 is OpenBLAS's own default)."""
    return any(os.environ.get(v, "").strip() not in ("", "0") for v in THREAD_VARIABLES)


@contextlib.contextmanager
def _capped_threads() -> Iterator[None]:
    """OpenBLAS's thread count while the library starts, unless a variable sets it:
    OpenBLAS would start one a CPU of its affinity, blind to a cgroup quota and to the
    event loop beside it. The environment is put back after (children unaffected).
    `stella serve` sets the variables before it serves; this is for the engine run
    elsewhere (uvicorn started on the app directly, a script, the tests, bench's raw
    side), where the load's setenv may meet another thread's getenv."""
    if threads_set():
        yield
        return
    # Read when the library (and an OpenMP runtime under it) starts: a pthread build
    # reads OPENBLAS_NUM_THREADS, an OpenMP one OMP_NUM_THREADS.
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, str(default_threads())))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _recap(lib: ctypes.CDLL) -> None:
    """The same for a library already running (LD_PRELOAD): its pool made smaller."""
    current = getattr(lib, "openblas_get_num_threads", None)
    change = getattr(lib, "openblas_set_num_threads", None)
    if not threads_set() and current is not None and change is not None:
        wanted = default_threads()
        if wanted < current():
            change(wanted)


def _settle(choice: str) -> str:
    global _why
    # macOS builds use Accelerate; a CUDA build does its products on the GPU.
    if sys.platform != "linux":
        return ""
    # One already in the global scope (LD_PRELOAD, a library loaded so before) is what
    # MLX's names bind to, whatever is asked.
    present = _global_cblas()
    if present:
        _recap(ctypes.CDLL(None))
        return present
    if choice == BUNDLED:
        return ""
    if "mlx.core" in sys.modules:
        _why = (
            "MLX was loaded before stella could give it a CBLAS: start the process with "
            "LD_PRELOAD=libopenblas.so.0, or load the engine before anything imports MLX"
        )
        return ""
    if choice != "auto":
        return _load(choice)
    refused = ""  # one that is there but cannot serve (an ILP64 build)
    for name in OPENBLAS:
        try:
            return _load(name)
        except BlasError as exc:
            if not str(exc).startswith("cannot load"):
                refused = refused or str(exc)
    _why = (
        f"the system's OpenBLAS cannot serve MLX: {refused}"
        if refused
        else "no OpenBLAS found (libopenblas.so.0): install it (apt-get install "
        "libopenblas0) for float32 prompts read ~30x faster"
    )
    return ""


def _global_cblas() -> str:
    try:
        scope = ctypes.CDLL(None)
    except OSError:
        return ""
    if not hasattr(scope, "cblas_sgemm"):
        return ""
    return path_of(ctypes.cast(scope.cblas_sgemm, ctypes.c_void_p).value) or "(preloaded)"


def _open(name: str, mode: int) -> ctypes.CDLL:
    where = os.path.expanduser(name)  # as source and cache_dir are
    try:
        # Checked while local: a library refused must not be left in the global scope,
        # where MLX's names would bind to it all the same.
        lib = ctypes.CDLL(where, mode=os.RTLD_NOW | ctypes.RTLD_LOCAL)
    except OSError as exc:
        raise BlasError(f"cannot load {name!r}: {exc}") from None
    if not hasattr(lib, "cblas_sgemm"):  # a Fortran-only BLAS: MLX would not use it
        raise BlasError(f"{name!r} has no cblas_sgemm: not a CBLAS library")
    config = getattr(lib, "openblas_get_config", None)
    if config is not None:
        config.restype = ctypes.c_char_p
        if b"USE64BITINT" in (config() or b""):  # MLX passes 32-bit sizes
            raise BlasError(f"{name!r} takes 64-bit integers (ILP64); MLX needs an LP64 CBLAS")
    if mode & os.RTLD_GLOBAL:  # the same library, its names now for every later one
        lib = ctypes.CDLL(where, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    return lib


def _load(name: str) -> str:
    with _capped_threads():
        lib = _open(name, os.RTLD_GLOBAL)
    _recap(lib)
    return path_of(ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value) or name


def path_of(address: int | None) -> str:
    """The file that holds `address` in this process (a library's, its soname resolved)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, _, rest = line.partition(" ")
                low, _, high = span.partition("-")
                if int(low, 16) <= (address or 0) < int(high, 16):
                    path = rest.split(maxsplit=4)[-1].strip()
                    return path if path.startswith("/") else ""
    except (OSError, ValueError):
        pass
    return ""
