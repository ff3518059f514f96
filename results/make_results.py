"""`make results`: docs/results.md, every number on it from this one command.

For each model of results/plan.json: `recallfix model get`, `recallfix analyze` on every protocol (facts set and
split), and, for the models whose entry names a `served` protocol, `recallfix serve` with that run's patch and
`recallfix compare` on its test split, checked against the analysis' own numbers. Then `render` writes the page.

Runs are cached under RECALLFIX_CACHE/results/MODEL/PROTOCOL and reused while their inputs key matches (recallfix
version, model files, facts, settings: `analysis.pipeline.inputs_key`), so a second `make results` only renders,
and an interrupted one resumes at the first run not finished. Each run's wall time and peak memory (the process
tree's resident set, sampled every half second) are kept beside it.

    python results/make_results.py [--models a,b] [--protocols p,q] [--root DIR] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from pydantic import BaseModel, ConfigDict
from render import PLAN, Plan, RunRecord, ServedCheck, git_commit, render  # results/ is on sys.path (a script)

from recallfix.analysis.cli import add_analyze_cli
from recallfix.analysis.config import AnalysisConfig
from recallfix.analysis.data.sets import DEFAULT_FACTS
from recallfix.analysis.pipeline import inputs_key
from recallfix.analysis.schema import AnalysisResult
from recallfix.patches import Patch
from recallfix.patches.io import atomic_write_text
from recallfix.patches.options import from_args
from recallfix.patches.registry.models import cache_root

ROOT = Path(__file__).resolve().parents[1]
RECALLFIX = [sys.executable, "-m", "recallfix.patches.cli"]
SERVE_OPTIONS = ["--max-model-len", "512", "--enforce-eager", "--kv-cache-memory-bytes", str(512 * 2**20)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def say(text: str) -> None:
    print(f"[results] {text}", flush=True)


def run_measured(command: list[str], log: Path) -> tuple[int, float, float]:
    """Run `command` with its output to `log`: (exit status, wall seconds, peak GiB of the process tree)."""
    started, peak = time.perf_counter(), 0
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        parent = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.5)
    return child.returncode, time.perf_counter() - started, peak / 2**30


def analyze_argv(plan: Plan, model: str, protocol: str, out: Path) -> list[str]:
    p = plan.protocols[protocol]
    cap = plan.models[model].max_facts.get(protocol)
    return ["analyze", "--model", model, "--facts", p.facts, "--split-by", p.split_by, "--out", str(out),
            *(["--max-facts", str(cap)] if cap else []), *plan.analyze_options, *p.options]


def up_to_date(argv: list[str], out: Path) -> bool:
    """`out` holds a finished run of exactly this command's inputs and settings."""
    record = out / "analysis.json"
    if not record.exists() or not (out / "run.json").exists():
        return False
    parser = argparse.ArgumentParser()
    add_analyze_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    try:
        done = AnalysisResult.model_validate_json(record.read_text())
    except ValueError:  # another version's analysis.json: run again
        return False
    key = inputs_key(args.model, args.facts or DEFAULT_FACTS, None, None, from_args(AnalysisConfig, args))
    return done.inputs_key == key


