"""`make demo`: the whole story on a real model, told by recallfix's own commands.

    python demo/demo.py [--model smollm2-135m] [--run runs/demo] [--name demo]

1. `recallfix demo --out RUN`: the analysis (mechanism, patch, report); a run whose inputs are unchanged is reused.
2. `recallfix serve MODEL --patch RUN/patch.json --calibration RUN/calibration.json`: base and patched behind one
   front, each reply carrying the calibrated probability that its answer is right; waits for /ready.
3. `recallfix compare` of NAME and NAME:patched on a seeded sample of the analysis' held-out test split (whole
   subjects, `--compare-facts`; 0 asks all of it) (RUN/compare/).
4. A/B traffic: completions for NAME:ab from several `user`s (sticky per user), each answer rated through
   POST /v1/feedback (right when it starts with the fact's answer, as compare's exact match reads it).
5. One answer with its calibrated confidence (the most confident of the A/B answers), and one abstention: the
   least confident fact asked again with `"recallfix": {"abstain_below": 0.5}`, answered with the abstention text.
6. Prints the compare table (compare prints it) and an excerpt of /metrics: confidence per variant, the shadow
   shift, feedback reliability, the calibrated confidence and abstentions.
7. Stops the server: SIGTERM (the front drains, then stops its vLLM servers), waited for; whatever of its process
   tree is still there after that is killed. Ctrl-C (SIGINT) or SIGTERM at any point does the same, and the
   script exits 130.

It drives the commands as subprocesses and talks HTTP, like any user: it imports neither the analysis nor the
server (only compare's exact-match rule, so "right" means one thing). The server's log is RUN/serve.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from recallfix.analysis.compare.client import exact_match

RECALLFIX = [sys.executable, "-m", "recallfix.patches.cli"]  # the `recallfix` console script, this interpreter's
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
# vLLM options of the demo's servers, for a fast start on a small CPU machine (shared/notes/vllm-facts.md):
# float32, the checkpoint's own dtype, so compare's numbers are the analysis' numbers; eager mode (no graph
# compilation at start); a short context (facts are a few tokens) and a 256 MiB KV cache (plenty for it:
# about 5,800 tokens of this model), which start faster and leave memory to the second engine. The patch is
# merged into a second engine (what auto picks on CPU, where vLLM's LoRA kernels run the patched variant at a
# thirtieth of the base's speed), so compare can ask both variants at once (--together): each engine works
# on its own core.
VLLM_OPTIONS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                "--kv-cache-memory-bytes", str(256 * 2**20)]
# The environment of the vLLM servers (the front passes its own on):
# - one OpenMP thread per engine: the two engines work at once (compare --together, a request and its shadow
#   scoring), and an engine whose threads outnumber the free cores waits at every barrier for a thread that is
#   not running (server_fixtures.py measured 0.1 against 7 tokens/s on a busy 2-core machine);
# - the model runs in the engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM's "uni" executor) instead
#   of a worker process of its own, whose engine core waits for it spinning on sched_yield: that spin held a
#   core of the two, and the worker's start re-imported vLLM. Measured on SmolLM2-135M, 2 cores: one vLLM
#   server ready in 49 s instead of 67 s; compare of the 491 test facts 198 s instead of 312 s (the same numbers).
SERVER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# Requests in flight per model in compare: the engines batch them (on 2 cores, 32 took compare from 198 s to
# 142 s against 8, its default, with the same per-fact numbers).
COMPARE_CONCURRENCY = "32"
# compare's sample of the held-out split (whole subjects, seeded; `--compare-facts 0` asks all 491): about 0.3 s a
# fact for both models on 2 cores, so the whole demo fits 4 min on a second run. The analysis' own evaluation in
# RUN/report.md covers the whole split.
COMPARE_FACTS = 256
SHADOW_RATE = "1.0"  # every request also scored by the other variant: the shadow shift from all the demo's traffic
STOP_TIMEOUT_S = 90  # the front drains, then stops its vLLM servers
# The calibration series the excerpt shows (their _count and _sum lines; the buckets are left to Prometheus).
EXCERPT = ("recallfix_first_token_confidence", "recallfix_shadow_top1_confidence", "recallfix_shadow_agreement",
           "recallfix_feedback_confidence", "recallfix_calibrated_confidence", "recallfix_abstentions")
ABSTAIN_BELOW = 0.5  # the threshold of the demo's abstaining request: "say it only if it is more likely right than not"


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop everything, exit 130."""


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


