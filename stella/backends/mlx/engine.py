"""What runs on the MLX thread: loading, dequantizing, chat templates, generation."""

from __future__ import annotations

import copy
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from stella.backends.base import content_of
from stella.backends.mlx.worker import GenerationJob
from stella.errors import ContextTooLong, InvalidRequest
from stella.protocol import Message, Tool

_log = structlog.get_logger("stella")
# How long the worker waits, once per generation, for the loop to send the first text.
HANDOFF_WAIT_S = 0.05
# How many tokens back the penalties look (mlx-lm's default window, prompt tokens too).
PENALTY_WINDOW = 20


class _Cancelled(Exception):
    """Raised inside the prompt pass of a job that was cancelled."""


@dataclass(eq=False)
class LoadedModel:
    """A model and tokenizer in memory, with its prompt-prefix KV caches."""

    path: str
    model: Any
    tokenizer: Any
    nbytes: int = 0
    supports_tools: bool = False  # the chat template renders tools
    tool_calling: bool = False  # the tokenizer knows the markers of a call and its parser
    caches: Any = None  # mlx_lm LRUPromptCache, made on first use
    meta: dict[str, Any] = field(default_factory=dict)
    context: int | None = None  # the model's context window in tokens, when it says
    vocab: int | None = None  # the width of the model's logits (its config's vocab_size)
    load_ms: float = 0.0  # how long the load itself took on the worker (0: not measured)
    blas: str = ""  # the CBLAS MLX's CPU products run on ("" for MLX's own)
    # Token counts' own copy of the tokenizer (made by the first count, on the counting
    # thread): an HF tokenizer keeps state between calls (whether control tokens are
    # split, which _encode_as_text switches), so two threads may not share one.
    count_tokenizer: Any = None

    def encode_chat(self, messages: list[Message], tools: list[Tool] | None) -> list[int]:
        """Token ids of the conversation with the assistant's turn opened, or left open
        when the last message is the assistant's (a prefill the answer continues)."""
        return self.encode(messages, tools)[0]

    def encode(
        self, messages: list[Message], tools: list[Tool] | None, tokenizer: Any = None
    ) -> tuple[list[int], bool]:
        """encode_chat's ids, and whether the answer continues the last message (a
        template that rewrites an assistant's text cannot leave it open: a new turn);
        read with `tokenizer`, a copy of the model's, when given."""
        tok = self.tokenizer if tokenizer is None else tokenizer
        msgs: list[dict[str, Any]] = []
        for m in messages:
            d: dict[str, Any] = {"role": m.role, "content": content_of(m)}
            if m.tool_calls:
                d["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            msgs.append(d)
        extra: dict[str, Any] = {}
        if tools and self.supports_tools:
            extra["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.function.name,
                        "description": t.function.description,
                        "parameters": t.function.parameters,
                    },
                }
                for t in tools
            ]
        specials = [t for t in getattr(tok, "all_special_tokens", ()) if t]
        writing = [i for i, d in enumerate(msgs) if any(t in d["content"] for t in specials)]
        if continues(messages):
            # The answer goes on from the assistant's own words (as Anthropic's API and
            # Ollama read a final assistant message), not in a new turn after them.
            try:
                extra_open = {**extra, "continue_final_message": True}
                return self._render(tok, msgs, writing, extra_open), True
            except ValueError:
                # The template rewrites an assistant's text (one that drops its reasoning,
                # <think>...</think>), so transformers cannot find it to leave it open.
                pass
        elif messages and messages[-1].role == "assistant" and not messages[-1].tool_calls:
            msgs.pop()  # an empty one: nothing to go on from, the turn opens as for any answer
        return self._render(tok, msgs, writing, {**extra, "add_generation_prompt": True}), False

    def _render(
        self, tok: Any, msgs: list[dict[str, Any]], writing: list[int], extra: dict[str, Any]
    ) -> list[int]:
        if not writing:
            return list(tok.apply_chat_template(msgs, **extra))
        return self._encode_as_text(tok, msgs, writing, extra)

    def _encode_as_text(
        self, tok: Any, msgs: list[dict[str, Any]], writing: list[int], extra: dict[str, Any]
    ) -> list[int]:
        """The template's tokens, with the text of the messages at `writing` (those that
        write a control token such as `<|im_end|><|im_start|>assistant`) encoded as text,
        so that a message cannot end its turn or forge another (as OpenAI's API reads it)."""
        texts: dict[str, str] = {}
        marked = list(msgs)
        for i in writing:
            mark = f"\x00stella-text-{i}\x00"
            texts[mark] = msgs[i]["content"]
            marked[i] = {**msgs[i], "content": mark}
        rendered = tok.apply_chat_template(marked, tokenize=False, **extra)
        ids: list[int] = []
        for piece in re.split("(\x00stella-text-\\d+\x00)", rendered):
            if piece in texts:
                # Switches the tokenizer's encode_special_tokens, which it keeps between
                # calls (the next encode switches it back): one thread per tokenizer.
                ids += tok.encode(texts[piece], add_special_tokens=False, split_special_tokens=True)
            elif piece:
                ids += tok.encode(piece, add_special_tokens=False)
        return ids

    def release(self) -> None:
        """Drop the weights, caches and the counts' tokenizer (on the MLX thread)."""
        import mlx.core as mx

        self.model = None
        self.caches = None
        self.count_tokenizer = None
        mx.clear_cache()


