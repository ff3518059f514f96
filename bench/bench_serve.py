"""`recallfix serve` against vLLM's own OpenAI server, side by side, on the same model and vLLM flags.

Three servers run at once, each started once:

    vllm     vLLM's own API server on the base checkpoint (`python -m vllm.entrypoints.openai.api_server`)
    merged   `recallfix serve --patch-mode merged` (a base vLLM server and a merged-checkpoint one behind the front)
    lora     `recallfix serve --patch-mode lora` (one vLLM server, the patch as a LoRA adapter)

Each target (vllm; merged: NAME and NAME:patched; lora: NAME and NAME:patched) gets one warm-up run, then
--rounds rounds in which the targets take turns, so that a change of load on a shared machine falls on all of
them alike. A run is --requests completions (--concurrency at a time, --max-tokens each with ignore_eos, greedy,
the official `openai` client) and gives generated tokens/s (completion tokens over the run's wall time) and each
request's latency. LoRA on CPU serves about 30x slower (docs/benchmarks.md), so the lora targets run
--lora-requests per run: their patched/base ratio compares like with like.

The report (front/vLLM throughput and p50 latency; patched/base throughput per mode) replaces the section between
the markers in docs/benchmarks.md.

    python bench/bench_serve.py [--model smollm2-135m] [--rounds 3] [--requests 64] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench_doc import commit, machine, markers, write_section  # bench/ is on sys.path: these run as scripts

ROOT = Path(__file__).resolve().parents[1]
CODE = ("server", "patches", "bench")  # what the serving numbers depend on (the commit is marked when they change)
BEGIN, END = markers("bench_serve")
NAME = "smol"
# The patch `recallfix analyze` learned on SmolLM2-135M (shared/notes/real-models.md): four heads of the last layer.
GAINS = {"L29H0": 0.40, "L29H4": 1.28, "L29H5": 1.07, "L29H7": 1.31}
# The same vLLM options for every server: a short context, and a fixed KV cache so that no server's size
# depends on when it started (recallfix sizes it from the free memory otherwise).
VLLM_OPTIONS = ["--max-model-len", "512", "--seed", "0", "--kv-cache-memory-bytes", str(512 * 2**20)]
PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The currency of Japan is the",
           "Tokyo is the capital of", "The largest planet of the solar system is", "Water boils at a temperature of"]
GOALS = {"front/vllm throughput": (0.95, ">="), "front/vllm p50 latency": (1.05, "<="),
         "merged patched/base throughput": (0.95, ">=")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    args: list[str]
    ready: str  # the path that answers 200 once it serves
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false",
               # vLLM's CPU default pins every engine to the same cores; recallfix serve unpins its own
               "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               # four engines share the machine: one OpenMP thread each (the front passes it on to its servers),
               # or a thread waits at each barrier for a peer that another engine keeps off the cores
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("RECALLFIX_API_KEY", None)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, *self.args, "--port", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(2)
        sys.exit(f"{self.name} not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the front drains, then stops its vLLM servers
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class Run:
    tokens: int
    wall_s: float
    latencies_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


async def one_run(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> Run:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=1800)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def request(i: int) -> int:
        async with gate:
            start = time.perf_counter()
            reply = await client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)],
                                                    max_tokens=max_tokens, temperature=0.0,
                                                    extra_body={"ignore_eos": True})
            latencies.append(time.perf_counter() - start)
            return reply.usage.completion_tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(request(i) for i in range(requests)))
    wall = time.perf_counter() - start
    await client.close()
    return Run(sum(tokens), wall, latencies)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1), linear between the closest ranks."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def make_patch_file(model_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from recallfix.patches import make_patch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    make_patch(model, GAINS, command="bench/bench_serve.py").save(out)
    return out


def machine_info() -> str:
    import vllm

    return machine(f"vllm {vllm.__version__}")


def summarize(runs: list[Run]) -> dict[str, float]:
    latencies = [x for run in runs for x in run.latencies_s]
    return {"tokens_per_s": statistics.median(run.tokens_per_s for run in runs),
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99)}


def report(results: dict[str, dict[str, float]], args: argparse.Namespace, info: str, loads: list[float],
           note: str) -> str:
    ratios = {
        "front/vllm throughput": results["merged NAME"]["tokens_per_s"] / results["vllm NAME"]["tokens_per_s"],
        "front/vllm p50 latency": results["merged NAME"]["p50_s"] / results["vllm NAME"]["p50_s"],
        "front/vllm p99 latency": results["merged NAME"]["p99_s"] / results["vllm NAME"]["p99_s"],
        "merged patched/base throughput": (results["merged NAME:patched"]["tokens_per_s"]
                                           / results["merged NAME"]["tokens_per_s"]),
        "lora patched/base throughput": (results["lora NAME:patched"]["tokens_per_s"]
                                         / results["lora NAME"]["tokens_per_s"]),
    }
    lines = [BEGIN, "## `recallfix serve` against vLLM's own server (bench/bench_serve.py)", "",
             f"- machine: {info}; load average {min(loads):.1f}-{max(loads):.1f} during the rounds{note}",
             f"- code: {commit(*CODE)}; model {args.model}; vLLM options of every server: `{' '.join(VLLM_OPTIONS)}`, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
             f"- a run: {args.requests} completions ({args.lora_requests} for the lora targets), {args.concurrency} at "
             f"a time, {args.max_tokens} tokens each (ignore_eos, greedy); one warm-up run per target, then "
             f"{args.rounds} rounds, the targets in turn; tokens/s is the median over the rounds, latencies are "
             "pooled", "",
             "| target | generated tokens/s | p50 latency (s) | p99 latency (s) |", "|---|---:|---:|---:|"]
    for target, r in results.items():
        lines.append(f"| {target} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} |")
    lines += ["", "| ratio | measured | goal | reached |", "|---|---:|---:|---|"]
    for what, value in ratios.items():
        goal = GOALS.get(what)
        if goal is None:
            lines.append(f"| {what} | {value:.2f} | - | - |")
            continue
        reached = value >= goal[0] if goal[1] == ">=" else value <= goal[0]
        lines.append(f"| {what} | {value:.2f} | {goal[1]} {goal[0]} | {'yes' if reached else 'no'} |")
    lines += ["", "vllm: vLLM's own API server; merged/lora: `recallfix serve --patch-mode merged|lora`. The front "
              "asks its upstream for the top-20 logprobs of each generated token (for the calibration metrics, "
              "stripped from the reply), which vLLM served directly does not compute.", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--lora-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--start-timeout", type=float, default=1800)
    parser.add_argument("--note", default="", help="added to the machine line (e.g. that the machine was shared)")
    args = parser.parse_args()
    from recallfix.patches.registry.models import resolve_model

    model_dir = resolve_model(args.model)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        patch = make_patch_file(model_dir, Path(tmp) / "patch.json")
        serve = ["-m", "recallfix.server", "serve", str(model_dir), "--patch", str(patch), "--served-model-name", NAME,
                 "--cache-dir", str(Path(tmp) / "cache")]
        servers = {
            "vllm": Server("vllm", ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                    "--served-model-name", NAME, "--host", "127.0.0.1", *VLLM_OPTIONS],
                           "/health", Path(tmp) / "vllm.log"),
            "merged": Server("merged", [*serve, "--patch-mode", "merged", *VLLM_OPTIONS], "/ready",
                             Path(tmp) / "merged.log"),
            "lora": Server("lora", [*serve, "--patch-mode", "lora", *VLLM_OPTIONS], "/ready", Path(tmp) / "lora.log"),
        }
        targets = {"vllm NAME": ("vllm", NAME), "merged NAME": ("merged", NAME),
                   "merged NAME:patched": ("merged", f"{NAME}:patched"), "lora NAME": ("lora", NAME),
                   "lora NAME:patched": ("lora", f"{NAME}:patched")}
        runs: dict[str, list[Run]] = {target: [] for target in targets}
        loads: list[float] = []
        try:
            for server in servers.values():
                server.start()
            for server in servers.values():
                server.wait(args.start_timeout)
                print(f"{server.name} ready", flush=True)
            for rnd in range(args.rounds + 1):  # round 0 warms up
                for target, (server, model) in targets.items():
                    requests = args.lora_requests if server == "lora" else args.requests
                    run = asyncio.run(one_run(servers[server].url, model, requests, args.concurrency,
                                              args.max_tokens))
                    loads.append(os.getloadavg()[0])
                    print(f"round {rnd} {target}: {run.tokens_per_s:.1f} tok/s", flush=True)
                    if rnd:
                        runs[target].append(run)
        finally:
            for server in servers.values():
                server.stop()
    results = {target: summarize(r) for target, r in runs.items()}
    # the table names the models as clients do
    section = report(results, args, info, loads, args.note).replace("NAME", NAME)
    write_section("bench_serve", section)
    print(section)


if __name__ == "__main__":
    main()
