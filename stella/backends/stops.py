"""Stop strings over streamed text: never emit a part of a stop sequence."""

from __future__ import annotations

from collections.abc import Sequence

from stella.backends.base import first_stop


class StopBuffer:
    """Holds back text that could still become a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None  # the stop string that was hit

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hit = first_stop(buf, self.stops)
        if hit is not None:
            self.held = ""
            at, self.matched = hit
            return buf[:at], True
        keep = max(partial_start(buf, s) for s in self.stops)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """What was held back, at the end of the text."""
        held, self.held = self.held, ""
        return held


def partial_start(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is the start of `marker` (the part
    of it that could still become `marker`)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