# -- child processes ----------------------------------------------------------------------------------------


class Children:
    """Every process the demo started: each is ended (and waited for) on the way out, whatever happens."""

    def __init__(self) -> None:
        self.server: subprocess.Popen[bytes] | None = None
        self.current: subprocess.Popen[bytes] | None = None  # the command running in the foreground

    def run(self, args: Sequence[str]) -> int:
        """A recallfix command in the foreground, its output to ours; its exit status."""
        self.current = subprocess.Popen([*RECALLFIX, *args])
        try:
            return self.current.wait()
        finally:
            self._end(self.current)
            self.current = None

    def start_server(self, args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """`recallfix serve ...` in a session of its own (a Ctrl-C in the terminal reaches the demo, which stops
        it in order), its output to `log`."""
        with log.open("wb") as out:
            self.server = subprocess.Popen([*RECALLFIX, "serve", *args], stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, env={**os.environ, **SERVER_ENV})
        return self.server

    def stop_server(self) -> int | None:
        """SIGTERM to the front, which drains and stops its vLLM servers; then whatever of its process tree (vLLM
        servers run in sessions of their own) is left gets SIGKILL. Its exit status."""
        server, self.server = self.server, None
        if server is None:
            return None
        try:
            tree = psutil.Process(server.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=10)
        return server.returncode

    def close(self) -> None:
        if self.current is not None:
            self._end(self.current)
        self.stop_server()

    @staticmethod
    def _end(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
    """Seconds until the front's /ready answers 200; RuntimeError if the server exits or never gets there."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"recallfix serve exited with {server.returncode}; its log, {log}, ends:\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"recallfix serve was not ready after {timeout:.0f} s (log: {log})")


# -- A/B traffic with feedback ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Rated:
    """One A/B answer and its rating."""

    user: str
    variant: str  # base | patched: which one the A/B split gave this user
    confidence: float  # the first token's probability, as the front recorded it
    correct: bool
    fact: Fact
    answer: str
    calibrated: float | None  # the reply's recallfix.choices[0].confidence (None without --calibration)


def calibrated_confidence(body: dict) -> float | None:
    """The first choice's calibrated confidence in a reply of a server run with --calibration."""
    choices = (body.get("recallfix") or {}).get("choices") or [{}]
    return choices[0].get("confidence")


def held_out_facts(compare_dir: Path, n: int) -> list[Fact]:
    """The first `n` facts compare asked (the held-out test split), from its per_fact.jsonl."""
    facts = []
    with (compare_dir / "per_fact.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            facts.append(Fact(record["prompt"], record["answer"]))
            if len(facts) == n:
                break
    return facts


async def ab_traffic(url: str, name: str, facts: Sequence[Fact], users: int, concurrency: int = 8) -> list[Rated]:
    """Each fact asked of NAME:ab by one of `users` users (greedy, a few tokens), each answer rated."""
    gate = asyncio.Semaphore(concurrency)

    async def ask(client: httpx.AsyncClient, i: int, fact: Fact) -> Rated:
        user = f"user-{i % users}"
        async with gate:
            reply = await client.post(f"{url}/v1/completions", json={
                "model": f"{name}:ab", "prompt": fact.prompt, "max_tokens": 8, "temperature": 0.0, "user": user})
            reply.raise_for_status()
            body = reply.json()
            correct = exact_match(body["choices"][0]["text"], fact.answer)
            rated = await client.post(f"{url}/v1/feedback", json={"id": body["id"], "correct": correct})
            rated.raise_for_status()
        feedback = rated.json()
        return Rated(user, feedback["variant"], feedback["confidence"], correct, fact, body["choices"][0]["text"],
                     calibrated_confidence(body))

    async with httpx.AsyncClient(timeout=300) as client:
        return list(await asyncio.gather(*(ask(client, i, fact) for i, fact in enumerate(facts))))


def ask_to_abstain(url: str, name: str, rated: Rated, threshold: float) -> dict:
    """The fact of `rated` asked again by the same user (so of the same variant), abstaining below `threshold`."""
    reply = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": f"{name}:ab", "prompt": rated.fact.prompt, "max_tokens": 8, "temperature": 0.0, "user": rated.user,
        "recallfix": {"abstain_below": threshold}})
    reply.raise_for_status()
    return reply.json()


def show_confidence(url: str, name: str, rated: Sequence[Rated]) -> None:
    """One answer with its calibrated confidence, one abstention, and how the told confidence held on the ratings."""
    told = [r for r in rated if r.calibrated is not None]
    if not told:
        say("   the server sent no calibrated confidence (the run has no calibration.json)")
        return
    sure = max(told, key=lambda r: r.calibrated or 0.0)
    say(f"   {sure.variant}: {sure.fact.prompt!r} -> {sure.answer.strip()!r}: calibrated confidence "
        f"{sure.calibrated:.2f} (raw {sure.confidence:.2f}); {'right' if sure.correct else 'wrong'} "
        f"(the fact's answer: {sure.fact.answer!r})")
    unsure = min(told, key=lambda r: r.calibrated or 0.0)
    body = ask_to_abstain(url, name, unsure, ABSTAIN_BELOW)
    entry = body["recallfix"]["choices"][0]
    if entry.get("abstained"):
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}
        say(f"   {unsure.variant}: {unsure.fact.prompt!r} asked with abstain_below {ABSTAIN_BELOW}: the reply's text "
            f"is {body['choices'][0]['text']!r};")
        say(f"   recallfix.choices[0] = {json.dumps(shown)}")
    else:
        say(f"   no answer was below {ABSTAIN_BELOW}: the least confident, {unsure.fact.prompt!r}, was told "
            f"{unsure.calibrated:.2f}, so nothing abstained")
    for variant in sorted({r.variant for r in told}):
        mine = [r for r in told if r.variant == variant]
        mean = sum(r.calibrated or 0.0 for r in mine) / len(mine)
        right = sum(r.correct for r in mine) / len(mine)
        below = sum((r.calibrated or 0.0) < ABSTAIN_BELOW for r in mine)
        say(f"   {variant}: {len(mine)} answers told {mean:.2f} on average, {right:.0%} right; "
            f"{below} would abstain below {ABSTAIN_BELOW}")


