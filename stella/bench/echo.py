"""stella's native API on the echo backend vs a bare Starlette app sending the same bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec

from stella.bench.loadgen import Result, have_wrk, pinned, require_clean, run_load, run_wrk
from stella.bench.servers import (
    Proc,
    cpu_seconds,
    free_port,
    sample,
    spawn,
    stella_args,
    uvicorn_args,
)

WORDS = " ".join(f"word{i}" for i in range(20))  # a 20-token answer, as in the peer figures


SERVERS = {
    "bare": "the bare app on stock uvicorn",
    "same": "the bare app on stella's server protocol",
    "stella": "stella",
}


class Row(msgspec.Struct):
    """One side-by-side measurement."""

    mode: str
    concurrency: int
    stella: Result
    baseline: Result  # the bare app on stock uvicorn (httptools)
    ratio: float
    # The bare app on stella's server protocol (one write per loop turn): stella's
    # own cost, with the server's gain taken out of the comparison.
    same_server: Result | None = None
    same_server_ratio: float | None = None


@contextlib.contextmanager
def _echo_stella(tmp: Path) -> Iterator[Proc]:
    """stella on the echo backend alone, pinned to core 0, its config written in `tmp`."""
    conf = tmp / "stella.toml"
    conf.write_text('[models]\ndefault = "echo"\n[backends.local]\nenabled = false\n')
    port = free_port()
    with spawn(stella_args(port), port=port, env={"STELLA_CONFIG": str(conf)}, cpu=0) as stella:
        yield stella


def _body(stream: bool) -> bytes:
    return json.dumps(
        {"model": "echo", "stream": stream, "messages": [{"role": "user", "content": WORDS}]}
    ).encode()


def measure(
    url: str,
    body: bytes,
    name: str,
    concurrency: int,
    duration: float,
    wrk: bool,
    client_cpu: int | None,
    headers: dict[str, str] | None = None,
    pid: int | None = None,
) -> Result:
    """One load run from `client_cpu`, with wrk when asked and available; with `pid`, the
    server's CPU time per request too."""
    before: float | None = None

    def start() -> None:
        # Read when the measured phase starts: the requests counted are only its own.
        nonlocal before
        before = cpu_seconds(pid) if pid else None

    if wrk:
        start()
        result = run_wrk(
            url + "/api/v1/chat",
            body,
            name=name,
            concurrency=concurrency,
            duration=duration,
            cpu=client_cpu,
            headers=headers,
        )
    else:
        with pinned(client_cpu):
            result = asyncio.run(
                run_load(
                    url + "/api/v1/chat",
                    body,
                    name=name,
                    concurrency=concurrency,
                    duration=duration,
                    headers=headers,
                    on_measure=start,
                )
            )
    after = cpu_seconds(pid) if pid else None
    if before is not None and after is not None and result.requests:
        result.cpu_us = round((after - before) / result.requests * 1e6, 1)
    return result


def compare(
    concurrency: tuple[int, ...] = (1, 8, 64),
    duration: float = 3.0,
    use_wrk: bool | None = None,
    rounds: int = 2,
) -> list[Row]:
    """The three servers up at once, pinned to core 0, load from core 1; same bytes, same load."""
    with tempfile.TemporaryDirectory(prefix="stella-bench-") as tmp:
        return _compare(
            Path(tmp), concurrency, duration, have_wrk() if use_wrk is None else use_wrk, rounds
        )


