"""What the API does, between the HTTP routes and the engine interface.

Turns validated requests into token-id prompts and `SamplingSpec`s, fans out prompts x `n` into
engine sequences, records metrics on the way, and shapes the replies. Knows the `Engine` interface
only, never an implementation.

Every sequence asks the engine for the top-20 log-probabilities of each generated token, whatever
the client asked: the confidence and entropy metrics need them. The client gets what it asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .calibration import Answer, FeedbackStore, ShadowScorer
from .config import ServerConfig
from .engine import (
    MAX_TOP_LOGPROBS,
    Chunk,
    Engine,
    EngineNotReady,
    InvalidRequest,
    SamplingSpec,
    TokenLogprobs,
)
from .errors import ApiError, bad_request, internal_error, model_not_found, not_found, unavailable
from .logprobs import TokenStrings, chat_logprobs, completion_logprobs
from .metrics import Metrics
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageIn,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FeedbackRequest,
    FeedbackResponse,
    Usage,
    new_id,
)
from .routing import Route, Router, UnknownModel

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str | None  # None for token-id prompts until needed (echo decodes it)


@dataclass
class Call:
    """One API request being served."""

    id: str
    route: Route
    arrival: float  # time.perf_counter() when the request arrived
    shadow: bool  # whether the other variant also scores this request
    first_token_seen: bool = False


@dataclass
class Result:
    """A finished sequence."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def add(self, chunk: Chunk) -> None:
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.text += chunk.text
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.stop_reason = chunk.stop_reason or self.stop_reason
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs

    @property
    def confidence(self) -> float | None:
        return math.exp(self.logprobs[0].logprob) if self.logprobs else None


