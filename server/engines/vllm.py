"""The vLLM engine: in-process `AsyncLLM` (its engine core runs in a spawned process).

How the patched variant is served:
- LoRA (preferred): the patch is exported as a PEFT adapter (into the cache directory) and ONE engine
  serves base (no adapter) and patched (the adapter), batched together. Exact: the adapter's B @ A is
  the weight change, scaling 1.
- merged (otherwise: the architecture has no LoRA in vLLM, the patch scales a bias, the adapter's rank
  is above what the engine was started with, or --no-lora): the merged checkpoint runs in a second
  engine.
A new patch is checked and prepared beside the running variants and swapped in only once it serves;
a refusal leaves everything as it was. Code that creates this engine must run under
`if __name__ == "__main__":` (vLLM spawns its engine core).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import tokens_input
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from recallfix.patches import Patch, PatchError, check_patch_against
from recallfix.patches.components import ComponentMap, UnsupportedModelError
from recallfix.patches.export import export_lora, export_merged
from recallfix.patches.io import resolve_model_dir

from ..config import ServerConfig
from ..engine import (
    MAX_TOP_LOGPROBS,
    Chunk,
    Engine,
    EngineNotReady,
    InvalidRequest,
    PatchRefused,
    PatchState,
    SamplingSpec,
    TokenLogprobs,
    Variant,
)
from ..patching import DTYPES, adapter_rank, cache_key, vllm_lora_rank

log = logging.getLogger(__name__)

DEFAULT_LORA_RANK = 64  # when started without a patch: room for two heads of dim 32 or one of 64
DRAIN_TIMEOUT_S = 120.0  # how long a replaced merged engine may finish its requests before it stops


def _convert(entry: dict[int, Any], token: int, k: int) -> TokenLogprobs:
    """vLLM's {token id: Logprob} (the token itself plus the k most likely) as TokenLogprobs."""
    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k)
    return TokenLogprobs(token, float(entry[token].logprob), tuple((tid, float(lp)) for _, tid, lp in top))


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._model_dir: Path | None = None
        self._tokenizer: Any = None
        self._base: Any = None  # AsyncLLM serving base (and patched, in LoRA mode)
        self._merged: Any = None  # AsyncLLM serving patched, in merged mode
        self._lora: Any = None  # LoRARequest of the patched variant, in LoRA mode
        self._lora_rank: int | None = None  # the base engine's max_lora_rank; None: LoRA off
        self._no_lora_reason = ""
        self._lora_targets: list[str] = []
        self._lora_ids = itertools.count(1)
        self._patch: PatchState | None = None
        self._in_flight: dict[int, int] = {}  # id(AsyncLLM) -> requests running on it
        self._swap = asyncio.Lock()
        self._gpu_share = config.gpu_memory_utilization
        self._ready = False

    # -- Engine properties -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self._base.model_config.max_model_len)

    @property
    def dead(self) -> bool:
        return any(llm.errored for llm in (self._base, self._merged) if llm is not None)

    @property
    def ready(self) -> bool:
        return self._ready and not self.dead

    @property
    def patch_state(self) -> PatchState | None:
        return self._patch

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self, patch: Patch | None) -> None:
        cfg = self._config
        self._model_dir = model_dir = await asyncio.to_thread(resolve_model_dir, cfg.model)
        self._tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, model_dir, trust_remote_code=cfg.trust_remote_code)
        hf_config = await asyncio.to_thread(AutoConfig.from_pretrained, model_dir,
                                            trust_remote_code=cfg.trust_remote_code)
        self._lora_rank = await self._choose_lora_rank(hf_config, patch)
        not_lora = await self._lora_refusal(patch) if patch is not None else None
        if patch is None or not_lora is None:
            self._base = await self._start_llm(model_dir, self._lora_rank, "base")
            if patch is not None:
                await self.load_patch(patch)
        else:
            # Merged: a third of the GPU share stays free, so a new patch's engine can start beside the
            # old one before a swap (on CPU, VLLM_CPU_KVCACHE_SPACE sizes each engine instead). Both
            # engines start at once: each spends its start mostly waiting on its own processes.
            self._gpu_share = cfg.gpu_memory_utilization / 3
            await self._check(patch)
            merged_dir = await self._export(patch, "merged")
            self._base, merged = await asyncio.gather(
                self._start_llm(model_dir, self._lora_rank, "base"), self._start_llm(merged_dir, None, "patched"))
            self._commit(self._merged_state(patch, merged_dir, not_lora), lora=None, merged=merged)
        await self._warm_up()
        self._ready = True

    async def _choose_lora_rank(self, hf_config: Any, patch: Patch | None) -> int | None:
        """max_lora_rank for the base engine, or None to run it without LoRA (and say why)."""
        cfg = self._config
        try:
            spec = ComponentMap.from_config(hf_config).spec
        except UnsupportedModelError as err:
            self._no_lora_reason = str(err)
            return None
        if cfg.no_lora:
            self._no_lora_reason = "--no-lora was given"
            return None
        # LoRA only on the projections patches scale. Cheaper, and it keeps lm_head unwrapped: vLLM's LoRA
        # logits processor breaks prompt_logprobs in mixed batches (vllm-project/vllm#29955).
        self._lora_targets = [spec.attn_out.rsplit(".", 1)[-1], spec.mlp_out.rsplit(".", 1)[-1]]
        if not spec.lora_in_vllm:
            self._no_lora_reason = f"vLLM has no LoRA for {hf_config.model_type}"
            return None
        needed = cfg.max_lora_rank or (0 if patch is not None else DEFAULT_LORA_RANK)
        if patch is not None:
            try:
                needed = max(needed, adapter_rank(await self._export(patch, "lora")))
            except PatchRefused as err:  # LoRA cannot express it: merged, and keep LoRA for later patches
                log.info("vLLM engine: patch %s will be served merged: %s", patch.id, err)
                needed = needed or DEFAULT_LORA_RANK
        try:
            return vllm_lora_rank(needed)
        except PatchRefused as err:
            self._no_lora_reason = str(err)
            return None

    async def _start_llm(self, model_dir: Path, lora_rank: int | None, role: str) -> Any:
        cfg = self._config
        args = AsyncEngineArgs(
            model=str(model_dir), tokenizer=str(self._model_dir), served_model_name=cfg.name,
            dtype=cfg.dtype, max_model_len=cfg.max_model_len, trust_remote_code=cfg.trust_remote_code,
            seed=cfg.seed, max_logprobs=MAX_TOP_LOGPROBS, enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=self._gpu_share,
            # recallfix exports its own metrics; two engines' stat loggers would also collide.
            disable_log_stats=True,
            enable_lora=lora_rank is not None, max_lora_rank=lora_rank or 16,
            max_loras=2,  # the current adapter and the next one, during a swap
            lora_target_modules=self._lora_targets if lora_rank is not None else None,
        )
        started = time.perf_counter()
        log.info("vLLM engine (%s): starting on %s%s", role, model_dir,
                 f" with LoRA (max_lora_rank {lora_rank})" if lora_rank else "")
        # Construction blocks until the engine core is up: off the event loop, so /health answers.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        log.info("vLLM engine (%s): ready in %.1f s", role, time.perf_counter() - started)
        return llm

    async def _warm_up(self) -> None:
        """The first batch is slow; take it here, and prove each variant serves before traffic comes."""
        spec = SamplingSpec(max_tokens=1, temperature=0.0, top_logprobs=1)
        token = self._tokenizer.eos_token_id or 0
        for variant in ("base", "patched") if self._patch else ("base",):
            async for _ in self.generate(variant, [token], spec, f"warm-up-{variant}"):
                pass

    async def stop(self) -> None:
        self._ready = False
        for llm in (self._merged, self._base):
            if llm is not None:
                await asyncio.to_thread(llm.shutdown)
        self._base = self._merged = None

    # -- patches ---------------------------------------------------------------------------------------
    async def _export(self, patch: Patch, kind: str) -> Path:
        """The cached export of `patch` ("lora" adapter or "merged" checkpoint), made if missing.
        Raises PatchRefused (LoraUnsupportedError is one) with the reason."""
        assert self._model_dir is not None
        out = self._config.cache_dir / kind / cache_key(self._model_dir, patch)
        if out.is_dir():  # exports are atomic: a directory that exists is complete
            return out
        export = export_lora if kind == "lora" else export_merged
        started = time.perf_counter()
        try:
            await asyncio.to_thread(export, self._model_dir, patch, out, overwrite=True,
                                    trust_remote_code=self._config.trust_remote_code)
        except PatchError as err:
            raise PatchRefused(str(err)) from None
        log.info("vLLM engine: exported patch %s as %s to %s in %.1f s", patch.id, kind, out,
                 time.perf_counter() - started)
        return out

    async def _lora_refusal(self, patch: Patch) -> str | None:
        """Why the running engine cannot serve `patch` as LoRA, or None when it can."""
        if self._lora_rank is None:
            return self._no_lora_reason
        try:
            rank = adapter_rank(await self._export(patch, "lora"))
        except PatchRefused as err:
            return str(err)
        if rank > self._lora_rank:
            return (f"the adapter's rank {rank} is above this engine's max_lora_rank {self._lora_rank} "
                    f"(restart with --max-lora-rank {vllm_lora_rank(rank)} to serve it as LoRA)")
        return None

    async def _check(self, patch: Patch) -> None:
        """Refuse a patch for another model, or one that makes a weight non-finite in the serving dtype."""
        assert self._model_dir is not None
        try:
            await asyncio.to_thread(check_patch_against, self._model_dir, patch, dtype=DTYPES.get(self._config.dtype),
                                    trust_remote_code=self._config.trust_remote_code)
        except PatchError as err:
            raise PatchRefused(str(err)) from None

    @staticmethod
    def _merged_state(patch: Patch, merged_dir: Path, reason: str) -> PatchState:
        return PatchState.of(patch, "merged", f"merged checkpoint {merged_dir} in a second vLLM engine "
                                              f"(not LoRA: {reason})")

    async def load_patch(self, patch: Patch) -> PatchState:
        async with self._swap:
            await self._check(patch)
            reason = await self._lora_refusal(patch)
            if reason is None:
                adapter = await self._export(patch, "lora")
                lora = LoRARequest(f"{self._config.name}-patch-{patch.id}", next(self._lora_ids), str(adapter))
                try:  # loads it in the engine now, so a bad adapter is refused before any request uses it
                    await self._base.add_lora(lora)
                except Exception as err:  # vLLM raises several types for an adapter it rejects
                    raise PatchRefused(f"vLLM refused the LoRA adapter {adapter}: {err}") from None
                detail = (f"LoRA adapter of rank {adapter_rank(adapter)} (engine max_lora_rank {self._lora_rank}) "
                          f"from {adapter}; one engine serves base and patched")
                return self._commit(PatchState.of(patch, "lora", detail), lora=lora, merged=None)
            merged_dir = await self._export(patch, "merged")
            try:
                merged = await self._start_llm(merged_dir, None, "patched")
            except Exception as err:  # out of memory and the like: the current variants keep serving
                raise PatchRefused(f"the merged engine for patch {patch.id} did not start: {err}") from None
            return self._commit(self._merged_state(patch, merged_dir, reason), lora=None, merged=merged)

    def _commit(self, state: PatchState, *, lora: Any, merged: Any) -> PatchState:
        old_merged = self._merged
        self._lora, self._merged, self._patch = lora, merged, state
        if old_merged is not None:
            asyncio.get_running_loop().create_task(self._retire(old_merged))
        log.info("vLLM engine: serving patch %s as %s: %s", state.patch_id, state.applied, state.detail)
        return state

    async def _retire(self, llm: Any) -> None:
        """Stop a replaced engine once its requests are done (or after DRAIN_TIMEOUT_S)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self._in_flight.get(id(llm), 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.to_thread(llm.shutdown)
        self._in_flight.pop(id(llm), None)
        log.info("vLLM engine: the replaced patched engine has stopped")

    # -- generation ------------------------------------------------------------------------------------
    def _target(self, variant: Variant) -> tuple[Any, Any]:
        """The engine and LoRA request that serve `variant` now."""
        if self._base is None or self.dead:
            raise EngineNotReady("the vLLM engine is " + ("down" if self.dead else "not started"))
        if variant == "base":
            return self._base, None
        if self._merged is not None:
            return self._merged, None
        if self._lora is not None:
            return self._base, self._lora
        raise EngineNotReady("no patched variant is loaded")

    async def generate(self, variant: Variant, prompt_ids: list[int], spec: SamplingSpec,
                       request_id: str) -> AsyncIterator[Chunk]:
        llm, lora = self._target(variant)
        score_only = spec.max_tokens == 0  # vLLM generates at least one token: drop it, as vLLM's echo does
        params = SamplingParams(
            n=1, max_tokens=max(spec.max_tokens, 1), temperature=spec.temperature, top_p=spec.top_p,
            seed=spec.seed, stop=list(spec.stop), logprobs=spec.top_logprobs,
            prompt_logprobs=spec.prompt_logprobs, skip_special_tokens=True, output_kind=RequestOutputKind.DELTA,
        )
        key = id(llm)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            first = True
            async for out in llm.generate(tokens_input(prompt_ids), params, request_id, lora_request=lora):
                chunk = Chunk()
                if first and spec.prompt_logprobs is not None:
                    chunk.prompt_logprobs = [None] + [
                        _convert(entry, prompt_ids[i + 1], spec.prompt_logprobs)
                        for i, entry in enumerate(out.prompt_logprobs[1:])
                    ]
                first = False
                seq = out.outputs[0]
                if score_only:
                    chunk.finish_reason = "length"
                    yield chunk
                    return
                chunk.token_ids = list(seq.token_ids)
                chunk.logprobs = [_convert(e, t, spec.top_logprobs)
                                  for e, t in zip(seq.logprobs or [], seq.token_ids, strict=True)]
                chunk.text = seq.text
                if seq.finish_reason is not None:
                    chunk.finish_reason = "length" if seq.finish_reason == "length" else "stop"
                    chunk.stop_reason = seq.stop_reason if isinstance(seq.stop_reason, str) else None
                yield chunk
        except EngineDeadError:
            log.error("vLLM engine: the engine core has died; the server answers 503 from now on")
            raise EngineNotReady("the vLLM engine is down") from None
        except VLLMClientError as err:
            raise InvalidRequest(str(err), getattr(err, "parameter", None)) from None
        finally:
            self._in_flight[key] -= 1
