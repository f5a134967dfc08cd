"""A fast CBLAS for MLX's CPU matrix products on Linux, loaded before MLX is."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
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
# Variables that set OpenBLAS's thread count; without one stella sets it (usable_cpus).
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")

_lock = threading.Lock()
_chosen: str | None = None  # the library in use, "" for MLX's own; None until settled
_why = ""  # why MLX's own is in use on Linux though a faster one was asked for


class BlasError(Exception):
    """A CBLAS named in the config that cannot be loaded; the message says why."""


def use_blas(choice: str) -> str:
    """Load the CBLAS `choice` names before MLX ("auto", "bundled" or a library); the one in use, or ""."""
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
        _open(choice, ctypes.RTLD_LOCAL)
    except BlasError as exc:
        return str(exc)
    return ""


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, within its cgroup's CPU quota (a
    container limited to 2 CPUs on a 64-core node)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota(cgroup)
    return max(1, min(cpus or 1, int(quota) if quota else cpus or 1))


def _cgroup_quota(root: Path) -> float | None:
    """CPUs the cgroup v2 cpu.max (or v1 cfs quota) allows, None when unlimited/unknown."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        own = []
    v2 = [line.partition("::")[2] for line in own if line.startswith("0::")]
    for where in ([root / v2[0].lstrip("/")] if v2 else []) + [root]:
        try:
            limit, _, period = (where / "cpu.max").read_text().partition(" ")
            return None if limit == "max" else int(limit) / int(period)
        except (OSError, ValueError):
            continue
    try:
        limit = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return limit / period if limit > 0 and period > 0 else None


def _settle(choice: str) -> str:
    global _why
    # macOS builds use Accelerate; a CUDA build does its products on the GPU.
    if sys.platform != "linux":
        return ""
    # One already in the global scope (LD_PRELOAD, a library loaded so before) is what
    # MLX's names bind to, whatever is asked.
    present = _global_cblas()
    if present or choice == BUNDLED:
        return present
    if "mlx.core" in sys.modules:
        _why = (
            "MLX was loaded before stella could give it a CBLAS: start the process with "
            "LD_PRELOAD=libopenblas.so.0, or load the engine before anything imports MLX"
        )
        return ""
    if choice != "auto":
        return _load(choice)
    for name in OPENBLAS:
        try:
            return _load(name)
        except BlasError:
            continue
    _why = (
        "no OpenBLAS found (libopenblas.so.0): install it (apt-get install libopenblas0) "
        "for float32 prompts read ~30x faster"
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
        lib = ctypes.CDLL(where, mode=os.RTLD_NOW | mode)
    except OSError as exc:
        raise BlasError(f"cannot load {name!r}: {exc}") from None
    if not hasattr(lib, "cblas_sgemm"):  # a Fortran-only BLAS: MLX would not use it
        raise BlasError(f"{name!r} has no cblas_sgemm: not a CBLAS library")
    config = getattr(lib, "openblas_get_config", None)
    if config is not None:
        config.restype = ctypes.c_char_p
        if b"USE64BITINT" in (config() or b""):  # MLX passes 32-bit sizes
            raise BlasError(f"{name!r} takes 64-bit integers (ILP64); MLX needs an LP64 CBLAS")
    return lib


def _load(name: str) -> str:
    lib = _open(name, os.RTLD_GLOBAL)
    if not any(os.environ.get(v) for v in THREAD_VARIABLES):
        # OpenBLAS starts a thread per CPU of its affinity; a cgroup quota (a container
        # given 2 CPUs of a large node) it does not see: its threads would be throttled.
        current = getattr(lib, "openblas_get_num_threads", None)
        change = getattr(lib, "openblas_set_num_threads", None)
        if current is not None and change is not None and usable_cpus() < current():
            change(usable_cpus())
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
