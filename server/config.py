"""The settings of the recallfix front, `recallfix serve` and `recallfix router`, each stated once.

Every field with a help text becomes a command-line option (`ab_split` -> `--ab-split`;
`recallfix.patches.options`). Options recallfix does not own go to vLLM's API server unchanged (see `vllm_args.py`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from recallfix.patches.options import option

API_KEY_ENV = "RECALLFIX_API_KEY"
UPSTREAM_API_KEY_ENV = "RECALLFIX_UPSTREAM_API_KEY"
PATCH_MODES = ("auto", "lora", "merged")


def default_cache_dir() -> Path:
    """Where exported adapters and merged checkpoints are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recallfix" / "serve"


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


@dataclass(frozen=True)
class FrontConfig:
    """The HTTP front both commands run: variants, A/B, admission, calibration metrics."""

    served_model_name: str | None = option(None, "NAME in the API; NAME:patched and NAME:ab follow "
                                                  "(serve: default the model directory's name)", metavar="NAME")
    host: str = option("127.0.0.1", "address the front binds (127.0.0.1: this machine only)")
    port: int = option(8000, "port of the front")
    api_key: str | None = option(help=f"require `Authorization: Bearer KEY` (default ${API_KEY_ENV}; unset: no key)",
                                 default_factory=lambda: os.environ.get(API_KEY_ENV) or None, hide_default=True,
                                 metavar="KEY")
    ab_split: float = option(0.5, "share of NAME:ab requests served by the patched variant, sticky per `user`",
                             type=fraction)
    shadow_rate: float = option(0.0, "share of requests also scored by the other variant, for the calibration-"
                                     "shift metrics", type=fraction)
    max_concurrency: int = option(64, "requests in flight through the front before new ones get 429", metavar="N")
    feedback_capacity: int = option(100_000, "recent answers kept for /v1/feedback to rate, oldest dropped first "
                                             "(about 0.6 KiB each)", metavar="N")
    max_body_bytes: int = option(32 * 2**20, "largest request body the front takes (413 over it)", metavar="N")
    max_prompts: int = option(256, "most prompts (times `n` choices) one completion request may ask for (400 over "
                                   "it): the work of one request stays bounded, as --max-concurrency bounds the "
                                   "requests", metavar="N")
    metrics_logprobs: int = option(20, "top logprobs asked from the upstream for the calibrated confidence and "
                                       "the confidence and entropy metrics when the client asks for fewer (the "
                                       "extra ones are taken out of the reply; 0: never ask)", metavar="N")
    calibration: Path | None = option(None, "calibration.json of `recallfix analyze`: every completion and chat "
                                            "reply carries the answering variant's calibrated confidence",
                                      type=Path, metavar="FILE")
    abstain_below: float | None = option(None, "with --calibration: answer --abstain-text where an answer's "
                                               "calibrated confidence is below this (a request's own "
                                               "recallfix.abstain_below overrides it; default off)",
                                         type=fraction, metavar="P")
    abstain_text: str = option("I don't know.", "what an abstaining reply says", metavar="TEXT")
    drain_timeout: float = option(60.0, "seconds in-flight requests may take to finish at shutdown (serve: and at a "
                                        "patch swap)", metavar="S")
    # Longer than the idle timeouts of the clients and load balancers before the front (httpx and the openai
    # client 5 s, AWS ALB 60 s), so that they, never the front, close an idle connection: when the server closes
    # it just as a client sends on it, that request gets no reply (httpx.ReadError; 1 in 3,400 calls of
    # bench/bench_load.py with uvicorn's default of 5 s).
    timeout_keep_alive: int = option(75, "seconds an idle client connection is kept open", metavar="S")

    @property
    def name(self) -> str:
        assert self.served_model_name, "the CLI fills in the served name"
        return self.served_model_name

    def __post_init__(self) -> None:
        if self.timeout_keep_alive < 1:
            raise ValueError(f"--timeout-keep-alive must be at least 1, got {self.timeout_keep_alive}")
        if self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if self.feedback_capacity < 1:
            raise ValueError(f"--feedback-capacity must be at least 1, got {self.feedback_capacity}")
        if self.max_body_bytes < 1 or self.max_prompts < 1:
            raise ValueError(f"--max-body-bytes and --max-prompts must be at least 1, got {self.max_body_bytes} and "
                             f"{self.max_prompts}")
        if not 0 <= self.metrics_logprobs <= 20:
            raise ValueError(f"--metrics-logprobs must be within [0, 20], got {self.metrics_logprobs}")
        if self.served_model_name is not None and ":" in self.served_model_name:
            raise ValueError(f"--served-model-name {self.served_model_name!r}: ':' is reserved for the variant "
                             "suffixes")


@dataclass(frozen=True)
class ServeConfig:
    """`recallfix serve`: what runs behind the front (vLLM's own options are kept apart, as argv)."""

    patch: Path | None = option(None, "patch file (JSON) served as NAME:patched", type=Path, metavar="FILE")
    patch_mode: str = option("auto", "how the patched variant is served: lora (an adapter in the base server), "
                                     "merged (a merged checkpoint in a second server), auto (LoRA on GPU where the "
                                     "patch allows it, merged on CPU, where LoRA kernels are slow)",
                             choices=PATCH_MODES)
    cache_dir: Path = option(help="where exported adapters and merged checkpoints are kept",
                             default_factory=default_cache_dir, type=Path, metavar="DIR")
    upstream_start_timeout: float = option(1800.0, "seconds a vLLM server may take to start", metavar="S")


@dataclass(frozen=True)
class RouterConfig:
    """`recallfix router`: the front over vLLM deployments that run elsewhere."""

    base_url: str = option("", "URL of the vLLM server (or Service) of the base model, e.g. http://vllm-base:8000",
                           metavar="URL")
    base_model: str | None = option(None, "the base model's name on that server (default: the first it lists)",
                                    metavar="NAME")
    patched_url: str | None = option(None, "URL of a second vLLM server that serves the patched (merged) model",
                                     metavar="URL")
    patched_model: str | None = option(None, "the patched model's name upstream: a LoRA module on --base-url, or "
                                             "the model of --patched-url (default: the first it lists)",
                                       metavar="NAME")
    upstream_api_key: str | None = option(
        help=f"API key of the upstream servers (default ${UPSTREAM_API_KEY_ENV})",
        default_factory=lambda: os.environ.get(UPSTREAM_API_KEY_ENV) or None, hide_default=True, metavar="KEY")
    probe_interval: float = option(2.0, "seconds between health probes of the upstreams", metavar="S")

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("--base-url is required")

