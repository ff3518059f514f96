"""Subcommands this package adds to the `recallfix` console script: `demo-model`, `analyze` and `demo`.

The analysis options of `analyze` and `demo` are derived from `config.AnalysisConfig` (defaults and help
stated there once); the demo sizes are `demo_model.SIZES`.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
from pathlib import Path

from recallfix.analysis.config import AnalysisConfig, add_options, from_args
from recallfix.analysis.schema import AnalysisResult

DEFAULT_DEMO_MODEL = Path(".cache/demo-model")


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `recallfix` parser."""
    from recallfix.analysis.demo_model import add_cli as add_demo_model_cli  # `recallfix demo-model`

    add_demo_model_cli(subcommands)
    add_analyze_cli(subcommands)
    add_demo_cli(subcommands)


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="run directory to write (RUN)")
    p.add_argument("--force", action="store_true", help="replace RUN if it exists")
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
    p.add_argument("--facts", type=Path, default=None,
                   help="facts file (.jsonl or relation .json) or folder (default: the shipped facts set)")
    p.add_argument("--unknown", type=Path, default=None,
                   help="prompts about unknown subjects (.jsonl); default: MODEL/unknown_facts.jsonl if present")
    p.add_argument("--neutral", type=Path, default=None,
                   help="neutral text, one line per sample; default: MODEL/neutral.txt or a built-in set")
    _run_options(p)
    p.set_defaults(func=cmd_analyze)


def add_demo_cli(subcommands: argparse._SubParsersAction) -> None:
    from recallfix.analysis.demo_model import SIZES, build_demo_model

    p = subcommands.add_parser(
        "demo",
        help="train (or reuse) the demo model and analyse it end to end",
        description="`recallfix demo-model` then `recallfix analyze` on the shipped facts, the model's unknown "
                    "subjects and neutral text. Prints where the report is.",
    )
    p.add_argument("--model-dir", type=Path, default=DEFAULT_DEMO_MODEL,
                   help=f"where the demo model is built or found (default {DEFAULT_DEMO_MODEL})")
    size = inspect.signature(build_demo_model).parameters["size"].default  # stated there
    p.add_argument("--size", choices=list(SIZES), default=size, help=f"demo model size (default {size})")
    _run_options(p)
    p.set_defaults(func=cmd_demo)


def _summary(result: AnalysisResult, out: Path) -> None:
    print(result.verdict.text)
    for c in result.criteria:
        status = {True: "PASS", False: "FAIL", None: "n/a"}[c.passed]
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        print(f"  [{status}] {c.description}: {value}")
    print(f"report: {out / 'report.md'}")


def _command() -> str:
    return "recallfix " + shlex.join(sys.argv[1:])


def cmd_analyze(args: argparse.Namespace) -> int:
    from recallfix.analysis.facts import shipped_facts_dir
    from recallfix.analysis.pipeline import run_analysis

    facts = args.facts or shipped_facts_dir()
    result = run_analysis(args.model, facts, args.out, unknown=args.unknown, neutral=args.neutral,
                          config=from_args(AnalysisConfig, args), command=_command(), force=args.force)
    _summary(result, args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recallfix.analysis.demo_model import build_demo_model
    from recallfix.analysis.facts import shipped_facts_dir
    from recallfix.analysis.pipeline import run_analysis

    config = from_args(AnalysisConfig, args)
    model_dir = build_demo_model(args.model_dir, size=args.size, seed=0, progress=config.progress)
    result = run_analysis(model_dir, shipped_facts_dir(), args.out, config=config, command=_command(),
                          force=args.force)
    _summary(result, args.out)
    return 0