def continues(messages: list[Message]) -> bool:
    """Whether the answer continues the last message: the assistant's own text (a
    prefill), not a turn of tool calls."""
    last = messages[-1] if messages else None
    return (
        last is not None
        and last.role == "assistant"
        and not last.tool_calls
        and bool(content_of(last))
    )


def load_model(path: str) -> LoadedModel:
    """mlx_lm.load on this thread."""
    import mlx_lm

    # A third item, the config, comes only with return_config (the stub allows both).
    model, tokenizer = mlx_lm.load(path)[:2]
    template = getattr(tokenizer, "chat_template", None) or ""
    lm = LoadedModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        supports_tools="tools" in str(template),
        tool_calling=bool(getattr(tokenizer, "has_tool_calling", False)),
    )
    context = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    lm.context = context if isinstance(context, int) and context > 0 else None
    # A prompt past the context is refused before the model sees it (ContextTooLong): the
    # tokenizer's own plain-text warning, on stderr, would only say it less well.
    warned = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    lm.vocab = vocab if isinstance(vocab, int) and vocab > 0 else None
    lm.nbytes = _nbytes(model)
    return lm


def _nbytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    # A list of (name, array) pairs without a `destination` (the stub allows a dict too).
    flat = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    return int(sum(v.nbytes for _, v in flat))


def dequantize(lm: LoadedModel, dtype: str) -> None:
    """Replace quantized layers with plain ones of `dtype` (faster on a CPU)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    target = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    swaps = []
    for name, module in lm.model.named_modules():
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
            weight = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            ).astype(target)
            if isinstance(module, nn.QuantizedEmbedding):
                plain: Any = nn.Embedding(*weight.shape)
            else:
                has_bias = "bias" in module
                plain = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
                if has_bias:
                    plain.bias = module.bias
            plain.weight = weight
            swaps.append((name, plain))
    if swaps:
        lm.model.update_modules(tree_unflatten(swaps))
        mx.eval(lm.model.parameters())
        lm.nbytes = _nbytes(lm.model)


def sampling(p: dict[str, Any]) -> tuple[Any, Any]:
    """The request's sampler and logits processors (mlx-lm's)."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    sampler = make_sampler(p["temperature"], p["top_p"], p["min_p"], 1, p["top_k"])
    processors = make_logits_processors(
        logit_bias=p["logit_bias"],
        repetition_penalty=p["repetition_penalty"],
        repetition_context_size=PENALTY_WINDOW,
        presence_penalty=p["presence_penalty"],
        presence_context_size=PENALTY_WINDOW,
        frequency_penalty=p["frequency_penalty"],
        frequency_context_size=PENALTY_WINDOW,
    )
    return sampler, processors or None


