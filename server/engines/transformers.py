"""The transformers engine: the fallback where vLLM is absent.

The patched variant is a second module tree that shares every parameter and buffer with the base
model except the tensors the patch edits (its own copies, scaled): two variants for the memory of one
plus a few projections. All torch work runs on one worker thread, a step (prefill or one token) at a
time, so concurrent requests interleave token by token and the event loop never blocks. No batching:
this engine favours being exact and simple over throughput (use vLLM for throughput).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from recallfix.patches import Patch, PatchError, apply_patch, check_patch_against
from recallfix.patches.io import load_causal_lm, resolve_model_dir

from ..config import ServerConfig
from ..engine import (
    Chunk,
    Engine,
    EngineNotReady,
    PatchRefused,
    PatchState,
    SamplingSpec,
    TokenLogprobs,
    Variant,
)
from ..patching import DTYPES
from ..textstream import TextStream

log = logging.getLogger(__name__)
T = TypeVar("T")


def patched_copy(base: nn.Module, patch: Patch) -> tuple[nn.Module, list[str]]:
    """The patched model: shares every tensor of `base` but the edited ones. Returns it and the names of
    the tensors it owns. Refuses (PatchRefused) before copying anything if the patch does not fit."""
    try:
        edits = check_patch_against(base, patch)  # fingerprint, and the edited weights stay finite
    except PatchError as err:
        raise PatchRefused(str(err)) from None
    params = dict(base.named_parameters())
    edited = sorted({edit.tensor for edit in edits})
    # deepcopy returns what the memo maps an object's id to: shared tensors are handed back as they are.
    memo: dict[int, Any] = {id(p): p for name, p in params.items() if name not in edited}
    memo.update({id(b): b for b in base.buffers()})
    patched = copy.deepcopy(base, memo)
    apply_patch(patched, patch)  # on the copy's own tensors; never reverted: the copy is dropped when replaced
    return patched.eval(), edited


@dataclass
class _Sequence:
    """The state of one sequence being generated."""

    prompt_len: int
    spec: SamplingSpec
    text: TextStream
    generator: torch.Generator | None
    past: Any = None  # the model's KV cache
    next_logits: torch.Tensor | None = None  # logits for the next position
    generated: list[int] = field(default_factory=list)


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recallfix-torch")
        self._swap = asyncio.Lock()
        self._tokenizer: Any = None
        self._models: dict[Variant, nn.Module] = {}
        self._patch: PatchState | None = None
        self._max_len = 0
        self._eos: set[int] = set()
        self._ready = False

    # -- Engine properties -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def dead(self) -> bool:
        return False  # in-process: if torch fails, the request fails, not the engine

    @property
    def patch_state(self) -> PatchState | None:
        return self._patch

    # -- lifecycle -------------------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self, patch: Patch | None) -> None:
        await self._run(self._load)
        if patch is not None:
            await self.load_patch(patch)
        await self._run(self._warm_up)
        self._ready = True

    def _load(self) -> None:
        cfg = self._config
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # auto: float32 on CPU (half precision is slow there), the checkpoint's own dtype on a GPU.
        dtype = DTYPES.get(cfg.dtype) or (torch.float32 if device == "cpu" else "auto")
        started = time.perf_counter()
        model_dir = resolve_model_dir(cfg.model)
        model, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=device,
                                          trust_remote_code=cfg.trust_remote_code)
        self._models["base"], self._tokenizer = model, tokenizer
        mc = model.config
        limit = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None) or 2048
        if cfg.max_model_len and cfg.max_model_len > limit:
            raise ValueError(f"--max-model-len {cfg.max_model_len} exceeds the model's {limit} positions")
        self._max_len = cfg.max_model_len or limit
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self._eos = {e for e in ([eos] if isinstance(eos, int) else eos or []) if e is not None}
        if tokenizer.eos_token_id is not None:
            self._eos.add(tokenizer.eos_token_id)
        log.info("transformers engine: loaded %s (%s, %s on %s) in %.1f s; max_model_len %d",
                 model_dir, mc.model_type, str(model.dtype).removeprefix("torch."), device,
                 time.perf_counter() - started, self._max_len)

    def _warm_up(self) -> None:
        ids = torch.tensor([[self._tokenizer.eos_token_id or 0]], device=self._device)
        with torch.inference_mode():
            for model in self._models.values():
                model(input_ids=ids)

    async def stop(self) -> None:
        self._ready = False
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._models.clear()

    async def load_patch(self, patch: Patch) -> PatchState:
        async with self._swap:  # one swap at a time; requests keep using the model they started with
            started = time.perf_counter()
            patched, edited = await self._run(patched_copy, self._models["base"], patch)
            shared = len(list(patched.parameters())) - len(edited)
            state = PatchState.of(patch, "in-memory",
                                  f"patched variant shares {shared} tensors with base and owns {len(edited)} "
                                  f"edited ones ({', '.join(edited)})")
            self._models["patched"], self._patch = patched, state
            log.info("transformers engine: patch %s applied in memory in %.2f s: %s",
                     patch.id, time.perf_counter() - started, state.detail)
            return state

    # -- generation ------------------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return next(self._models["base"].parameters()).device

    def _model(self, variant: Variant) -> nn.Module:
        try:
            return self._models[variant]
        except KeyError:
            raise EngineNotReady(f"no {variant} variant is loaded (the engine is starting, or has no patch)") from None

    async def generate(self, variant: Variant, prompt_ids: list[int], spec: SamplingSpec,
                       request_id: str) -> AsyncIterator[Chunk]:
        model = self._model(variant)  # the model at request start serves the whole request
        generator = None
        if spec.temperature > 0:
            generator = torch.Generator(device=self._device)
            if spec.seed is not None:
                generator.manual_seed(spec.seed)
            else:
                generator.seed()
        seq = _Sequence(len(prompt_ids), spec, TextStream(self._tokenizer, spec.stop), generator)
        chunk = await self._run(self._prefill, model, prompt_ids, seq)
        while True:
            yield chunk
            if chunk.finish_reason is not None:
                return
            chunk = await self._run(self._step, model, seq)

    @torch.inference_mode()
    def _prefill(self, model: nn.Module, prompt_ids: list[int], seq: _Sequence) -> Chunk:
        out = model(input_ids=torch.tensor([prompt_ids], device=self._device), use_cache=True)
        logits = out.logits[0].float()
        chunk = Chunk()
        if seq.spec.prompt_logprobs is not None:
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            chunk.prompt_logprobs = [None] + [
                _token_logprobs(logprobs[i], prompt_ids[i + 1], seq.spec.prompt_logprobs)
                for i in range(len(prompt_ids) - 1)
            ]
        seq.past, seq.next_logits = out.past_key_values, logits[-1]
        if seq.spec.max_tokens == 0:
            chunk.finish_reason = "length"
            return chunk
        return self._sample_into(model, seq, chunk)

    @torch.inference_mode()
    def _step(self, model: nn.Module, seq: _Sequence) -> Chunk:
        return self._sample_into(model, seq, Chunk())

    def _sample_into(self, model: nn.Module, seq: _Sequence, chunk: Chunk) -> Chunk:
        """Sample the next token from seq.next_logits, record it in `chunk`, and run the model on it
        unless the sequence is finished."""
        assert seq.next_logits is not None
        spec = seq.spec
        logprobs = torch.log_softmax(seq.next_logits, dim=-1)
        token = _sample(seq.next_logits, spec, seq.generator)
        seq.generated.append(token)
        chunk.token_ids.append(token)
        chunk.logprobs.append(_token_logprobs(logprobs, token, spec.top_logprobs))
        text, stop = seq.text.push(token)
        chunk.text = text
        if stop is not None:
            chunk.finish_reason, chunk.stop_reason = "stop", stop
        elif token in self._eos:
            chunk.finish_reason = "stop"
        elif len(seq.generated) >= spec.max_tokens or seq.prompt_len + len(seq.generated) >= self._max_len:
            chunk.finish_reason = "length"
        if chunk.finish_reason is not None:
            if stop is None:
                chunk.text += seq.text.flush()
            return chunk
        out = model(input_ids=torch.tensor([[token]], device=self._device), past_key_values=seq.past, use_cache=True)
        seq.past, seq.next_logits = out.past_key_values, out.logits[0, -1].float()
        return chunk


def _token_logprobs(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    values, ids = logprobs.topk(min(k, logprobs.numel()))
    return TokenLogprobs(token, float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist(), strict=True)))


def _sample(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator | None) -> int:
    if spec.temperature == 0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / spec.temperature, dim=-1)
    if spec.top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (always at least one).
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= spec.top_p
        sorted_probs[outside] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
