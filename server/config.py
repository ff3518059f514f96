"""The settings of the recallfix front, `recallfix serve` and `recallfix router`, each stated once.

Every field with a help text becomes a command-line option (`ab_split` -> `--ab-split`); `from_args`
reads it back. Options recallfix does not own go to vLLM's API server unchanged (see `vllm_args.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

API_KEY_ENV = "RECALLFIX_API_KEY"
UPSTREAM_API_KEY_ENV = "RECALLFIX_UPSTREAM_API_KEY"
PATCH_MODES = ("auto", "lora", "merged")


def default_cache_dir() -> Path:
    """Where exported adapters and merged checkpoints are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recallfix" / "serve"


def _opt(default: Any, help: str, **cli: Any) -> Any:  # noqa: A002 (argparse's name)
    """A config field: its default, its help text, and extra argparse settings (choices, metavar, type)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


@dataclass(frozen=True)
class FrontConfig:
    """The HTTP front both commands run: variants, A/B, admission, calibration metrics."""

    served_model_name: str | None = _opt(None, "NAME in the API; NAME:patched and NAME:ab follow "
                                                "(serve: default the model directory's name)", metavar="NAME")
    host: str = _opt("127.0.0.1", "address the front binds (127.0.0.1: this machine only)")
    port: int = _opt(8000, "port of the front")
    api_key: str | None = _opt(lambda: os.environ.get(API_KEY_ENV) or None,
                               f"require `Authorization: Bearer KEY` (default ${API_KEY_ENV}; unset: no key)",
                               metavar="KEY")
    ab_split: float = _opt(0.5, "share of NAME:ab requests served by the patched variant, sticky per `user`",
                           type=fraction)
    shadow_rate: float = _opt(0.0, "share of requests also scored by the other variant, for the calibration-"
                                   "shift metrics", type=fraction)
    max_concurrency: int = _opt(64, "requests in flight through the front before new ones get 429", metavar="N")
    metrics_logprobs: int = _opt(20, "top logprobs asked from the upstream for the confidence and entropy "
                                     "metrics when the client asks for none (0: never ask)", metavar="N")

    @property
    def name(self) -> str:
        assert self.served_model_name, "the CLI fills in the served name"
        return self.served_model_name

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if not 0 <= self.metrics_logprobs <= 20:
            raise ValueError(f"--metrics-logprobs must be within [0, 20], got {self.metrics_logprobs}")
        if self.served_model_name is not None and ":" in self.served_model_name:
            raise ValueError(f"--served-model-name {self.served_model_name!r}: ':' is reserved for the variant "
                             "suffixes")


@dataclass(frozen=True)
class ServeConfig:
    """`recallfix serve`: what runs behind the front (vLLM's own options are kept apart, as argv)."""

    patch: Path | None = _opt(None, "patch file (JSON) served as NAME:patched", type=Path, metavar="FILE")
    patch_mode: str = _opt("auto", "how the patched variant is served: lora (an adapter in the base server), "
                                   "merged (a merged checkpoint in a second server), auto (LoRA on GPU where the "
                                   "patch allows it, merged on CPU, where LoRA kernels are slow)",
                           choices=PATCH_MODES)
    cache_dir: Path = _opt(default_cache_dir, "where exported adapters and merged checkpoints are kept",
                           type=Path, metavar="DIR")
    upstream_start_timeout: float = _opt(1800.0, "seconds a vLLM server may take to start", metavar="S")
    drain_timeout: float = _opt(60.0, "seconds in-flight requests may take to finish at a swap or shutdown",
                                metavar="S")


@dataclass(frozen=True)
class RouterConfig:
    """`recallfix router`: the front over vLLM deployments that run elsewhere."""

    base_url: str = _opt("", "URL of the vLLM server (or Service) of the base model, e.g. http://vllm-base:8000",
                         metavar="URL")
    base_model: str | None = _opt(None, "the base model's name on that server (default: the first it lists)",
                                  metavar="NAME")
    patched_url: str | None = _opt(None, "URL of a second vLLM server that serves the patched (merged) model",
                                   metavar="URL")
    patched_model: str | None = _opt(None, "the patched model's name upstream: a LoRA module on --base-url, or "
                                           "the model of --patched-url (default: the first it lists)",
                                     metavar="NAME")
    upstream_api_key: str | None = _opt(lambda: os.environ.get(UPSTREAM_API_KEY_ENV) or None,
                                        f"API key of the upstream servers (default ${UPSTREAM_API_KEY_ENV})",
                                        metavar="KEY")
    probe_interval: float = _opt(2.0, "seconds between health probes of the upstreams", metavar="S")

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("--base-url is required")


Config = TypeVar("Config")


def _option_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    return hint


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type, *,
                defaults: bool = True) -> None:
    """One option per field of `config` with a help text. `defaults=False`: absent options stay absent
    (argparse.SUPPRESS), to read a second time over values parsed before."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:
            continue
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        extra.setdefault("type", _option_type(hints[f.name]))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "" if default is None or f.name.endswith("api_key") else f" (default: {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=f.metadata["help"] + shown,
                            default=default if defaults else argparse.SUPPRESS, **extra)


def from_args(config: type[Config], args: argparse.Namespace, **overrides: Any) -> Config:
    """The dataclass `config` from the options `add_options` added."""
    names = [f.name for f in dataclasses.fields(config) if "help" in f.metadata]  # type: ignore[arg-type]
    return config(**{**{name: getattr(args, name) for name in names}, **overrides})