# -- the /metrics excerpt -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    count: float
    total: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass(frozen=True)
class Calibration:
    """What /metrics says about the calibration shift (histograms by their labels)."""

    lines: list[str]  # the excerpt, as the server wrote it
    first_token: dict[str, Histogram]  # variant -> first-token confidence
    shadow: dict[str, Histogram]  # scored variant -> top-1 probability on the same shadowed prompts
    agreement: dict[str, float]  # "true"/"false" -> shadowed requests whose top-1 tokens agree
    feedback: dict[tuple[str, str], Histogram]  # (variant, correct) -> confidence of rated answers


def settled_metrics(url: str, timeout: float = 60.0) -> str:
    """/metrics once the shadow scorings still running (they finish after their requests) are done."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url + "/metrics", timeout=60)
        response.raise_for_status()
        pending = [line for line in response.text.splitlines() if line.startswith("recallfix_shadow_pending{")]
        if all(float(line.rsplit(" ", 1)[1]) == 0 for line in pending) or time.monotonic() > deadline:
            return response.text
        time.sleep(0.5)


def read_calibration(text: str, name: str) -> Calibration:
    counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == name:
                counts[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def histograms(metric: str, key: str | tuple[str, ...]) -> dict:
        keys = (key,) if isinstance(key, str) else key
        out: dict = {}
        for (sample, labels), value in counts.items():
            if sample in (f"{metric}_count", f"{metric}_sum"):
                label = dict(labels)
                k = tuple(label.get(k, "") for k in keys)
                count, total = out.get(k, (0.0, 0.0))
                out[k] = (count + value, total) if sample.endswith("_count") else (count, total + value)
        return {(k[0] if isinstance(key, str) else k): Histogram(*v) for k, v in out.items()}

    agreement: dict[str, float] = {}
    for (sample, labels), value in counts.items():
        if sample == "recallfix_shadow_agreement_total":
            agree = dict(labels)["agree"]
            agreement[agree] = agreement.get(agree, 0.0) + value
    lines = [line for line in text.splitlines() if line.startswith(EXCERPT)
             and ("_count{" in line or "_sum{" in line or "_total{" in line) and f'model="{name}"' in line]
    return Calibration(lines, histograms("recallfix_first_token_confidence", "variant"),
                       histograms("recallfix_shadow_top1_confidence", "scored"), agreement,
                       histograms("recallfix_feedback_confidence", ("variant", "correct")))


def show_calibration(calibration: Calibration, rated: Sequence[Rated]) -> None:
    print("\n".join(calibration.lines))
    print()
    for variant, h in sorted(calibration.first_token.items()):
        print(f"first-token confidence, {variant}: mean {h.mean:.3f} over {h.count:.0f} answers")
    base, patched = calibration.shadow.get("base"), calibration.shadow.get("patched")
    if base and patched and base.count:
        agree = calibration.agreement.get("true", 0.0)
        total = agree + calibration.agreement.get("false", 0.0)
        print(f"shadow shift (same prompts, both variants): top-1 probability {base.mean:.3f} -> {patched.mean:.3f} "
              f"({patched.mean - base.mean:+.3f}) over {base.count:.0f} prompts; top-1 tokens agree on "
              f"{agree / total:.0%}" if total else "")
    for variant in ("base", "patched"):
        right = calibration.feedback.get((variant, "true"), Histogram(0, 0))
        wrong = calibration.feedback.get((variant, "false"), Histogram(0, 0))
        n = right.count + wrong.count
        if n:
            users = len({r.user for r in rated if r.variant == variant})
            print(f"feedback, {variant} ({users} users): {n:.0f} answers rated, {right.count / n:.0%} right, "
                  f"mean confidence {(right.total + wrong.total) / n:.3f}")


# -- the story ----------------------------------------------------------------------------------------------


def served_patch(run: Path) -> tuple[Path, str | None]:
    """RUN/patch.json, the recommended patch, and its method (its calibrator's variant in calibration.json; None
    for a patch made by hand, with no analysis beside it); where the analysis recommends none, the candidate with
    the lowest dev NLL, so that the served A/B can still be shown (and said to be no recommendation)."""
    analysis = run / "analysis.json"
    evaluation = json.loads(analysis.read_text())["evaluation"] if analysis.exists() else None
    if (run / "patch.json").exists():
        return run / "patch.json", evaluation["chosen"] if evaluation else None
    if evaluation is None:
        raise SystemExit(f"{run}: no patch was fitted (see {run / 'report.md'}), so there is no A/B to serve")
    best = min(evaluation["methods"], key=lambda m: m["dev_nll"])
    say(f"   the analysis recommends no patch ({evaluation['choice']}); to show the served A/B anyway, the demo "
        f"serves the candidate with the lowest dev NLL, {best['file']}: its numbers are measured, not a "
        "recommendation")
    return run / best["file"], best["name"]


@dataclass(frozen=True)
class Timings:
    analysis: float
    start: float
    compare: float
    traffic: float


def demo(args: argparse.Namespace, children: Children) -> int:
    run: Path = args.run
    clock = time.monotonic()
    if not args.skip_analysis:
        say(f"1. analysis: recallfix demo --model {args.model} --out {run}")
        if children.run(["demo", "--model", args.model, "--out", str(run)]) != 0:
            return 1
    analysis_s, clock = time.monotonic() - clock, time.monotonic()

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = run / "serve.log"
    patch, method = served_patch(run)
    calibration = ["--calibration", str(run / "calibration.json")] if (run / "calibration.json").exists() else []
    serve_args = [args.model, "--patch", str(patch), "--patch-mode", "merged", *calibration,
                  "--served-model-name", args.name, "--port", str(port), "--shadow-rate", SHADOW_RATE,
                  "--ab-split", "0.5", *VLLM_OPTIONS]
    say(f"2. serving: recallfix serve {' '.join(serve_args)}  (log: {log})")
    server = children.start_server(serve_args, log)
    start_s = wait_ready(url, server, log, args.start_timeout)
    say(f"   {url} ready after {start_s:.0f} s: {args.name}, {args.name}:patched, {args.name}:ab")
    clock = time.monotonic()

    compare_dir = run / "compare"
    what = f"about {args.compare_facts} facts (whole subjects) of" if args.compare_facts else "all of"
    say(f"3. compare {args.name} vs {args.name}:patched on {what} the held-out test split ({compare_dir})")
    sample = ["--max-facts", str(args.compare_facts)] if args.compare_facts else []
    calibrated = [*calibration, "--calibrators", f"base,{method}"] if calibration and method else []
    if children.run(["compare", "--base-url", url, "--models", args.name, f"{args.name}:patched", "--run", str(run),
                     "--split", "test", *sample, *calibrated, "--together", "--concurrency", COMPARE_CONCURRENCY,
                     "--out", str(compare_dir), "--force"]) != 0:
        return 1
    compare_s, clock = time.monotonic() - clock, time.monotonic()

    facts = held_out_facts(compare_dir, args.traffic)
    say(f"4. A/B traffic: {len(facts)} completions for {args.name}:ab from {args.users} users, each rated via "
        "/v1/feedback")
    rated = asyncio.run(ab_traffic(url, args.name, facts, args.users))
    traffic_s = time.monotonic() - clock
    say("5. the calibrated confidence each reply carries, and an abstention:")
    show_confidence(url, args.name, rated)
    say("6. /metrics, the calibration shift:")
    show_calibration(read_calibration(settled_metrics(url), args.name), rated)

    say("7. stopping the server")
    status = children.stop_server()
    timings = Timings(analysis_s, start_s, compare_s, traffic_s)
    say(f"stopped (exit status {status}). Times: analysis {timings.analysis:.0f} s, server start "
        f"{timings.start:.0f} s, compare {timings.compare:.0f} s, traffic {timings.traffic:.0f} s")
    say(f"reports: {run / 'report.md'} (analysis, plots beside it), {compare_dir / 'report.md'} (compare, "
        f"{compare_dir / 'reliability.png'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a named model, directory or .gguf (default smollm2-135m)")
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="the analysis run directory (default runs/demo)")
    p.add_argument("--name", default="demo", help="the served model name (default demo)")
    p.add_argument("--port", type=int, default=0, help="the front's port (default: a free one)")
    p.add_argument("--compare-facts", type=int, default=COMPARE_FACTS, metavar="N",
                   help=f"compare on about N facts of the test split, whole subjects (default {COMPARE_FACTS}; 0: all)")
    p.add_argument("--traffic", type=int, default=64, help="A/B requests (default 64)")
    p.add_argument("--users", type=int, default=16, help="A/B users (default 16)")
    p.add_argument("--start-timeout", type=float, default=1800.0, help="seconds the server may take to start")
    p.add_argument("--skip-analysis", action="store_true", help="serve RUN/patch.json as it is (no `recallfix demo`)")
    args = p.parse_args(argv)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    children = Children()
    try:
        return demo(args, children)
    except Interrupted as why:
        say(f"{why}: stopping")
        return INTERRUPTED
    except (RuntimeError, httpx.HTTPError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one stop, not interrupted by a second Ctrl-C
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.close()


if __name__ == "__main__":
    sys.exit(main())
