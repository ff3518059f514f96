"""`recallfix serve` and `recallfix router`: the recallfix front before vLLM's own OpenAI servers.

    recallfix serve MODEL --patch FILE [recallfix options] [any option of vLLM's API server]
    recallfix router --served-model-name NAME --base-url URL [--patched-url URL | --patched-model NAME] ...
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from recallfix.patches.options import add_options, from_args

from .config import FrontConfig, RouterConfig, ServeConfig

if TYPE_CHECKING:
    from recallfix.patches import Patch

    from .confidence import Calibration
    from .serve import Plan

log = logging.getLogger(__name__)

SERVE_DESCRIPTION = """\
Serve MODEL (a directory of safetensors, or a name `recallfix model list` knows) and its patch behind
one OpenAI-compatible front: NAME (base), NAME:patched and NAME:ab (an A/B split, sticky per `user`),
with calibration metrics at /metrics. Behind it run vLLM's own OpenAI API servers, on loopback, with
every vLLM option given here passed to them unchanged (and checked by vLLM's parser before anything
starts).
"""
ROUTER_DESCRIPTION = """\
The recallfix front in front of vLLM servers that run elsewhere (a Service per variant, each with its
own tensor/pipeline parallelism and replicas): NAME, NAME:patched, NAME:ab, and the calibration metrics.
Stateless: every router replica gives the same A/B assignment.
"""
CPU_LORA_REASON = ("on CPU, where vLLM's LoRA kernels served the patched variant at 0.03x the base "
                   "throughput, and a merged second server at 0.98x")


class _ServeHelp(argparse.Action):
    """`--help`: recallfix's options, then vLLM's (read from the installed vLLM)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show this help (recallfix's and vLLM's options)")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print_serve_help(parser)
        parser.exit()


def print_serve_help(parser: argparse.ArgumentParser) -> None:
    from .vllm_args import vllm_help

    print(parser.format_help())
    print("vLLM's API server options (passed to every vLLM server unchanged):\n")
    print(vllm_help())


