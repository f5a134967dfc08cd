"""Long-lived objects kept out of the garbage collector's full passes.

A full collection (the oldest generation's) walks every object the process tracks, with
the GIL held: with stella, its libraries and an embedded model loaded that was 60-210 ms
on a busy 2-core machine, on whichever thread's allocation set it off (the event loop's,
under load), and no call is served meanwhile. What start-up and a model load make is kept for the life of the
process (or of the model), so it is frozen (gc.freeze): a full collection then walks only
what was made since. A frozen object is still freed when its last reference goes (a
released model's weights are); only a reference cycle among frozen objects stays.

Each worker process of `stella serve --workers N` runs its own lifespan, and freezes its
own objects.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# No automatic full collection comes before this many collections of the middle
# generation: none, for as long as a load runs.
NEVER = 1 << 30

_lock = threading.Lock()
_loads = 0  # loads running, on every backend's worker thread
_threshold = gc.get_threshold()  # given back when the last load ends


def freeze_started() -> None:
    """Collect, then freeze what is left: once start-up is done, before the first call."""
    # The collection is paid here, before the server listens; and garbage frozen would
    # never be collected.
    gc.collect()
    gc.freeze()


def load_frozen(load: Callable[..., T], *args: Any) -> T:
    """`load(*args)`, with no full collection while it runs, and what it made (a model,
    kept until it is released) frozen once it returns."""
    global _loads, _threshold
    # A load makes tens of thousands of objects (MLX, its libraries, the model): the full
    # collections they would set off walk them all, GIL held, the loop waiting. The young
    # generations are still collected meanwhile, so of the cycles the calls served during
    # a long load (a download) leave, only those that outlive two young collections wait,
    # to be frozen with the model, as is the load's own garbage in cycles (about twenty
    # objects a load of SmolLM2).
    with _lock:
        _loads += 1
        if _loads == 1:
            _threshold = gc.get_threshold()
            gc.set_threshold(_threshold[0], _threshold[1], NEVER)
    try:
        result = load(*args)
        # Not after a failed load: its traceback's cycles would hold the half-made arrays.
        gc.freeze()
    finally:
        with _lock:
            _loads -= 1
            if _loads == 0:
                gc.set_threshold(*_threshold)
    return result


def collect_all() -> None:
    """Unfreeze, then collect: at shutdown, what frozen objects hold in cycles is freed now,
    by the thread that calls this."""
    gc.unfreeze()
    gc.collect()
