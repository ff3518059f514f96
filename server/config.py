"""Everything `recallfix serve` is told, in one frozen object (the CLI builds it; nothing else parses argv)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

API_KEY_ENV = "RECALLFIX_API_KEY"


def default_cache_dir() -> Path:
    """Where exported adapters and merged checkpoints are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recallfix" / "serve"


@dataclass(frozen=True)
class ServerConfig:
    model: str  # a local checkpoint directory or a Hugging Face hub name
    patch: Path | None = None
    engine: str = "auto"  # auto | vllm | transformers
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    ab_split: float = 0.5  # share of NAME:ab traffic routed to the patched variant
    shadow_rate: float = 0.0  # share of requests also scored by the other variant
    max_concurrency: int = 64  # generation requests in flight before 429
    max_model_len: int | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    chat_template: str | None = None  # a Jinja template (text) used when the tokenizer has none
    cache_dir: Path = field(default_factory=default_cache_dir)
    seed: int = 0
    # vLLM only
    max_lora_rank: int | None = None  # None: the smallest rank vLLM accepts that fits the patch
    no_lora: bool = False  # serve the patched variant from a merged checkpoint even where LoRA would do
    gpu_memory_utilization: float = 0.9  # shared by all engines this server runs
    enforce_eager: bool = False
    # logging
    access_log: bool = False

    @property
    def name(self) -> str:
        """The base variant's model name in the API (`NAME`; `NAME:patched`, `NAME:ab` follow)."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model)
        return path.name if path.exists() else self.model

    def __post_init__(self) -> None:
        if not 0.0 <= self.ab_split <= 1.0:
            raise ValueError(f"--ab-split must be within [0, 1], got {self.ab_split}")
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise ValueError(f"--shadow-rate must be within [0, 1], got {self.shadow_rate}")
        if self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if ":" in self.name:
            raise ValueError(f"--served-model-name {self.name!r}: ':' is reserved for the variant suffixes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be within (0, 1], got {self.gpu_memory_utilization}")
        if self.engine not in ("auto", "vllm", "transformers"):
            raise ValueError(f"--engine must be auto, vllm or transformers, got {self.engine!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
