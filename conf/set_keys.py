"""Set keys of a TOML file in place, its comments kept: the container image's defaults.

    python conf/set_keys.py FILE TABLE.KEY=VALUE ...

VALUE is a TOML value ('"0.0.0.0"', 7). Each key must already be in FILE, on a line of
its own in its table, as conf/stella.toml writes every key. The file is parsed again
afterwards and must hold exactly what it held with those values changed; anything else
(a key not found, a value on several lines) is an error and the file is left as it was.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

_HEADER = re.compile(r"\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
_KEY = re.compile(r"(\s*)([A-Za-z0-9_-]+)(\s*=\s*)")


def _value(raw: str) -> Any:
    """A TOML value as written, or None when `raw` is not one whole value."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return None


def set_keys(text: str, changes: dict[str, str]) -> str:
    """`text` with the value of each dotted key in `changes` replaced (TOML literals)."""
    lines = text.splitlines(keepends=True)
    table = ""
    todo = dict(changes)
    for i, line in enumerate(lines):
        if header := _HEADER.match(line):
            table = header.group(1)
            continue
        key = _KEY.match(line)
        if key is None or (path := f"{table}.{key.group(2)}") not in todo:
            continue
        rest = line[key.end() :].rstrip("\r\n")
        # The value ends where a comment begins: at the first "#" before which the text
        # is one whole value (a "#" inside a string is not a comment).
        ends = [m.start() for m in re.finditer("#", rest)] + [len(rest)]
        end = next((e for e in ends if _value(rest[:e].strip()) is not None), None)
        if end is None:
            raise ValueError(f"{path}: its value is not on one line")
        new = todo.pop(path)
        old = rest[:end].rstrip()
        padding = rest[len(old) : end]  # keeps the comments' column where it can
        padding = " " * max(1, len(padding) + len(old) - len(new)) if end < len(rest) else ""
        newline = line[len(line.rstrip("\r\n")) :]
        lines[i] = f"{line[: key.end()]}{new}{padding}{rest[end:]}{newline}"
    if todo:
        raise ValueError(f"not in the file: {', '.join(todo)}")
    out = "".join(lines)
    expected = tomllib.loads(text)
    for path, raw in changes.items():
        *tables, last = path.split(".")
        node = expected
        for part in tables:
            node = node[part]
        node[last] = _value(raw)
    if tomllib.loads(out) != expected:
        raise ValueError("the edited file does not hold what was asked")
    return out


def main(argv: list[str]) -> int:
    """Edit the file named first with the TABLE.KEY=VALUE arguments after it."""
    if len(argv) < 2 or not all("=" in a for a in argv[1:]):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path = Path(argv[0])
    changes = dict(a.split("=", 1) for a in argv[1:])
    for key, raw in changes.items():
        if _value(raw) is None:
            print(f"set_keys: {key}: {raw!r} is not a TOML value", file=sys.stderr)
            return 2
    try:
        path.write_text(set_keys(path.read_text(), changes))
    except (ValueError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"set_keys: {path}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