def _own_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: bool) -> None:
    add_options(parser, FrontConfig, defaults=defaults)
    add_options(parser, ServeConfig, defaults=defaults)
    parser.add_argument("--patch-dir", type=Path, metavar="DIR", default=None if defaults else argparse.SUPPRESS,
                        help="where /v1/load_patch may read patch files (default: the --patch file's directory)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action=_ServeHelp)
    p.add_argument("model", metavar="MODEL", help="model directory (safetensors), .gguf file, or registry name")
    _own_options(p.add_argument_group("recallfix"), defaults=True)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def split_serve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """recallfix's options given after MODEL read over `args`; the rest are vLLM's, in their order."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _own_options(own, defaults=False)
    return own.parse_known_args(args.vllm_args, namespace=args)


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p.add_argument_group("recallfix front"), FrontConfig)
    add_options(p.add_argument_group("upstreams"), RouterConfig)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _warn_open(front: FrontConfig) -> None:
    if not front.api_key and not _is_loopback(front.host):
        log.warning("listening on %s without an API key: anyone who can reach it can use it and load patches",
                    front.host)


def cmd_serve(args: argparse.Namespace) -> int:
    from recallfix.patches.registry.models import resolve_model

    from . import vllm_args
    from .patching import PatchRefused, check_against_checkpoint, read_patch

    args, vllm_argv = split_serve_args(args)
    if "-h" in vllm_argv or "--help" in vllm_argv:
        print_serve_help(args.parser)
        return 0
    model_dir = resolve_model(args.model)
    front = from_args(FrontConfig, args, served_model_name=args.served_model_name or model_dir.name)
    serve = from_args(ServeConfig, args)
    patch = None
    if serve.patch is not None:
        try:  # a patch that cannot be served fails now, before vLLM is even imported
            patch = read_patch(serve.patch)
            trust = any(a.split("=", 1)[0] in ("--trust-remote-code", "--trust_remote_code") for a in vllm_argv)
            check_against_checkpoint(model_dir, patch, trust_remote_code=trust)
        except PatchRefused as err:  # one line; Patch.load's reasons already start with the file
            said = str(err) if str(err).startswith(str(serve.patch)) else f"{serve.patch}: {err}"
            raise ValueError(f"--patch {said}") from None
    parsed = vllm_args.parse(model_dir, vllm_argv)  # vLLM's own message and exit status 2 on a bad option
    plan = make_plan(model_dir, front.name, vllm_argv, parsed, serve, patch)
    _warn_open(front)
    log.info("recallfix serve: %s as %r; patch %s served %s (%s)", model_dir, front.name,
             patch.id if patch else "none", plan.mode, plan.reason)
    from .serve import ServeBackend

    patch_dir = args.patch_dir or (serve.patch.parent if serve.patch else None)
    calibration = load_calibration(front, model_dir, patch)
    return run(front, lambda metrics: ServeBackend(plan, serve, metrics, front.drain_timeout), serve_mode=True,
               patch_dir=patch_dir, calibration=calibration)


def load_calibration(front: FrontConfig, model_dir: Path | None, patch: Patch | None) -> Calibration | None:
    """--calibration, checked before anything starts: against the model (serve; the router cannot see it) and,
    for the served patch, that the file has its calibrator. ValueError naming the file on a refusal."""
    if front.calibration is None:
        if front.abstain_below is not None:
            raise ValueError("--abstain-below needs --calibration: it abstains on the calibrated confidence")
        return None
    from recallfix.patches.calibrator import CalibrationError, CalibrationFile, check_calibration_against

    from .confidence import Calibration

    try:
        file = CalibrationFile.load(front.calibration)
        if model_dir is None:  # the router: the patched variant's calibrator is the one analyze recommended
            return Calibration(file, patched_variant=file.recommended or "")
        check_calibration_against(model_dir, file, None)
        if patch is not None:
            check_calibration_against(model_dir, file, patch)
    except CalibrationError as err:
        said = str(err) if str(err).startswith(str(front.calibration)) else f"{front.calibration}: {err}"
        raise ValueError(f"--calibration {said}") from None
    return Calibration(file)


def make_plan(model_dir: Path, name: str, vllm_argv: list[str], parsed: argparse.Namespace, serve: ServeConfig,
              patch: Patch | None) -> Plan:
    """Which mode serves the patch, and the upstreams' options and environment. ValueError (nothing started)
    where the patch cannot be served in the mode asked for."""
    from recallfix.patches.export import export_refusals

    from . import vllm_args
    from .patching import adapter_rank, export_cached, lora_modules, vllm_lora_rank
    from .serve import LORA_TARGETS_WITHOUT_PATCH, Plan, env_for

    on_cpu = vllm_args.on_cpu()
    mode, reason = serve.patch_mode, f"--patch-mode {serve.patch_mode}"
    refused = export_refusals(model_dir, patch) if patch is not None else {"lora": None, "merged": None}
    if mode == "auto":
        if refused["lora"]:
            mode, reason = "merged", f"LoRA cannot serve this patch: {refused['lora']}"
        elif on_cpu:
            mode, reason = "merged", CPU_LORA_REASON
        else:
            mode, reason = "lora", "on GPU, the patch served as an adapter in the base server"
    if refused[mode]:
        raise ValueError(f"--patch {serve.patch}: --patch-mode {mode} cannot serve it: {refused[mode]}"
                         + ("; use --patch-mode merged" if mode == "lora" and not refused["merged"] else ""))
    if mode == "lora" and on_cpu:
        log.warning("--patch-mode lora on CPU: vLLM 0.32's CPU LoRA path applies the adapter to base requests that it "
                    "batches with adapter ones (measured with recallfix compare on SmolLM2-135M), so under mixed "
                    "traffic base replies can carry the patch; --patch-mode merged serves the variants apart")
    adapter = export_cached("lora", model_dir, patch, serve.cache_dir) if mode == "lora" and patch else None
    rank, targets = None, ()
    if mode == "lora":
        user_rank = parsed.max_lora_rank if any(a.split("=")[0] == "--max-lora-rank" for a in vllm_argv) else 0
        if adapter is not None:
            rank, targets = max(vllm_lora_rank(adapter_rank(adapter)), user_rank), tuple(lora_modules(adapter))
        else:
            rank, targets = max(user_rank, 64), LORA_TARGETS_WITHOUT_PATCH
    kv = None
    if on_cpu and parsed.kv_cache_memory_bytes is None:
        import psutil

        engines = 1 if mode == "lora" else (3 if patch is not None else 2)  # merged: room for a swap's next
        try:
            kv = vllm_args.cpu_kv_cache_gib(psutil.virtual_memory().available, vllm_args.weights_bytes(model_dir),
                                            engines)
        except vllm_args.DoesNotFit as err:
            import os

            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                raise ValueError(str(err)) from None
    return Plan(model_dir=model_dir, name=name, vllm_argv=tuple(vllm_argv), env=tuple(env_for(on_cpu, kv).items()),
                mode=mode, reason=reason, patch=patch, max_lora_rank=rank, lora_targets=targets)


def cmd_router(args: argparse.Namespace) -> int:
    front = from_args(FrontConfig, args)
    if not front.served_model_name:
        raise ValueError("--served-model-name NAME is required: the name clients use")
    router = from_args(RouterConfig, args)
    if router.patched_url and router.patched_model is None:
        log.info("the patched model's name is read from %s/v1/models", router.patched_url)
    _warn_open(front)
    from .router import RouterBackend

    return run(front, lambda metrics: RouterBackend(router, metrics), serve_mode=False, patch_dir=None,
               probe_interval=router.probe_interval, calibration=load_calibration(front, None, None))


def run(front_config: FrontConfig, make_backend, *, serve_mode: bool, patch_dir: Path | None,  # noqa: ANN001
        probe_interval: float = 2.0, calibration: Calibration | None = None) -> int:
    """Serve until SIGTERM/SIGINT (in-flight requests drain first). 1 if the vLLM servers did not start."""
    import uvicorn

    from .app import create_app
    from .front import Front

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per proxied request otherwise
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_start_failure(err: BaseException) -> None:
        failures.append(err)
        if server is not None:
            server.should_exit = True

    from .metrics import Metrics

    metrics = Metrics(front_config.name)
    backend = make_backend(metrics)
    front = Front(front_config, backend, metrics=metrics, calibration=calibration)
    app = create_app(front, load_patch=getattr(backend, "load_patch", None) if serve_mode else None,
                     patch_dir=patch_dir, relay_metrics=serve_mode, probe_interval=probe_interval,
                     on_start_failure=on_start_failure)
    server = uvicorn.Server(uvicorn.Config(app, host=front_config.host, port=front_config.port, log_config=None,
                                           access_log=False, timeout_keep_alive=front_config.timeout_keep_alive,
                                           timeout_graceful_shutdown=int(front_config.drain_timeout)))
    log.info("the recallfix front listens on http://%s:%d (API key %s)", front_config.host, front_config.port,
             "required" if front_config.api_key else "off")
    # uvicorn raises the signal that stopped it again once it has drained, to end the process by it: after a
    # drain, a SIGTERM (the way Kubernetes and the recallfix front stop a server) is a clean exit, status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if failures:
        print(f"recallfix: error: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `recallfix` parser."""
    serve = subcommands.add_parser("serve", help="serve a model and its patch: vLLM's OpenAI server, with variants "
                                                 "and calibration metrics", description=SERVE_DESCRIPTION,
                                   add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve, parser=serve)
    router = subcommands.add_parser("router", help="the recallfix front before vLLM servers that run elsewhere",
                                    description=ROUTER_DESCRIPTION)
    add_router_arguments(router)
    router.set_defaults(func=cmd_router)


def main(argv: list[str] | None = None) -> int:
    """`python -m recallfix.server serve|router ...`: the same as `recallfix serve|router ...`."""
    from recallfix.patches.cli import main as recallfix_main

    return recallfix_main(argv)
