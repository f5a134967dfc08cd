"""The peer comparison: upstream direct vs a bare passthrough vs stella (vs LiteLLM's proxy).

Same fast fake upstream, same load, one run; stream and non-stream; several
concurrency levels; plus each gateway's start-up time and RSS idle and after
load. Gateways run pinned to core 0, the upstream and the load (wrk) to core 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from stella.bench.loadgen import (
    BenchError,
    Result,
    have_wrk,
    pinned,
    require_clean,
    run_load,
    run_wrk,
)
from stella.bench.servers import Proc, free_port, sample, spawn, stella_args, uvicorn_args

LITELLM_VENV = Path(
    os.environ.get("STELLA_LITELLM_VENV", Path(tempfile.gettempdir()) / "litellm-venv")
)


class GatewayRow(msgspec.Struct):
    """One gateway at one load."""

    gateway: str
    mode: str
    concurrency: int
    result: Result
    vs_passthrough: float
    added_p50_ms: float


class GatewayInfo(msgspec.Struct):
    """A gateway's process figures."""

    gateway: str
    startup_s: float
    rss_idle_mb: float
    rss_after_mb: float


class Report(msgspec.Struct):
    """The whole comparison."""

    rows: list[GatewayRow]
    gateways: list[GatewayInfo]
    notes: list[str]


def _body(stream: bool) -> bytes:
    payload: dict = {
        "model": "bench",
        "stream": stream,
        "messages": [{"role": "user", "content": "Say twenty words."}],
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload).encode()


def _load(url: str, body: bytes, name: str, c: int, duration: float, wrk: bool) -> Result:
    target = url + "/v1/chat/completions"
    if wrk:
        return run_wrk(target, body, name=name, concurrency=c, duration=duration, cpu=1)
    import asyncio

    with pinned(1):
        return asyncio.run(run_load(target, body, name=name, concurrency=c, duration=duration))


