"""The engine interface: what the HTTP layer may ask of a model runtime, and nothing more.

An engine serves up to two *variants* of one model: `base` (the checkpoint as is) and `patched` (the
checkpoint with the current patch). It speaks token ids only; the HTTP layer owns the tokenizer's use
(prompts, chat templates, logprob strings), so both engines tokenize identically by construction.
Implementations live in `recallfix.server.engines` and are chosen by `create_engine`.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from recallfix.patches import Patch

    from .config import ServerConfig

log = logging.getLogger(__name__)

Variant = Literal["base", "patched"]

# The most log-probabilities an engine returns per position (vLLM's default `max_logprobs`, and
# OpenAI's cap on `logprobs`). The server always asks for this many: the entropy metric needs them.
MAX_TOP_LOGPROBS = 20


class EngineError(RuntimeError):
    """Base class of the errors an engine reports to the HTTP layer."""


class EngineNotReady(EngineError):
    """The engine is starting, stopping, or has died: the request may succeed later (HTTP 503)."""


class InvalidRequest(EngineError):
    """The engine refused the request itself as invalid (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PatchRefused(EngineError):
    """A patch the engine will not serve; the variants that were serving keep serving (HTTP 400)."""


@dataclass(frozen=True)
class SamplingSpec:
    """How to continue one prompt (one sequence; the HTTP layer fans out `n` and prompt lists)."""

    max_tokens: int  # 0: score the prompt only (needs prompt_logprobs)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the text returned ends before the first one
    top_logprobs: int = MAX_TOP_LOGPROBS  # how many of the most likely tokens to report per position
    prompt_logprobs: int | None = None  # None: do not score the prompt


@dataclass(frozen=True)
class TokenLogprobs:
    """The log-probability of one token and the most likely alternatives at its position.

    Raw log-probabilities of the model (before temperature and top-p), as vLLM reports by default.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass
class Chunk:
    """What an engine adds to a sequence since its previous chunk."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token in token_ids
    text: str = ""  # newly completed text (may lag token_ids while a character or stop string is pending)
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | None = None  # the stop string that ended the sequence, if one did
    # Only on the first chunk, when asked: one entry per prompt token, the first None (nothing predicts it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True)
class PatchState:
    """The patch behind the `patched` variant, and how the engine serves it."""

    patch_id: str
    edits: tuple[tuple[str, float], ...]  # (component, gain)
    applied: str  # "lora", "merged" or "in-memory"
    detail: str = ""  # one human line for logs and /v1/load_patch replies
    biases: tuple[str, ...] = ()  # components whose MLP output gets an added bias

    @classmethod
    def of(cls, patch: Patch, applied: str, detail: str = "") -> PatchState:
        return cls(patch.id, tuple((str(c), g) for c, g in patch.gains.items()), applied, detail,
                   tuple(str(c) for c in patch.biases))


class Engine(abc.ABC):
    """A model runtime serving the base model and, when a patch is loaded, the patched one."""

    name: str  # "vllm" or "transformers", for logs and /metrics

    @property
    @abc.abstractmethod
    def tokenizer(self):  # noqa: ANN201 (a Hugging Face tokenizer; typed loosely to keep imports light)
        """The checkpoint's Hugging Face tokenizer (available once `start` has returned)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus generated tokens may not exceed this."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether requests can be served now."""

    @property
    @abc.abstractmethod
    def dead(self) -> bool:
        """Whether the engine failed after starting and cannot recover (the process should be replaced)."""

    @property
    @abc.abstractmethod
    def patch_state(self) -> PatchState | None:
        """The patch behind `patched`, or None when only `base` is served."""

    @abc.abstractmethod
    async def start(self, patch: Patch | None) -> None:
        """Load the model (and the patch). Raises on failure; the caller decides whether to exit."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the model and any worker processes. Safe to call more than once."""

    @abc.abstractmethod
    def generate(self, variant: Variant, prompt_ids: list[int], spec: SamplingSpec,
                 request_id: str) -> AsyncIterator[Chunk]:
        """Continue one prompt. Raises EngineNotReady when the engine cannot serve; stops the work
        when the caller stops iterating (client gone)."""

    @abc.abstractmethod
    async def load_patch(self, patch: Patch) -> PatchState:
        """Serve `patch` as the `patched` variant from now on. Raises PatchRefused, with the reason,
        and keeps the current variants, when the patch does not fit this model or is not finite."""


def resolve_engine_name(requested: str) -> str:
    """`auto` means vLLM when it can be imported, else transformers."""
    if requested != "auto":
        return requested
    if importlib.util.find_spec("vllm") is None:
        log.info("engine auto: vLLM is not installed; using transformers")
        return "transformers"
    try:
        import vllm  # noqa: F401 (an installed but broken vLLM, e.g. a mismatched torch, fails here)
    except Exception as err:  # any import failure means "not importable"; say why and fall back
        log.warning("engine auto: vLLM is installed but cannot be imported (%s: %s); using transformers",
                    type(err).__name__, err)
        return "transformers"
    return "vllm"


def create_engine(config: ServerConfig) -> Engine:
    """The engine `config.engine` names, not yet started."""
    name = resolve_engine_name(config.engine)
    if name == "vllm":
        from .engines.vllm import VllmEngine

        return VllmEngine(config)
    if name == "transformers":
        from .engines.transformers import TransformersEngine

        return TransformersEngine(config)
    raise ValueError(f"unknown engine {name!r}; choose auto, vllm or transformers")
