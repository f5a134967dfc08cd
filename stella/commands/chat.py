"""`stella chat "prompt"`: stream an answer to the terminal (stdin when no prompt)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TextIO

from stella.commands import (
    OutputError,
    _is_tty,
    add_timeout,
    client_error,
    client_exit,
    client_timeout,
    command_client,
    key_from,
)

NAME = "chat"
HELP = "send a prompt (or stdin) to a stella server and stream the answer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `stella chat`."""
    parser.add_argument(
        "prompt", nargs="?", help="the message; read from stdin when absent (Ctrl-D ends it)"
    )
    parser.add_argument("--model", "-m", help="model name (default: the server's default)")
    parser.add_argument("--system", "-s", help="system prompt")
    parser.add_argument("--url", help="server URL (default: $STELLA_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default: $STELLA_API_KEY)")
    parser.add_argument(
        "--max-tokens",
        type=_tokens,
        help="at most this many tokens in the answer (default: the model's)",
    )
    parser.add_argument(
        "--temperature",
        type=_number,
        help="sampling temperature: 0 for the likeliest answer, higher for more varied ones "
        "(default: the model's)",
    )
    parser.add_argument("--stats", action="store_true", help="print usage and timings at the end")
    parser.add_argument(
        "--no-reasoning",
        action="store_true",
        help="leave out a reasoning model's thinking (by default shown on stderr before the "
        "answer: dim on a terminal, each line led by '[thinking] ' elsewhere or with NO_COLOR)",
    )
    add_timeout(parser, CHAT_TIMEOUT_S, "each part of the answer")


# The wait for each read of the answer: a long prompt on a slow engine takes minutes
# before its first token.
CHAT_TIMEOUT_S = 600.0


class Thinking:
    """A reasoning model's thinking on stderr, apart from the answer on stdout (which a
    script reads): dim on a terminal, each line led by "[thinking] " elsewhere."""

    PREFIX = "[thinking] "

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        # NO_COLOR (no-color.org) and a dumb terminal: no escape codes, the prefix instead.
        self._dim = (
            _is_tty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        )
        self._midline = False  # thinking written without its line end yet
        self._line_start = True  # the next piece begins a line (the prefix goes first)

    def write(self, piece: str) -> None:
        """Show a piece of the thinking."""
        if self._dim:
            # Dim on and off around each piece: a Ctrl-C between two leaves no dim terminal.
            text = f"\x1b[2m{piece}\x1b[22m"
        else:
            out: list[str] = []
            for n, part in enumerate(piece.split("\n")):
                if n:
                    out.append("\n")
                    self._line_start = True
                if part:
                    out.append(self.PREFIX + part if self._line_start else part)
                    self._line_start = False
            text = "".join(out)
        self._midline = not piece.endswith("\n")
        self._say(text)

    def end(self) -> bool:
        """End the thinking's line, before the answer, an error or the shell's prompt;
        whether it was open."""
        if not self._midline:
            return False
        self._midline = False
        self._line_start = True
        self._say("\n")
        return True

    def _say(self, text: str) -> None:
        # stderr that cannot take it (closed, full, a reader gone) loses the thinking
        # only: the answer on stdout, and what fails there, are the command's.
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)
            self._stream.flush()


