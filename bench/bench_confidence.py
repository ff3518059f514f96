"""What the calibrated confidence costs: `recallfix router` with and without `--calibration`, side by side.

One vLLM server of the base checkpoint; two fronts before it, the same `recallfix router` but for `--calibration`
(a calibration file of the model with a logistic-tail calibrator, the family that reads the most of the top-20
logprobs). Both fronts already ask vLLM for the top-20 logprobs of each generated token (for their metrics), so the
difference is the calibrator applied to every answer, the `recallfix` field written into each reply and its
histogram observed. Each round runs both in turn, in alternating order (ABBA), so that a drift of the machine's
load falls on both alike; the throughput ratio is the median of the rounds' paired ratios. Issue 20's goal: the
field costs at most 2% of throughput (ratio >= 0.98). The rounds spread by a few percent either way, so the work
the field adds is also timed on its own: the front's scoring of one choice (`Judge.score`, the calibrator on its
first token's top-20 logprobs) and the field it writes, per reply, against the replies' median latency.

    python bench/bench_confidence.py [--model smollm2-135m] [--rounds 20] [--requests 64] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_doc import commit, markers, spread, write_section  # bench/ is on sys.path: these run as scripts
from bench_serve import VLLM_OPTIONS, Run, Server, machine_info, one_run, percentile

CODE = ("server", "patches", "bench")
BEGIN, END = markers("bench_confidence")
NAME = "smol"
GOAL = 0.98  # calibrated/plain throughput: the field costs at most 2%
# A fixed logistic-tail calibrator (the most features): what it says does not change its cost.
CALIBRATOR = {"family": "logistic-tail", "features": ["log_p1", "log1m_p1", "margin", "entropy", "log_tail"],
              "coef": [0.7, -0.2, 0.2, -0.3, -0.1, -0.4]}


def calibration_file(model_dir: Path, out: Path) -> Path:
    from recallfix.patches.calibrator import CalibrationFile, Calibrator, VariantCalibration, final_block_fingerprint
    from recallfix.patches.patch import Provenance

    variant = VariantCalibration(patch_id=None, calibrator=Calibrator(**CALIBRATOR))
    CalibrationFile(model=final_block_fingerprint(model_dir), fitted_on="bench",
                    variants={"base": variant}, recommended=None,
                    provenance=Provenance(tool_version="bench")).save(out)
    return out


def per_reply_seconds(calibration: Path, repeats: int = 20000) -> float:
    """Seconds the front spends on one reply's confidence: a choice scored and the field serialised."""
    from recallfix.patches.calibrator import CalibrationFile
    from recallfix.server.confidence import Judge
    from recallfix.server.observe import TokenLogprobs

    variant = CalibrationFile.load(calibration).variants["base"]
    top = tuple((f" t{i}", math.log(0.5 / 2**i)) for i in range(20))
    first = TokenLogprobs(" t0", top[0][1], top)
    start = time.perf_counter()
    for _ in range(repeats):
        judge = Judge("base", variant, threshold=0.5, abstain_text="I don't know.")
        judge.score(0, first)
        json.dumps({"recallfix": judge.field()})
    return (time.perf_counter() - start) / repeats


def report(runs: dict[str, list[Run]], args: argparse.Namespace, info: str, loads: list[float],
           per_reply_s: float) -> str:
    rates = {target: [run.tokens_per_s for run in r] for target, r in runs.items()}
    paired = [c / p for c, p in zip(rates["calibrated"], rates["plain"], strict=True)]
    ratio = statistics.median(paired)
    p50 = {t: percentile([x for run in r for x in run.latencies_s], 0.5) for t, r in runs.items()}
    lines = [BEGIN, "## The calibrated confidence's cost (bench/bench_confidence.py)", "",
             f"- machine: {info}; load average {min(loads):.1f}-{max(loads):.1f} during the rounds",
             f"- code: {commit(*CODE)}; model {args.model}; one vLLM server (`{' '.join(VLLM_OPTIONS)}`, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}) behind both fronts",
             f"- a run: {args.requests} completions, {args.concurrency} at a time, {args.max_tokens} tokens each "
             f"(ignore_eos, greedy, the `openai` client); one warm-up run each, then {args.rounds} rounds, ABBA", "",
             "| front | generated tokens/s, median [min-max] of rounds | p50 latency (s) |", "|---|---:|---:|",
             f"| `recallfix router` | {spread(rates['plain'], 1)} | {p50['plain']:.2f} |",
             f"| `recallfix router --calibration` | {spread(rates['calibrated'], 1)} | {p50['calibrated']:.2f} |", "",
             "| ratio | measured | goal | reached |", "|---|---:|---:|---|",
             f"| calibrated/plain throughput (median of paired rounds, [min-max]) | {spread(paired, 3)} | >= {GOAL} | "
             f"{'yes' if ratio >= GOAL else 'no'} |",
             f"| calibrated/plain p50 latency | {p50['calibrated'] / p50['plain']:.3f} | - | - |", "",
             f"The field's own work, timed alone: {per_reply_s * 1e6:.0f} µs per reply (a choice scored by the "
             f"calibrator, the field serialised), {per_reply_s / p50['calibrated']:.1e} of the median reply's "
             f"{p50['calibrated']:.2f} s.", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--start-timeout", type=float, default=1800)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    from recallfix.patches.registry.models import resolve_model

    model_dir = resolve_model(args.model)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        calibration = calibration_file(model_dir, Path(tmp) / "calibration.json")
        vllm = Server("vllm", ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                               "--served-model-name", NAME, "--host", "127.0.0.1", *VLLM_OPTIONS],
                      "/health", Path(tmp) / "vllm.log")
        router = ["-m", "recallfix.server", "router", "--served-model-name", NAME, "--base-url", vllm.url]
        fronts = {"plain": Server("plain", router, "/ready", Path(tmp) / "plain.log"),
                  "calibrated": Server("calibrated", [*router, "--calibration", str(calibration)], "/ready",
                                       Path(tmp) / "calibrated.log")}
        runs: dict[str, list[Run]] = {name: [] for name in fronts}
        loads: list[float] = []
        servers = [vllm, *fronts.values()]
        try:
            for server in servers:
                server.start()
            for server in servers:
                server.wait(args.start_timeout)
            for rnd in range(args.rounds + 1):  # round 0 warms up
                order = list(fronts) if rnd % 2 == 0 else list(reversed(fronts))
                for name in order:
                    run = asyncio.run(one_run(fronts[name].url, NAME, args.requests, args.concurrency,
                                              args.max_tokens))
                    loads.append(os.getloadavg()[0])
                    print(f"round {rnd} {name}: {run.tokens_per_s:.1f} tok/s", flush=True)
                    if rnd:
                        runs[name].append(run)
        finally:
            for server in reversed(servers):
                server.stop()
        per_reply_s = per_reply_seconds(calibration)
    section = report(runs, args, info, loads, per_reply_s)
    if not args.no_write:
        write_section("bench_confidence", section)
    print(section)


if __name__ == "__main__":
    main()