def seeing(processors: list[Any] | None, before: list[int]) -> list[Any] | None:
    """The logits processors, each shown the last PENALTY_WINDOW of `before` (the cached
    prompt prefix) ahead of the tokens mlx-lm gives it."""
    if not processors or not before:
        return processors
    import mlx.core as mx

    # mlx-lm's history starts at the first token it reads: without the cached prefix's
    # tail, a penalty's window would reach less far into the prompt on a cache hit, and
    # the same greedy request would answer otherwise once another had filled the cache.
    head = mx.array(before[-PENALTY_WINDOW:])

    def shown(processor: Any) -> Any:
        def run(tokens: Any, logits: Any) -> Any:
            if len(tokens) < PENALTY_WINDOW:  # past the window the prefix is out of sight
                tokens = mx.concat([head, tokens])
            return processor(tokens, logits)

        return run

    return [shown(processor) for processor in processors]


def prompt_of(
    lm: LoadedModel, messages: list[Message], tools: list[Tool] | None, tokenizer: Any = None
) -> tuple[list[int], bool]:
    """The prompt a generation of `messages` reads (LoadedModel.encode: its token ids, and
    whether the answer continues the last message); a conversation the model's chat
    template refuses is a 400. It runs the tokenizer alone, no MLX; read with `tokenizer`
    when given, a copy of the model's that no other thread uses (see count_prompt)."""
    from jinja2 import TemplateError

    try:
        return lm.encode(messages, tools, tokenizer)
    except TemplateError as exc:
        # The model's chat template refused the conversation (its raise_exception: a role
        # it has no place for, roles that do not alternate): the request's fault.
        raise InvalidRequest(
            f"$.messages: the model's chat template refuses them: {exc}", param="messages"
        ) from None


def count_prompt(lm: LoadedModel, messages: list[Message], tools: list[Tool] | None) -> int:
    """The tokens of the prompt a generation of `messages` reads, counted on the backend's
    one counting thread with the model's copy of its tokenizer: the worker keeps the
    original to itself, so a count never switches a generation's control-token reading."""
    tokenizer = lm.count_tokenizer  # once: an unload may clear the field meanwhile
    if tokenizer is None:
        # Only read from the original (a fast tokenizer's state goes as its serialized
        # form), and every encode sets the switches it needs, whatever the copy's were.
        tokenizer = lm.count_tokenizer = copy.deepcopy(lm.tokenizer)
    return len(prompt_of(lm, messages, tools, tokenizer)[0])


