"""The front under load: bench/load_driver.py's clients against `recallfix serve --patch-mode merged` on SmolLM2-135M.

Many concurrent clients (more than the front's --max-concurrency, so that it refuses some with 429 and they try
again) send completions and chats, streamed and not, to NAME, NAME:patched and NAME:ab: a warm-up round, then
--rounds measured rounds of --requests calls. Every reply is checked as tests/test_load.py checks it. The report
(latency quantiles per model name and mode, throughput, 429s and 5xx per round, the front process's RSS after each
round) replaces the section between the markers in docs/benchmarks.md; any wrong reply is listed there and the
bench exits 1.

    python bench/bench_load.py [--model smollm2-135m] [--rounds 3] [--requests 96] [--clients 24]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from pathlib import Path

from bench_doc import commit, markers, write_section  # bench/ is on sys.path: these run as scripts
from bench_serve import CODE, NAME, VLLM_OPTIONS, Server, machine_info, make_patch_file
from load_driver import Load, drive, report_lines, sticky_violations, unjustified_refusals

BEGIN, END = markers("bench_load")


def vllm_options(args: argparse.Namespace) -> list[str]:
    return [*VLLM_OPTIONS, *(["--enforce-eager"] if args.enforce_eager else [])]


def report(load: Load, args: argparse.Namespace, info: str, loads: tuple[float, float], note: str) -> str:
    rss = [r.rss_bytes or 0 for r in load.rounds]
    outcomes = load.outcomes(warm_up=True)
    problems = [f"{o.call.model} {o.call.path} {o.call.mode}: {o.problem}" for o in outcomes if o.problem]
    unjustified = unjustified_refusals(outcomes, args.max_concurrency)
    argv = sys.argv[1:]
    if "--note" in argv:  # shown on the machine line
        del argv[argv.index("--note"):argv.index("--note") + 2]
    command = "python bench/bench_load.py " + shlex.join(argv)
    lines = [BEGIN, "## The front under load (bench/bench_load.py)", "",
             f"- machine: {info}; load average {loads[0]:.1f} before, {loads[1]:.1f} after{note}",
             f"- code: {commit(*CODE)}; model {args.model}; `recallfix serve --patch-mode merged --max-concurrency "
             f"{args.max_concurrency} --shadow-rate {args.shadow_rate}` with `{' '.join(vllm_options(args))}`, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
             f"- command: `{command.strip()}`",
             f"- a round: {args.requests} calls (NAME, NAME:patched, NAME:ab x completions, chats x streamed or not, "
             f"in turn), {args.clients} clients; a refused call is sent again after 0.5 s; one warm-up round, then "
             f"{args.rounds} measured", "", *report_lines(load, args.max_concurrency), "",
             f"- wrong replies (5xx, missing, malformed, a stream without [DONE]): {len(problems)}"
             + "".join(f"\n  - {p}" for p in problems[:10]),
             f"- 429s with fewer than {args.max_concurrency} admitted requests in flight: {len(unjustified)}",
             f"- NAME:ab users served by both variants: {len(sticky_violations(outcomes))}",
             f"- front RSS after the warm-up {rss[0] / 2**20:.1f} MiB; largest growth over the measured rounds "
             f"{(max(rss[1:]) - rss[0]) / 2**20:+.1f} MiB", END]
    return "\n".join(lines).replace("NAME", NAME) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="calls per round")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--max-concurrency", type=int, default=16, help="the front's")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--shadow-rate", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation: a faster start")
    parser.add_argument("--start-timeout", type=float, default=1800)
    parser.add_argument("--note", default="", help="added to the machine line (e.g. that the machine was shared)")
    args = parser.parse_args()
    from recallfix.patches.registry.models import resolve_model

    model_dir = resolve_model(args.model)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        patch = make_patch_file(model_dir, Path(tmp) / "patch.json")
        server = Server("merged", ["-m", "recallfix.server", "serve", str(model_dir), "--patch", str(patch),
                                   "--patch-mode", "merged", "--served-model-name", NAME, "--cache-dir",
                                   str(Path(tmp) / "cache"), "--max-concurrency", str(args.max_concurrency),
                                   "--shadow-rate", str(args.shadow_rate), *vllm_options(args)],
                        "/ready", Path(tmp) / "merged.log")
        try:
            server.start().wait(args.start_timeout)
            before = os.getloadavg()[0]
            assert server.proc is not None
            load = asyncio.run(drive(server.url, NAME, rounds=args.rounds, requests=args.requests,
                                     clients=args.clients, max_tokens=args.max_tokens, pid=server.proc.pid))
            after = os.getloadavg()[0]
        finally:
            server.stop()
    section = report(load, args, info, (before, after), args.note and f"; {args.note}")
    write_section("bench_load", section)
    print(section)
    outcomes = load.outcomes(warm_up=True)
    if any(o.problem for o in outcomes) or unjustified_refusals(outcomes, args.max_concurrency):
        sys.exit("wrong replies or unjustified 429s: see the report")


if __name__ == "__main__":
    main()
