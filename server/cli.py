"""Subcommands this package adds to the `recallfix` console script: `recallfix serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import API_KEY_ENV, ServerConfig, default_cache_dir

DESCRIPTION = """\
Serve a model and its patch behind an OpenAI-compatible HTTP API: NAME (base), NAME:patched and
NAME:ab (an A/B split), with Prometheus metrics of confidence and calibration at /metrics.
"""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (safetensors) or Hugging Face hub name")
    p.add_argument("--patch", type=Path, help="patch file (JSON) to serve as NAME:patched")
    p.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM when it can be imported, else transformers (default: auto)")
    p.add_argument("--served-model-name", help="NAME in the API (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; unset: no key)")
    p.add_argument("--ab-split", type=_fraction, default=0.5,
                   help="share of NAME:ab requests served by the patched variant, sticky per `user` (default 0.5)")
    p.add_argument("--shadow-rate", type=_fraction, default=0.0,
                   help="share of requests also scored by the other variant, for the calibration-shift "
                        "metrics (default 0)")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="generation requests in flight before new ones get 429 (default 64)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (default auto: the checkpoint's; float32 on CPU for transformers)")
    p.add_argument("--chat-template", help="Jinja chat template (a file, or the template itself) for a "
                                           "tokenizer without one")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where exported LoRA adapters and merged checkpoints are kept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling (default 0)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    vllm = p.add_argument_group("vLLM engine")
    vllm.add_argument("--max-lora-rank", type=int,
                      help="the engine's LoRA rank capacity (default: the smallest that fits the patch; 64 "
                           "without one). A later patch of higher rank runs merged in a second engine")
    vllm.add_argument("--no-lora", action="store_true",
                      help="serve the patched variant from a merged checkpoint in a second engine")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                      help="GPU memory share of the whole server; split three ways when a merged engine "
                           "runs (default 0.9)")
    vllm.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start, slower run)")


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"--chat-template {value}: no such file (and not a Jinja template)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=args.model, patch=args.patch, engine=args.engine, served_model_name=args.served_model_name,
        host=args.host, port=args.port, api_key=args.api_key or None, ab_split=args.ab_split,
        shadow_rate=args.shadow_rate, max_concurrency=args.max_concurrency, max_model_len=args.max_model_len,
        dtype=args.dtype, trust_remote_code=args.trust_remote_code, chat_template=_chat_template(args.chat_template),
        cache_dir=args.cache_dir, seed=args.seed, max_lora_rank=args.max_lora_rank, no_lora=args.no_lora,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        access_log=args.access_log,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .engine import PatchRefused
    from .patching import read_patch

    config = config_from_args(args)  # ValueError for inconsistent options: the hub prints it
    # vLLM reports usage statistics to its authors unless told not to; a server should not phone home
    # unasked (set VLLM_NO_USAGE_STATS=0 to allow it).
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if config.patch is not None:
        try:  # a patch file that cannot be read fails now, not after the engine has started
            read_patch(config.patch)
        except PatchRefused as err:
            raise ValueError(str(err)) from None
    from .runner import serve

    return serve(config)


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `recallfix` parser."""
    p = subcommands.add_parser("serve", help="serve a model and its patch over an OpenAI-compatible API",
                               description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    """`python -m recallfix.server`: the same as `recallfix serve`."""
    parser = argparse.ArgumentParser(prog="python -m recallfix.server", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cmd_serve(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as err:
        if args.verbose:
            raise
        print(f"recallfix serve: error: {err}", file=sys.stderr)
        return 2