def analyze(plan: Plan, model: str, protocol: str, root: Path) -> RunRecord:
    out = root / model / protocol
    argv = analyze_argv(plan, model, protocol, out)
    if up_to_date(argv, out):
        say(f"{model} / {protocol}: up to date ({out})")
        return RunRecord.model_validate_json((out / "run.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"{model} / {protocol}: recallfix {' '.join(argv)}")
    code, wall, peak = run_measured([*RECALLFIX, *argv, "--force"], out.parent / f"{protocol}.log")
    if code not in (0, 1):  # 1: a --require check failed, which a results run does not ask for
        raise SystemExit(f"{model} / {protocol}: recallfix analyze failed (exit {code}); see "
                         f"{out.parent / f'{protocol}.log'}")
    record = RunRecord(model=model, protocol=protocol, run=str(out), wall_s=round(wall, 1), peak_gib=round(peak, 2),
                       commit=git_commit())
    atomic_write_text(out / "run.json", record.model_dump_json(indent=2) + "\n")
    say(f"{model} / {protocol}: {wall:.0f} s, peak {peak:.1f} GiB")
    return record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_check(model: str, run: Path, dtype: str) -> ServedCheck:
    """`recallfix serve` in `dtype` with the run's patch (the recommended one, else the lowest dev NLL that is not the
    identity), `recallfix compare` on the run's test split, and the largest differences from the analysis' numbers."""
    result = AnalysisResult.model_validate_json((run / "analysis.json").read_text())
    ev = result.evaluation
    if ev is None:
        raise SystemExit(f"{run}: no patch was fitted, nothing to serve")
    # Where none is recommended, the candidate of lowest dev NLL that changes anything (a fit can end at gains 1.0)
    changing = [m for m in ev.methods if not Patch.load(run / m.file).is_identity()]
    if ev.chosen is None and not changing:
        raise SystemExit(f"{run}: every candidate patch is the identity, nothing to serve")
    method = ev.chosen or min(changing, key=lambda m: m.dev_nll).name
    patch = run / next(m.file for m in ev.methods if m.name == method)
    port, name = free_port(), model
    url = f"http://127.0.0.1:{port}"
    log = run / "serve.log"
    say(f"{model}: recallfix serve with {patch.name} ({log})")
    with log.open("w") as out:
        server = subprocess.Popen([*RECALLFIX, "serve", model, "--patch", str(patch), "--patch-mode", "merged",
                                   "--served-model-name", name, "--port", str(port), "--dtype", dtype, *SERVE_OPTIONS],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        wait_ready(url, server, log)
        compare_dir = run / "served-compare"
        code, wall, _ = run_measured([*RECALLFIX, "compare", "--base-url", url, "--models", name, f"{name}:patched",
                                      "--run", str(run), "--split", "test", "--together", "--out", str(compare_dir),
                                      "--force", "--no-progress"], run / "compare.log")
        if code != 0:
            raise SystemExit(f"{model}: recallfix compare failed (exit {code}); see {run / 'compare.log'}")
    finally:
        if server.poll() is None:  # it may have stopped by itself (a refused patch): its log says why
            os.killpg(server.pid, 15)
            server.wait(timeout=120)
    compared = json.loads((compare_dir / "results.json").read_text())
    diffs = {}
    for key, variant in (("A", "base"), ("B", method)):
        for metric in ("mean_p_answer", "nll", "accuracy"):
            served = compared["overall"]["models"][key][metric]["value"]
            diffs[f"{variant} {metric}"] = abs(served - ev.test.models[variant][metric].value)
    return ServedCheck(run_key=result.inputs_key, model=model, run=str(run), method=method, dtype=dtype,
                       n=compared["overall"]["n"], wall_s=round(wall, 1), max_abs_difference=diffs)


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(2)
    raise SystemExit(f"recallfix serve did not become ready; see {log}")


def main(argv: list[str] | None = None) -> int:
    plan = Plan.load(PLAN)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(plan.models), help="comma-separated, of results/plan.json")
    p.add_argument("--protocols", default=",".join(plan.protocols), help="comma-separated, of results/plan.json")
    p.add_argument("--root", type=Path, default=cache_root() / "results", help="where the runs are cached")
    p.add_argument("--render-only", action="store_true", help="render docs/results.md from the runs already there "
                                                               "(the page always shows every run of the plan found)")
    args = p.parse_args(argv)
    for model in args.models.split(","):
        if model not in plan.models:
            p.error(f"--models: {model!r} is not in {PLAN} ({', '.join(plan.models)})")
        if args.render_only:
            continue
        subprocess.run([*RECALLFIX, "model", "get", model], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        for protocol in plan.runs(model, args.protocols.split(",")):
            analyze(plan, model, protocol, args.root)
        served = plan.models[model].served
        if served and (args.root / model / served / "analysis.json").exists():
            check_file = args.root / model / "served.json"
            run = args.root / model / served
            if not check_file.exists() or json.loads(check_file.read_text())["run_key"] != _key(run):
                check = served_check(model, run, plan.models[model].serve_dtype)
                atomic_write_text(check_file, check.model_dump_json(indent=2) + "\n")
    page = render(plan, args.root, list(plan.models), list(plan.protocols))  # the page shows every run there is
    say(f"wrote {page}")
    return 0


def _key(run: Path) -> str:
    return AnalysisResult.model_validate_json((run / "analysis.json").read_text()).inputs_key


if __name__ == "__main__":
    sys.exit(main())