def _compare(
    tmp: Path, concurrency: tuple[int, ...], duration: float, wrk: bool, rounds: int
) -> list[Row]:
    b_port, c_port = free_port(), free_port()
    rows: list[Row] = []
    with _echo_stella(tmp) as stella:
        # The bare app replays these bytes: they must be a real answer, not an error.
        (tmp / "body.json").write_bytes(sample(stella.url + "/api/v1/chat", _body(False)))
        (tmp / "stream.ndjson").write_bytes(sample(stella.url + "/api/v1/chat", _body(True)))
        bare_env = {"BARE_BODY": str(tmp / "body.json"), "BARE_STREAM": str(tmp / "stream.ndjson")}
        corked = "stella.transport:HttpToolsProtocol"
        with (
            spawn(
                uvicorn_args("stella.bench.bare:app", b_port), port=b_port, env=bare_env, cpu=0
            ) as bare,
            spawn(
                uvicorn_args("stella.bench.bare:app", c_port, http=corked),
                port=c_port,
                env=bare_env,
                cpu=0,
            ) as bare_same,
        ):
            for mode, stream_flag in (("non-stream", False), ("stream", True)):
                body = _body(stream_flag)
                for c in concurrency:
                    # In turn, `rounds` times; each keeps its best round (noise only slows).
                    best: dict[str, Result] = {}
                    for _ in range(rounds):
                        for name, server in (
                            ("bare", bare),
                            ("same", bare_same),
                            ("stella", stella),
                        ):
                            r = measure(server.url, body, name, c, duration, wrk, 1, pid=server.pid)
                            require_clean(r, mode, SERVERS[name])
                            if name not in best or r.rps > best[name].rps:
                                best[name] = r
                    s, b, same = best["stella"], best["bare"], best["same"]
                    rows.append(
                        Row(
                            mode,
                            c,
                            s,
                            b,
                            round(s.rps / b.rps, 3) if b.rps else 0.0,
                            same,
                            round(s.rps / same.rps, 3) if same.rps else 0.0,
                        )
                    )
    return rows


def table(rows: list[Row]) -> str:
    """Markdown table of the rows."""
    out = [
        "| mode | c | stella req/s | bare req/s | ratio | bare on stella's server req/s "
        "| ratio | stella p50 / p99 ms | bare p50 / p99 ms | server CPU us/request: "
        "stella / bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        same = f"{r.same_server.rps:,.0f}" if r.same_server else "-"
        same_ratio = f"{r.same_server_ratio:.2f}" if r.same_server_ratio is not None else "-"
        cpu = (
            f"{r.stella.cpu_us:.1f} / {r.baseline.cpu_us:.1f}"
            if r.stella.cpu_us is not None and r.baseline.cpu_us is not None
            else "-"
        )
        out.append(
            f"| {r.mode} | {r.concurrency} | {r.stella.rps:,.0f} | {r.baseline.rps:,.0f} | "
            f"{r.ratio:.2f} | {same} | {same_ratio} | "
            f"{r.stella.p50_ms:.2f} / {r.stella.p99_ms:.2f} | "
            f"{r.baseline.p50_ms:.2f} / {r.baseline.p99_ms:.2f} | {cpu} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    result = compare()
    print(table(result))
    sys.stdout.flush()


class DialectRow(msgspec.Struct):
    """Native vs OpenAI dialect on one stella, same load."""

    mode: str
    concurrency: int
    native: Result
    openai: Result
    cost_ratio: float  # OpenAI's time per request / native's


def compare_dialects(
    concurrency: tuple[int, ...] = (8,),
    duration: float = 3.0,
    use_wrk: bool | None = None,
    rounds: int = 2,
) -> list[DialectRow]:
    """The OpenAI codec's cost over the native one, through the same pipeline."""
    wrk = have_wrk() if use_wrk is None else use_wrk
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="stella-bench-") as tmp,
        _echo_stella(Path(tmp)) as stella,
    ):
        for mode, stream in (("non-stream", False), ("stream", True)):
            body = _body(stream)
            url = stella.url + "/v1/chat/completions"
            for c in concurrency:
                native = oa = None
                for _ in range(rounds):  # in turn; each keeps its best round
                    rn = measure(stella.url, body, "native", c, duration, wrk, 1)
                    require_clean(rn, mode, "stella, native API")
                    if wrk:
                        ro = run_wrk(
                            url, body, name="openai", concurrency=c, duration=duration, cpu=1
                        )
                    else:
                        with pinned(1):
                            ro = asyncio.run(
                                run_load(url, body, name="openai", concurrency=c, duration=duration)
                            )
                    require_clean(ro, mode, "stella, OpenAI dialect")
                    native = rn if native is None or rn.rps > native.rps else native
                    oa = ro if oa is None or ro.rps > oa.rps else oa
                assert native is not None and oa is not None
                ratio = round(native.rps / oa.rps, 3) if oa.rps else 0.0
                rows.append(DialectRow(mode, c, native, oa, ratio))
    return rows


def dialect_table(rows: list[DialectRow]) -> str:
    """Markdown table of the dialect rows."""
    out = [
        "| mode | c | native req/s | openai req/s | openai cost / native |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r.mode} | {r.concurrency} | {r.native.rps:,.0f} | {r.openai.rps:,.0f} | "
            f"{r.cost_ratio:.2f}x |"
        )
    return "\n".join(out)
