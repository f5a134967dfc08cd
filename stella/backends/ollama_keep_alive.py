"""Ollama's keep_alive: seconds or a Go duration, as Ollama reads them."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from stella.backends import ConfigError
from stella.backends.http import GO_DURATION, GO_NUMBER, GO_PARTS, GO_UNIT_NS

# A number of seconds written as a string (an environment variable's value is one).
_SECONDS = re.compile(rf"[-+]?(?:{GO_NUMBER})(?:[eE][-+]?[0-9]+)?")
# Go's durations are int64 nanoseconds (~292 years): ParseDuration refuses a longer
# one, and Ollama's conversion of a longer number of seconds overflows.
_MAX_NS = 2**63 - 1


def _fits(value: int | float | str) -> bool:
    """Whether Ollama can hold `value` (seconds, or a Go duration) as a Go duration."""
    if isinstance(value, str):  # exact, as ParseDuration counts: whole nanoseconds
        parts = GO_PARTS.findall(value)
        ns = int(sum(Fraction(n) * GO_UNIT_NS[unit] for n, unit in parts))
        return ns <= _MAX_NS + value.startswith("-")
    if value != value or value in (math.inf, -math.inf):
        return False  # no JSON form: msgspec writes null, which Ollama refuses
    # Any negative number is "for good" to Ollama; a positive one is multiplied out in
    # float64 (time.Duration(t * float64(time.Second))), as here.
    return value < 0 or float(value) * 1e9 < 2.0**63


def keep_alive_of(name: str, value: int | float | str) -> int | float | str | None:
    """The keep_alive to send Ollama (None: Ollama's default); ConfigError for one it
    would refuse."""
    if value == "":
        return None
    sent: int | float | str = value  # seconds, which Ollama takes as a JSON number
    if isinstance(value, str):
        if _SECONDS.fullmatch(value):
            sent = float(value) if any(c in value for c in ".eE") else int(value)
        elif not GO_DURATION.fullmatch(value):
            raise ConfigError(
                f"backends.{name}.keep_alive: {value[:40]!r} is neither a number of seconds "
                'nor a Go duration ("5m", "1h30m", "-1s")'
            )
    if not _fits(sent):
        raise ConfigError(
            f"backends.{name}.keep_alive: {str(value)[:40]!r} is not a duration Ollama can "
            "hold (at most ~292 years; -1 keeps the model loaded for good)"
        )
    return sent


def unloads(keep_alive: int | float | str) -> bool:
    """Whether Ollama reads `keep_alive` (as keep_alive_of sends it) as 0, which on a
    request without messages unloads the model."""
    if isinstance(keep_alive, str):
        return not any(Fraction(n) for n, _ in GO_PARTS.findall(keep_alive))
    return keep_alive == 0