def generate_into(job: GenerationJob) -> None:
    """Run one chat generation, emitting ("token", text, finish, prompt_n, completion_n);
    before them ("started",), ("prompt", n), ("cached", n), and ("step", done) for each
    step of the prompt pass."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import (
        LRUPromptCache,
        can_trim_prompt_cache,
        make_prompt_cache,
        trim_prompt_cache,
    )

    p = job.params
    lm: LoadedModel = p["model"]
    stats = p["stats"]
    job.emit(("started",))
    prompt, keep_space = prompt_of(lm, p["messages"], p["tools"])
    max_tokens = p["max_tokens"]
    if lm.context:
        room = lm.context - len(prompt)
        if room < 1:
            raise ContextTooLong(
                f"the prompt is {len(prompt)} tokens; the model's context holds {lm.context}",
                param="messages",
            )
        max_tokens = min(max_tokens, room)  # the answer ends at the context's end: "length"
    # Not tried on a dummy row of logits before the prompt: such a draw leaves MLX state
    # that makes the process abort at exit. The one option mlx-lm checks only when it
    # samples (top_k against the vocabulary) the backend settles before the job.
    sampler, processors = sampling(p)
    job.emit(("prompt", len(prompt)))  # a prompt that is read: charged even if cut short
    # MLX's generator is global (safe: this thread owns MLX). An unseeded call draws
    # from fresh entropy: else a seeded call before it would fix its "random" answer.
    seed = p["seed"]
    if seed is None or seed < 0:  # a negative seed means unseeded, as llama.cpp has it
        seed = int.from_bytes(os.urandom(8), "little")
    mx.random.seed(seed)
    budget = p["prompt_cache_bytes"]
    keep = p["prompt_cache_size"] > 0 and budget > 0
    if lm.caches is None:
        lm.caches = LRUPromptCache(max_size=max(1, p["prompt_cache_size"]), max_bytes=budget)
    cache, rest = lm.caches.fetch_nearest_cache(lm.path, prompt)
    if cache is not None and not rest:
        # The very prompt was cached: the last token goes through again for its logits.
        if can_trim_prompt_cache(cache):
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        else:
            cache = None
    if cache is None:
        cache, rest = make_prompt_cache(lm.model), prompt
    job.emit(("cached", len(prompt) - len(rest)))
    processors = seeing(processors, prompt[: len(prompt) - len(rest)])

    def progress(done: int, total: int) -> None:
        stats.beat = time.monotonic()
        if done < total:  # (total, total) comes with the first token: no step of its own
            if job.cancelled:
                raise _Cancelled
            # A sign of life for the call's time limits, as an upstream's keep-alive while
            # it reads a long prompt: one item per step of the prompt pass, none per token.
            job.emit(("step", done))

    key = list(prompt)
    # mlx-lm's streaming detokenizer drops the answer's leading space; a continuation's
    # (keep_space) is part of its text (" Paris." after "The capital of France is").
    after_cancel = 0
    cut = False
    generation = stream_generate(
        lm.model,
        lm.tokenizer,
        rest,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache,
        # Between two steps the job's cancel flag is read: a long prompt that nobody
        # waits for any more stops within a step, not after all of it.
        prefill_step_size=p.get("prefill_step", 512),
        prompt_progress_callback=progress,
    )
    prefill_cut = False
    try:
        for gen in generation:
            key.append(gen.token)
            if job.cancelled:
                after_cancel += 1  # this token was computed after the cancel: stop here
                cut = True
                break
            stats.tokens += 1
            stats.beat = time.monotonic()
            first = not job.first_token and bool(gen.text)
            if first:
                # The first visible text, as a client sees it (the detokenizer may hold a
                # token back until its characters are complete).
                job.first_token = time.perf_counter()
            text = gen.text
            if keep_space and text:
                keep_space = False
                if not text.startswith(" "):
                    said = lm.tokenizer.decode(key[len(prompt) :])  # exact, unlike the stream
                    if said.startswith(" "):
                        text = " " + text
            if gen.finish_reason == "length":
                # The detokenizer holds back the bytes of a character until it is whole,
                # and its finalize() decodes what it still holds with errors="replace": a
                # character cut by max_tokens would end the answer as U+FFFD. Those bytes
                # are dropped instead (the text before them was sent whole).
                text = text.rstrip("\ufffd")
            job.emit(("token", text, gen.finish_reason, len(prompt), gen.generation_tokens))
            if first:
                # Building the next step holds the GIL for milliseconds at a time; the event
                # loop would wait that long to send the first token. Let it send first.
                job.handed.wait(HANDOFF_WAIT_S)
            if gen.finish_reason is not None:
                break
    except _Cancelled:
        cut = prefill_cut = True  # stopped inside the prompt pass
    finally:
        generation.close()
    if cut:
        stats.cancelled += 1
        stats.tokens_after_cancel += after_cancel
        stats.max_tokens_after_cancel = max(stats.max_tokens_after_cancel, after_cancel)
        _log.info(
            "mlx_generation_stopped",
            request_id=p.get("request_id", ""),
            tokens=len(key) - len(prompt),
            tokens_after_cancel=after_cancel,
            in_prompt=prefill_cut,
        )
    # A cache cut inside the prompt pass holds part of the prompt: not one to reuse. One
    # over the whole budget is not stored either: it would only push out the others
    # (its own prefixes first) before being dropped itself.
    if keep and not prefill_cut and sum(c.nbytes for c in cache) <= budget:
        lm.caches.insert_cache(lm.path, key, cache)