def check_venv(venv: Path) -> None:
    """A BenchError unless `venv` and its bin/ are this user's own and writable by no one else."""
    # The default lies in the shared temp dir: a venv someone else put (or can write)
    # there would run their code as this user.
    for path in (venv, venv / "bin"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            why = "is not a directory"
        elif st.st_uid != os.geteuid():
            why = f"belongs to uid {st.st_uid}, not to this user"
        elif st.st_mode & 0o022:
            why = "is writable by its group or by everyone"
        else:
            continue
        raise BenchError(
            f"refusing to run LiteLLM from {venv}: {path} {why} (set STELLA_LITELLM_VENV)"
        )


def litellm_version(venv: Path) -> str:
    """The LiteLLM version installed in `venv`, or "unknown"."""
    try:
        done = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def install_litellm(venv: Path | None = None) -> Path | None:
    """LiteLLM's proxy in a venv of its own (never in stella's); None when it can't be had."""
    venv = venv or LITELLM_VENV
    check_venv(venv)
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        check_venv(venv)  # what was created is what will run
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
            check=True,
            timeout=1800,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return exe if exe.exists() else None


# The passthroughs run on the server protocol `stella serve` uses, so that the
# ratios compare the gateways' own code and not two ways of writing to a socket.
SAME_SERVER = "stella.transport:HttpToolsProtocol"


@contextlib.contextmanager
def _gateways(upstream: str, litellm: bool, notes: list[str]) -> Iterator[dict[str, Proc]]:
    with tempfile.TemporaryDirectory(prefix="stella-compare-") as tmp:
        yield from _started(Path(tmp), upstream, litellm, notes)


def _started(
    tmp: Path, upstream: str, litellm: bool, notes: list[str]
) -> Iterator[dict[str, Proc]]:
    conf = tmp / "stella.toml"
    conf.write_text(
        '[models]\ndefault = "bench"\n[models.routes.bench]\nbackend = "up"\nretries = 0\n'
        f'[backends.up]\nkind = "openai"\nbase_url = "{upstream}/v1"\n'
        "[backends.local]\nenabled = false\n"
    )
    with contextlib.ExitStack() as stack:
        procs: dict[str, Proc] = {}
        for name, app in (
            ("passthrough", "stella.bench.passthrough:app"),
            ("passthrough-aiohttp", "stella.bench.passthrough:app_aiohttp"),
        ):
            p = free_port()
            procs[name] = stack.enter_context(
                spawn(
                    uvicorn_args(app, p, http=SAME_SERVER),
                    port=p,
                    cpu=0,
                    env={"UPSTREAM_URL": upstream + "/v1"},
                )
            )
        p = free_port()
        procs["stella"] = stack.enter_context(
            spawn(stella_args(p), port=p, cpu=0, env={"STELLA_CONFIG": str(conf)})
        )
        if litellm:
            exe = install_litellm()
            if exe is None:
                notes.append("LiteLLM could not be installed; it is left out of this run")
            else:
                notes.append(
                    f"LiteLLM {litellm_version(exe.parent.parent)} from {exe.parent.parent}"
                )
                p = free_port()
                try:
                    procs["litellm"] = stack.enter_context(
                        spawn(
                            [
                                str(exe),
                                "--model",
                                "openai/bench",
                                "--api_base",
                                upstream + "/v1",
                                "--host",
                                "127.0.0.1",
                                "--port",
                                str(p),
                                "--num_workers",
                                "1",
                            ],
                            port=p,
                            cpu=0,
                            ready_path="/health/liveliness",
                            timeout=180,
                            # A loopback-only benchmark: LiteLLM refuses to start without a
                            # master key unless told this is a local run.
                            env={
                                "OPENAI_API_KEY": "sk-bench",
                                "LITELLM_LOG": "ERROR",
                                "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
                            },
                        )
                    )
                except RuntimeError as exc:
                    notes.append(f"LiteLLM did not start: {str(exc)[:200]}")
        yield procs


def compare(
    concurrency: tuple[int, ...] = (1, 8, 64),
    duration: float = 5.0,
    litellm: bool = False,
    rounds: int = 2,
) -> Report:
    """Run every gateway against the same upstream under the same load, in turn, `rounds` times."""
    wrk = have_wrk()
    notes = [
        f"load: {'wrk' if wrk else 'stella loadgen'}; {duration:g} s per run; "
        f"each target measured in turn, best of {rounds} rounds; "
        "gateways on core 0, upstream and load on core 1; "
        "the passthroughs on stella's server protocol (one write per loop turn)"
    ]
    rows: list[GatewayRow] = []
    infos: list[GatewayInfo] = []
    up_port = free_port()
    with spawn(uvicorn_args("stella.bench.upstream:app", up_port), port=up_port, cpu=1) as up:
        with _gateways(up.url, litellm, notes) as gws:
            idle = {name: proc.rss() for name, proc in gws.items()}
            targets = {"upstream": up.url, **{n: p.url for n, p in gws.items()}}
            for mode, stream in (("non-stream", False), ("stream", True)):
                body = _body(stream)
                for url in targets.values():
                    sample(url + "/v1/chat/completions", body)  # a 200, or nothing to compare
                for c in concurrency:
                    # In turn, `rounds` times; each keeps its best round (noise only slows),
                    # so a slow spell of the machine does not fall on one target alone.
                    res: dict[str, Result] = {}
                    for _ in range(rounds):
                        for n, u in targets.items():
                            r = require_clean(_load(u, body, n, c, duration, wrk), mode)
                            if n not in res or r.rps > res[n].rps:
                                res[n] = r
                    # Ratios against the passthrough on stella's own client stack (aiohttp).
                    base = res["passthrough-aiohttp"].rps or 1
                    for name, r in res.items():
                        rows.append(
                            GatewayRow(
                                name,
                                mode,
                                c,
                                r,
                                round(r.rps / base, 3),
                                round(r.p50_ms - res["upstream"].p50_ms, 3),
                            )
                        )
            for name, proc in gws.items():
                infos.append(
                    GatewayInfo(
                        name,
                        round(proc.started_s, 2),
                        round(idle[name] / 2**20, 1),
                        round(proc.rss() / 2**20, 1),
                    )
                )
    return Report(rows, infos, notes)


def table(report: Report) -> str:
    """Markdown tables."""
    out = [
        "| gateway | mode | c | req/s | x passthrough-aiohttp | p50 ms | p99 ms | added p50 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report.rows:
        out.append(
            f"| {r.gateway} | {r.mode} | {r.concurrency} | {r.result.rps:,.0f} | "
            f"{r.vs_passthrough:.2f} | {r.result.p50_ms:.2f} | {r.result.p99_ms:.2f} | "
            f"{r.added_p50_ms:.2f} |"
        )
    out += [
        "",
        "| gateway | start-up s | RSS idle MB | RSS after load MB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for g in report.gateways:
        out.append(f"| {g.gateway} | {g.startup_s} | {g.rss_idle_mb} | {g.rss_after_mb} |")
    return "\n".join(out + [""] + [f"- {n}" for n in report.notes])


if __name__ == "__main__":
    t = time.perf_counter()
    print(table(compare(litellm="--litellm" in sys.argv)))
    print(f"({time.perf_counter() - t:.0f} s)")
