"""A fast CBLAS for MLX's CPU matrix products on Linux, loaded before MLX is."""

from __future__ import annotations

import ctypes
import os
import sys
import threading

# MLX's Linux CPU wheels (mlx-cpu) bundle the reference BLAS, whose float32 matrix product
# runs ~60x slower than OpenBLAS's on the same core: reading a 256-token prompt took 29 s
# with it and 0.9 s with OpenBLAS, and a token 0.13 s against 0.06. MLX calls
# cblas_sgemm by name, and the dynamic linker looks a name up in the global scope before
# a dlopen'd library's own dependencies: a CBLAS loaded RTLD_GLOBAL before MLX's library
# is loaded provides it. Once MLX is loaded its names are bound (Python loads extensions
# RTLD_NOW), so the choice is made once per process, before the first `import mlx.core`.
OPENBLAS = ("libopenblas.so.0", "libopenblas.so")  # Debian/Ubuntu/Fedora's sonames

BUNDLED = "bundled"

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
    """Why MLX's own (slow) BLAS is in use where a faster one was asked for; "" otherwise."""
    return _why


def _settle(choice: str) -> str:
    global _why
    # macOS builds use Accelerate; a CUDA build does its products on the GPU.
    if sys.platform != "linux" or choice == BUNDLED:
        return ""
    # One already in the global scope (LD_PRELOAD, a library loaded so before) is what
    # MLX's names bind to, before or after this.
    present = _global_cblas()
    if present:
        return present
    if "mlx.core" in sys.modules:
        _why = "MLX was loaded before stella could give it a CBLAS"
        return ""
    if choice != "auto":
        return _load(choice)
    for name in OPENBLAS:
        try:
            return _load(name)
        except BlasError:
            continue
    _why = "no OpenBLAS found (libopenblas.so.0)"
    return ""


def _global_cblas() -> str:
    try:
        scope = ctypes.CDLL(None)
    except OSError:
        return ""
    return (_path_of(scope) or "(preloaded)") if hasattr(scope, "cblas_sgemm") else ""


def _load(name: str) -> str:
    try:
        lib = ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as exc:
        raise BlasError(f"cannot load {name!r}: {exc}") from None
    if not hasattr(lib, "cblas_sgemm"):  # a Fortran-only BLAS: MLX would not use it
        raise BlasError(f"{name!r} has no cblas_sgemm: not a CBLAS library")
    return _path_of(lib) or name


def _path_of(lib: ctypes.CDLL) -> str:
    """The file a loaded library came from (its soname resolved), from /proc/self/maps."""
    address = ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value or 0
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, _, rest = line.partition(" ")
                low, _, high = span.partition("-")
                if int(low, 16) <= address < int(high, 16):
                    path = rest.split(maxsplit=4)[-1].strip()
                    return path if path.startswith("/") else ""
    except (OSError, ValueError):
        pass
    return ""