def sse(payload: Any) -> str:
    body = payload.model_dump_json(exclude_none=True) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """asyncio.gather that cancels the rest when one fails (a failed request frees the engine)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index; the first error ends it."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
        except Exception as err:
            await queue.put((index, None, err))
        else:
            await queue.put((index, done, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item, err = await queue.get()
            if err is not None:
                raise err
            if item is done:
                remaining -= 1
                continue
            yield index, item
    finally:  # client gone or an error: stop the other sequences too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Service:
    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        self.router = Router(config.name, config.ab_split)
        self.shadow = ShadowScorer(engine, metrics, config.shadow_rate, max_pending=config.max_concurrency)
        self.feedback = FeedbackStore()
        self._strings: TokenStrings | None = None
        self.started = False  # set once the engine is up and the app has recorded what it serves

    @property
    def ready(self) -> bool:
        return self.started and self.engine.ready

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def patched(self) -> bool:
        return self.engine.patch_state is not None

    @property
    def strings(self) -> TokenStrings:
        if self._strings is None:
            self._strings = TokenStrings(self.engine.tokenizer)
        return self._strings

    def model_names(self) -> list[str]:
        return self.router.model_names(self.patched)

    def start_call(self, model: str, user: str | None, prefix: str) -> Call:
        try:
            route = self.router.route(model, user, self.patched)
        except UnknownModel as err:
            raise model_not_found(str(err)) from None
        return Call(new_id(prefix), route, time.perf_counter(), self.shadow.draw())

    def check_model(self, model: str | None) -> None:
        try:
            self.router.check(model, self.patched)
        except UnknownModel as err:
            raise model_not_found(str(err)) from None

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def completion_prompts(self, request: CompletionRequest) -> list[Prompt]:
        vocab = len(self.engine.tokenizer)
        prompts = []
        for i, p in enumerate(request.prompts()):
            if isinstance(p, str):
                ids = self.tokenize(p, add_special_tokens=True)
                if not ids:
                    raise bad_request(f"prompt {i} is empty (no tokens)", "prompt")
                prompts.append(Prompt(ids, p))
                continue
            if max(p) >= vocab:
                raise bad_request(f"prompt {i} holds token id {max(p)}; the vocabulary has {vocab} tokens", "prompt")
            prompts.append(Prompt(list(p), None))
        return prompts

    def render_chat(self, messages: Sequence[ChatMessageIn], add_generation_prompt: bool) -> str:
        tokenizer = self.engine.tokenizer
        template = tokenizer.chat_template or self.config.chat_template
        if not template:
            raise bad_request(
                f"the model {self.config.name} has no chat template, so /v1/chat/completions cannot format "
                "messages; use /v1/completions, or start the server with --chat-template FILE",
                "messages", "chat_template_missing")
        conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in messages]
        try:
            return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as err:  # Jinja raises TemplateError and friends for messages a template refuses
            raise bad_request(f"the chat template refused these messages: {err}", "messages") from None

    def chat_prompt(self, request: ChatCompletionRequest) -> Prompt:
        text = self.render_chat(request.messages, request.add_generation_prompt)
        # The template already holds the special tokens it wants (vLLM's default, too).
        return Prompt(self.tokenize(text, add_special_tokens=False), text)

    def check_length(self, prompt: Prompt, max_tokens: int, param: str) -> None:
        limit = self.engine.max_model_len
        if len(prompt.ids) + max(max_tokens, 1) <= limit:
            return
        if len(prompt.ids) >= limit:
            raise bad_request(f"the prompt has {len(prompt.ids)} tokens; this model's context is {limit} tokens "
                              "(prompt and completion together)", param, "context_length_exceeded")
        raise bad_request(f"the prompt has {len(prompt.ids)} tokens and max_tokens is {max_tokens}: more than "
                          f"this model's context of {limit} tokens", "max_tokens", "context_length_exceeded")

    # -- sequences -------------------------------------------------------------------------------------
    async def sequence(self, call: Call, prompt: Prompt, spec: SamplingSpec, index: int,
                       shadow: bool) -> AsyncIterator[Chunk]:
        """Engine chunks of one sequence, with its metrics recorded (and a shadow scoring started)."""
        variant = call.route.variant
        first = True
        try:
            async for chunk in self.engine.generate(variant, prompt.ids, spec, f"{call.id}-{index}"):
                if chunk.logprobs:
                    if first:
                        first = False
                        if not call.first_token_seen:
                            call.first_token_seen = True
                            self.metrics.observe_ttft(variant, time.perf_counter() - call.arrival)
                        self.metrics.observe_first_token(variant, chunk.logprobs[0])
                        if shadow:
                            self.shadow.submit(variant, prompt.ids, chunk.logprobs[0], call.id)
                    self.metrics.observe_tokens(variant, chunk.logprobs)
                yield chunk
        except EngineNotReady as err:
            raise unavailable(str(err)) from None
        except InvalidRequest as err:
            raise bad_request(str(err), err.param) from None

    async def collect(self, call: Call, prompt: Prompt, spec: SamplingSpec, index: int, shadow: bool) -> Result:
        result = Result()
        async for chunk in self.sequence(call, prompt, spec, index, shadow):
            result.add(chunk)
        return result

    def _fan_out(self, call: Call, prompts: list[Prompt], spec: SamplingSpec, n: int) -> list[tuple[Prompt, Any]]:
        """(prompt, sequence args) per choice, in OpenAI's order: prompt-major, then the n samples.
        Sample j gets seed + j, so a seeded request with n > 1 still gives n different samples."""
        for prompt in prompts:
            self.metrics.observe_prompt(call.route.variant, len(prompt.ids))
        jobs = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                seq_spec = replace(spec, seed=(spec.seed + j) % 2**63) if spec.seed is not None and j else spec
                jobs.append((prompt, (call, prompt, seq_spec, p * n + j, call.shadow and j == 0)))
        return jobs

    def remember(self, call: Call, results: Sequence[Result]) -> None:
        self.feedback.remember(call.id, Answer(call.route.variant, tuple(r.confidence for r in results)))

    # -- /v1/completions -------------------------------------------------------------------------------
    def completion_spec(self, request: CompletionRequest, prompts: list[Prompt]) -> SamplingSpec:
        for prompt in prompts:
            self.check_length(prompt, request.max_tokens, "prompt")
        echo_scores = request.echo and request.logprobs is not None
        return SamplingSpec(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=tuple(request.stop or ()), top_logprobs=MAX_TOP_LOGPROBS,
            prompt_logprobs=request.logprobs if echo_scores else None,
        )

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.engine.tokenizer.decode(prompt.ids)

    def completion_choice(self, request: CompletionRequest, index: int, prompt: Prompt, result: Result,
                          echo: bool, offset: int = 0) -> CompletionChoice:
        """A choice for `result` (a whole sequence, or one streamed piece of it); `echo`: prepend the prompt."""
        token_ids = result.token_ids
        entries: list[TokenLogprobs | None] = list(result.logprobs)
        text = result.text
        if echo:
            text = self._prompt_text(prompt) + text
            token_ids = prompt.ids + token_ids
            entries = (result.prompt_logprobs or [None] * len(prompt.ids)) + entries
        logprobs = None
        if request.logprobs is not None:
            logprobs = completion_logprobs(token_ids, entries, request.logprobs, self.strings, offset)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=result.finish_reason,
                                stop_reason=result.stop_reason)

    async def complete(self, request: CompletionRequest, call: Call, prompts: list[Prompt],
                       spec: SamplingSpec) -> CompletionResponse:
        jobs = self._fan_out(call, prompts, spec, request.n)
        results = await gather_all([self.collect(*args) for _, args in jobs])
        choices = [self.completion_choice(request, i, prompt, result, request.echo)
                   for i, ((prompt, _), result) in enumerate(zip(jobs, results, strict=True))]
        self.remember(call, results)
        return CompletionResponse(id=call.id, model=call.route.model, choices=choices,
                                  usage=self._usage(prompts, results))

    async def _framed(self, call: Call, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Server-sent events of one call, ended by [DONE]. Once the headers are sent an error can only
        travel in the stream: the client gets an OpenAI-shaped error event, the trace goes to the log."""
        try:
            async for event in events:
                yield event
        except ApiError as err:
            yield err.sse()
        except Exception:
            log.exception("stream %s failed", call.id)
            yield internal_error(call.id).sse()
        yield "data: [DONE]\n\n"

    def complete_stream(self, request: CompletionRequest, call: Call, prompts: list[Prompt],
                        spec: SamplingSpec) -> AsyncIterator[str]:
        return self._framed(call, self._completion_events(request, call, prompts, spec))

    async def _completion_events(self, request: CompletionRequest, call: Call, prompts: list[Prompt],
                                 spec: SamplingSpec) -> AsyncIterator[str]:
        jobs = self._fan_out(call, prompts, spec, request.n)
        created = int(time.time())
        results = [Result() for _ in jobs]
        offsets = [0] * len(jobs)  # text_offset continues across a choice's pieces
        echoed = [not request.echo] * len(jobs)  # the prompt goes out with a choice's first piece
        async for i, chunk in merge([self.sequence(*args) for _, args in jobs]):
            piece = Result()
            piece.add(chunk)
            choice = self.completion_choice(request, i, jobs[i][0], piece, not echoed[i], offsets[i])
            echoed[i] = True
            if choice.logprobs is not None and choice.logprobs.tokens:
                offsets[i] = choice.logprobs.text_offset[-1] + len(choice.logprobs.tokens[-1])
            else:
                offsets[i] += len(choice.text)
            results[i].add(chunk)
            yield sse(CompletionResponse(id=call.id, created=created, model=call.route.model, choices=[choice]))
        self.remember(call, results)
        if request.stream_options and request.stream_options.include_usage:
            yield sse(CompletionResponse(id=call.id, created=created, model=call.route.model, choices=[],
                                         usage=self._usage(prompts, results)))

    @staticmethod
    def _usage(prompts: Sequence[Prompt], results: Sequence[Result]) -> Usage:
        prompt_tokens = sum(len(p.ids) for p in prompts)
        completion_tokens = sum(len(r.token_ids) for r in results)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    # -- /v1/chat/completions --------------------------------------------------------------------------
    def chat_spec(self, request: ChatCompletionRequest, prompt: Prompt) -> SamplingSpec:
        limit = request.token_limit
        if limit is None:  # OpenAI's default: as much as the context leaves
            limit = max(self.engine.max_model_len - len(prompt.ids), 1)
        self.check_length(prompt, limit, "messages")
        return SamplingSpec(max_tokens=limit, temperature=request.temperature, top_p=request.top_p,
                            seed=request.seed, stop=tuple(request.stop or ()), top_logprobs=MAX_TOP_LOGPROBS)

    def _chat_logprobs(self, request: ChatCompletionRequest, entries: list[TokenLogprobs]) -> Any:
        return chat_logprobs(entries, request.top_logprobs or 0, self.strings) if request.logprobs else None

    async def chat(self, request: ChatCompletionRequest, call: Call, prompt: Prompt,
                   spec: SamplingSpec) -> ChatCompletionResponse:
        jobs = self._fan_out(call, [prompt], spec, request.n)
        results = await gather_all([self.collect(*args) for _, args in jobs])
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=r.text),
                              logprobs=self._chat_logprobs(request, r.logprobs),
                              finish_reason=r.finish_reason, stop_reason=r.stop_reason)  # type: ignore[arg-type]
                   for i, r in enumerate(results)]
        self.remember(call, results)
        return ChatCompletionResponse(id=call.id, model=call.route.model, choices=choices,
                                      usage=self._usage([prompt], results))

    def chat_stream(self, request: ChatCompletionRequest, call: Call, prompt: Prompt,
                    spec: SamplingSpec) -> AsyncIterator[str]:
        return self._framed(call, self._chat_events(request, call, prompt, spec))

    async def _chat_events(self, request: ChatCompletionRequest, call: Call, prompt: Prompt,
                           spec: SamplingSpec) -> AsyncIterator[str]:
        jobs = self._fan_out(call, [prompt], spec, request.n)
        created = int(time.time())
        results = [Result() for _ in jobs]

        def chunk_of(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=call.id, created=created, model=call.route.model, choices=[choice]))

        for i in range(len(jobs)):  # OpenAI opens each choice with the role
            yield chunk_of(ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content="")))
        async for i, chunk in merge([self.sequence(*args) for _, args in jobs]):
            results[i].add(chunk)
            if not (chunk.text or chunk.token_ids or chunk.finish_reason):
                continue
            yield chunk_of(ChatStreamChoice(
                index=i, delta=ChatDelta(content=chunk.text or None),
                logprobs=self._chat_logprobs(request, chunk.logprobs) if chunk.logprobs else None,
                finish_reason=chunk.finish_reason, stop_reason=chunk.stop_reason))
        self.remember(call, results)
        if request.stream_options and request.stream_options.include_usage:
            yield sse(ChatCompletionChunk(id=call.id, created=created, model=call.route.model, choices=[],
                                          usage=self._usage([prompt], results)))

    # -- /v1/feedback ----------------------------------------------------------------------------------
    def rate(self, request: FeedbackRequest) -> FeedbackResponse:
        rated = self.feedback.rate(request.id, request.index)
        if rated is None:
            raise not_found(f"no answer {request.id!r} (choice {request.index}) awaits feedback: unknown, "
                            "expired, already rated, or nothing was generated", "id")
        variant, confidence = rated
        self.metrics.observe_feedback(variant, confidence, request.correct)
        return FeedbackResponse(variant=variant, confidence=confidence)