def _tokens(text: str) -> int:
    """A count of tokens: a whole number, 1 or more (the server refuses less, as a 400)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _number(text: str) -> float:
    """A finite number (JSON has no NaN or infinity: the client would refuse it)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def run(args: argparse.Namespace) -> int:
    """Stream the answer; exit 1 with one line on error."""
    from stella.client import Done, StellaClientError
    from stella.protocol import Delta, ToolCall

    if args.prompt is not None:
        prompt = args.prompt
    elif sys.stdin is None:  # started with stdin closed: nothing can come
        prompt = ""
    else:
        typing = sys.stdin.isatty()
        if typing:
            # Without a word, `stella chat` on a terminal looks hung: it waits for text.
            print("stella: reading the prompt from stdin; end it with Ctrl-D", file=sys.stderr)
        try:
            prompt = _read_stdin() if typing else sys.stdin.read()
            prompt.encode()  # bytes the decoder let through as surrogates
        except KeyboardInterrupt:  # as mid-stream: exit 130, no traceback
            if typing:  # the shell's prompt on a line of its own, after the terminal's "^C"
                print(file=sys.stderr)
            return 130
        except UnicodeError:  # a strict decoder (a UTF-8 locale) raises, a lax one escapes
            print(f"stella: the prompt on stdin is not {_encoding()} text", file=sys.stderr)
            return 2
    if not prompt.strip():
        print("stella: nothing to send", file=sys.stderr)
        return 2
    messages = [{"role": "user", "content": prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    options = {
        k: v
        for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
        if v is not None
    }
    timeout = client_timeout(args.timeout, CHAT_TIMEOUT_S)
    if timeout is None:
        return 2
    midline = False  # text written without its line end yet
    thinking = None if args.no_reasoning or sys.stderr is None else Thinking(sys.stderr)
    try:
        with command_client(args, timeout) as client:
            for event in client.chat(messages, args.model, stream=True, options=options or None):
                if isinstance(event, Delta):
                    # A line's reasoning came before its text (a line may hold both).
                    if event.reasoning and thinking is not None:
                        if midline and _same_file(sys.stdout, sys.stderr):
                            sys.stdout.write("\n")  # thinking again, after some text
                            sys.stdout.flush()
                            midline = False
                        thinking.write(event.reasoning)
                    if not event.text:
                        continue
                    if thinking is not None:
                        thinking.end()
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                    midline = bool(event.text) and not event.text.endswith("\n")
                elif isinstance(event, ToolCall):
                    if thinking is not None:
                        thinking.end()
                    sys.stdout.write(f"\n[tool call] {event.name} {event.arguments}\n")
                    sys.stdout.flush()
                    midline = False
                elif isinstance(event, Done):
                    if thinking is not None:
                        thinking.end()
                    sys.stdout.write("\n")
                    sys.stdout.flush()  # before --stats' line on stderr, which may be the same file
                    midline = False
                    if args.stats:
                        u, t = event.usage, event.timings
                        ttft = "-" if t.ttft_ms is None else f"{t.ttft_ms} ms"
                        rate = "-" if t.tokens_per_s is None else t.tokens_per_s
                        print(
                            f"[{event.finish_reason}] {u.prompt_tokens} in, {u.completion_tokens} "
                            f"out, ttft {ttft}, {rate} tok/s",
                            file=sys.stderr,
                        )
    except StellaClientError as exc:
        if thinking is not None:
            thinking.end()  # the error's line on a line of its own
        if midline:
            sys.stdout.write("\n")  # the error gets a line of its own
            sys.stdout.flush()
        print(client_error(exc, key_from(args.api_key)), file=sys.stderr)
        return client_exit(exc)
    except KeyboardInterrupt:
        # The shell's prompt on a line of its own, after the terminal's "^C": the line
        # the thinking or the answer left open ends there, or else stderr's does.
        ended = thinking is not None and thinking.end()
        if midline:
            sys.stdout.write("\n")
            sys.stdout.flush()
            ended = ended or _same_file(sys.stdout, sys.stderr)
        if not ended and _is_tty(sys.stderr):
            print(file=sys.stderr)
        return 130
    except OutputError:
        if thinking is not None:
            thinking.end()
        if midline and _same_file(sys.stdout, sys.stderr):
            # The CLI's line would be glued to the answer's last words (stdout cannot
            # take the line end: it may be full, or closed).
            print(file=sys.stderr)
        raise  # stdout's, not the server's: the CLI says so
    except BrokenPipeError:
        raise  # the reader left (`| head`): the CLI says nothing
    except OSError as exc:
        if thinking is not None:
            thinking.end()
        print(f"stella: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    return 0


def _same_file(one: object, other: object) -> bool:
    """Whether two streams write to one file (a terminal, a pipe, `2>&1`)."""
    import os

    try:
        return os.path.samestat(
            os.fstat(one.fileno()),  # type: ignore[attr-defined]
            os.fstat(other.fileno()),  # type: ignore[attr-defined]
        )
    except (AttributeError, OSError, ValueError):  # closed, or not a file
        return False


def _read_stdin() -> str:
    """stdin to its end, as `sys.stdin.read()` reads it, waking every half second.

    A Ctrl-C that lands just before a blocking read begins is noted by Python's handler
    but interrupts nothing: the read waits on (for good, at a terminal). Waiting in
    `select` with a timeout lets the interrupt come through.
    """
    import io
    import os
    import select

    fd = sys.stdin.fileno()
    chunks: list[bytes] = []
    while True:
        if not select.select([fd], [], [], 0.5)[0]:
            continue  # the interpreter looks at signals between the waits
        chunk = os.read(fd, 65_536)
        if not chunk:
            break
        chunks.append(chunk)
    # Decoded as sys.stdin would: its encoding, its error handler, universal newlines.
    text = io.TextIOWrapper(
        io.BytesIO(b"".join(chunks)), encoding=sys.stdin.encoding, errors=sys.stdin.errors
    )
    return text.read()


def _encoding() -> str:
    """The name of stdin's encoding as people write it ("UTF-8", not "utf-8")."""
    import codecs

    name = codecs.lookup(getattr(sys.stdin, "encoding", None) or "utf-8").name
    return "UTF-8" if name == "utf-8" else name
