"""`recallfix analyze` before (the code of commit 8590e74) and after (this checkout), side by side.

Each side runs in its own fresh process, back to back, on the same model, facts and machine; the report is the
ratio of wall times and of each stage's time (RUN/analysis.json `runtime_s`), plus what each run found (the
components given a gain, the gains, the patch's files), written into docs/benchmarks.md between markers.

The "before" code: --baseline DIR (a folder holding a `recallfix` package), else /tmp/basepkgs when it exists,
else a `git worktree` of commit 8590e74 made for the run (and removed after).

    python bench/bench_analysis.py [--model smollm2-135m] [--max-facts N] [--skip-before]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench_doc import commit, machine, markers, write_section  # bench/ is on sys.path: these run as scripts

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "8590e74"
BEGIN, END = markers("bench_analysis")
GAIN_TOLERANCE = 0.1  # |gain after - gain before| within which two fits find "the same" patch (the fit's own noise)


@contextmanager
def baseline_package(given: str | None) -> Iterator[Path]:
    """A folder whose `recallfix` package is the baseline code."""
    if given:
        yield Path(given)
        return
    if Path("/tmp/basepkgs/recallfix").is_dir():
        yield Path("/tmp/basepkgs")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), BASELINE_COMMIT], check=True)
        try:
            pkg = Path(tmp) / "pkgs" / "recallfix"
            pkg.mkdir(parents=True)
            for part in ("analysis", "patches", "server"):
                (pkg / part).symlink_to(tree / part)
            yield pkg.parent
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def run_side(name: str, pythonpath: Path | None, model: str, max_facts: int | None, out: Path) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [sys.executable, "-m", "recallfix.patches.cli", "analyze", "--model", model, "--out", str(out),
               "--force", "--no-progress", "--seed", "0"] + (["--max-facts", str(max_facts)] if max_facts else [])
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: a check failed, the run itself is complete
        sys.exit(f"{name} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    analysis = json.loads((out / "analysis.json").read_text())
    patch = json.loads((out / "patch.json").read_text()) if (out / "patch.json").exists() else {"edits": []}
    gains = {e["component"]: e["gain"] for e in patch.get("edits", []) if "gain" in e}
    gains_file = out / "patch.gains.json"  # with --method both the gains may be the other file
    if gains_file.exists():
        gains = {e["component"]: e["gain"] for e in json.loads(gains_file.read_text())["edits"] if "gain" in e}
    return {"wall_s": round(wall, 1), "runtime_s": analysis.get("runtime_s", {}), "gains": gains,
            "command": " ".join(command[1:])}


def machine_info() -> str:
    import torch
    import transformers

    return (machine(f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
                    f"transformers {transformers.__version__}")
            + f", load average before the runs {os.getloadavg()[0]:.1f}")


def report(before: dict | None, after: dict, args: argparse.Namespace, info: str) -> str:
    lines = [BEGIN, "## `recallfix analyze` (bench/bench_analysis.py)", "",
             f"- machine: {info}", f"- code: after = {commit()}; before = commit {BASELINE_COMMIT}",
             f"- command: `{after['command']}`", ""]
    stages = list(after["runtime_s"])
    if before:
        stages = list(dict.fromkeys([*before["runtime_s"], *stages]))
    lines += ["| stage | before (s) | after (s) | before / after |", "|---|---:|---:|---:|"]
    for stage in [*stages, "wall (process)"]:
        a = after["wall_s"] if stage == "wall (process)" else after["runtime_s"].get(stage)
        b = (before["wall_s"] if stage == "wall (process)" else before["runtime_s"].get(stage)) if before else None
        ratio = f"{b / a:.2f}" if a and b else "-"
        lines.append(f"| {stage} | {b if b is not None else '-'} | {a if a is not None else '-'} | {ratio} |")
    lines.append("")
    if before:
        same = set(before["gains"]) == set(after["gains"])
        diff = max((abs(before["gains"][k] - after["gains"][k]) for k in after["gains"] if k in before["gains"]),
                   default=0.0)
        lines += [f"- components given a gain: before {sorted(before['gains'])}, after {sorted(after['gains'])} "
                  f"({'same' if same else 'DIFFERENT'})",
                  f"- largest |gain after - gain before|: {diff:.4f} (tolerance {GAIN_TOLERANCE}: "
                  f"{'within' if same and diff <= GAIN_TOLERANCE else 'OUTSIDE'})"]
    lines += [f"- gains after: {after['gains']}", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-facts", type=int, default=None)
    parser.add_argument("--baseline", default=None, help="a folder holding the baseline `recallfix` package")
    parser.add_argument("--skip-before", action="store_true", help="only time this checkout")
    args = parser.parse_args()
    from recallfix.patches.registry.models import resolve_model

    model = str(resolve_model(args.model))  # the baseline has no model registry: pass the folder
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        before = None
        if not args.skip_before:
            with baseline_package(args.baseline) as pkgs:
                before = run_side("before", pkgs, model, args.max_facts, Path(tmp) / "before")
                print(f"before: {before['wall_s']} s {before['runtime_s']}", flush=True)
        after = run_side("after", None, model, args.max_facts, Path(tmp) / "after")
        print(f"after: {after['wall_s']} s {after['runtime_s']}", flush=True)
    section = report(before, after, args, info)
    write_section("bench_analysis", section)
    print(section)


if __name__ == "__main__":
    main()
