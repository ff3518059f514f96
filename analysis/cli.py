"""Subcommands this package adds to the `recallfix` console script."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_DEMO_MODEL = Path(".cache/demo-model")


def register(subcommands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the `recallfix` parser."""
    from recallfix.analysis.demo_model import add_cli as add_demo_model_cli  # `recallfix demo-model`

    add_demo_model_cli(subcommands)
    add_analyze_cli(subcommands)
    add_demo_cli(subcommands)


def _analysis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="run directory to write (RUN)")
    p.add_argument("--force", action="store_true", help="replace RUN if it exists")
    p.add_argument("--seed", type=int, default=0, help="splits, fit and bootstrap seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    p.add_argument("--max-facts", type=int, default=None, help="use at most N fact prompts (whole subjects)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    p.add_argument("--mlp", choices=["whole", "neurons", "none"], default="whole",
                   help="how the final MLP enters the patch (default: whole)")
    p.add_argument("--max-neurons", type=int, default=32, help="with --mlp neurons: at most N neurons (default 32)")
    p.add_argument("--components", default=None,
                   help="fit gains on exactly these final-layer components, comma-separated (e.g. L11H3,L11MLP) "
                        "instead of the ones found to suppress the answer")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    _analysis_options(p)
    p.set_defaults(func=cmd_analyze)


def add_demo_cli(subcommands: argparse._SubParsersAction) -> None:
    p = subcommands.add_parser(
        "demo",
        help="train (or reuse) the demo model and analyse it end to end",
        description="`recallfix demo-model` then `recallfix analyze` on the shipped facts, the model's unknown "
                    "subjects and neutral text. Prints where the report is.",
    )
    p.add_argument("--model-dir", type=Path, default=DEFAULT_DEMO_MODEL,
                   help=f"where the demo model is built or found (default {DEFAULT_DEMO_MODEL})")
    p.add_argument("--size", choices=["default", "tiny"], default="default", help="demo model size")
    _analysis_options(p)
    p.set_defaults(func=cmd_demo)


def _config(args: argparse.Namespace):  # -> AnalysisConfig (imported lazily: torch is slow to import)
    from recallfix.analysis.pipeline import AnalysisConfig

    return AnalysisConfig(seed=args.seed, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                          max_facts=args.max_facts, n_boot=args.n_boot, mlp=args.mlp, max_neurons=args.max_neurons,
                          components=tuple(c.strip() for c in args.components.split(",")) if args.components else None,
                          progress=not args.no_progress)


def _summary(result, out: Path) -> None:  # noqa: ANN001 (AnalysisResult, imported lazily)
    print(result.verdict.text)
    for c in result.criteria:
        status = {True: "PASS", False: "FAIL", None: "n/a"}[c.passed]
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        print(f"  [{status}] {c.description}: {value}")
    print(f"report: {out / 'report.md'}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from recallfix.analysis.facts import shipped_facts_dir
    from recallfix.analysis.pipeline import run_analysis

    facts = args.facts or shipped_facts_dir()
    result = run_analysis(args.model, facts, args.out, unknown=args.unknown, neutral=args.neutral,
                          config=_config(args), command="recallfix " + shlex.join(sys.argv[1:]), force=args.force)
    _summary(result, args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recallfix.analysis.demo_model import build_demo_model
    from recallfix.analysis.facts import shipped_facts_dir
    from recallfix.analysis.pipeline import run_analysis

    model_dir = build_demo_model(args.model_dir, size=args.size, seed=0, progress=not args.no_progress)
    result = run_analysis(model_dir, shipped_facts_dir(), args.out, config=_config(args),
                          command="recallfix " + shlex.join(sys.argv[1:]), force=args.force)
    _summary(result, args.out)
    return 0
