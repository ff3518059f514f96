"""The `recallfix` console script (its parser and `main`) and its `patch` subcommands.

Subcommands are plugins (entry-point group `recallfix.commands`): each package registers its own,
so this hub never imports analysis/ or server/.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, entry_points, metadata
from pathlib import Path

from .memory import keep_freed_memory
from .version import __version__

log = logging.getLogger("recallfix")

DEFAULT_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The Eiffel Tower is in"]


def _parse_edit(text: str) -> tuple[str, float]:
    name, sep, gain = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--edit {text!r}: expected COMPONENT=GAIN, e.g. L11H3=0.5")
    try:
        value = float(gain)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--edit {text!r}: gain {gain!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--edit {text!r}: gain must be finite")
    return name.strip(), value


def cmd_new(args: argparse.Namespace) -> int:
    from .apply import make_patch
    from .registry.load import load_model

    gains = dict(args.edit)
    if len(gains) != len(args.edit):
        raise ValueError("--edit: a component is given twice")
    model = load_model(args.model, trust_remote_code=args.trust_remote_code)
    command = "recallfix " + shlex.join(sys.argv[1:])
    patch = make_patch(model, gains, command=command)
    patch.save(args.out)
    print(f"wrote {args.out}: patch {patch.id}, {len(patch.edits)} edit(s) on {patch.model.architecture}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .patch import Patch

    patch = Patch.load(args.patch)
    fp = patch.model
    print(f"patch {patch.id}  (schema v{patch.schema_version})")
    print(f"model   {fp.architecture}: {fp.num_layers} layers, hidden {fp.hidden_size}, "
          f"{fp.num_heads} heads ({fp.num_kv_heads} kv), vocab {fp.vocab_size}")
    print(f"made    {patch.provenance.created} by recallfix {patch.provenance.tool_version}")
    if patch.provenance.command:
        print(f"command {patch.provenance.command}")
    if patch.provenance.dataset_sha256:
        print(f"dataset sha256 {patch.provenance.dataset_sha256}")
    print("edits:")
    for edit in patch.edits:
        print(f"  {edit.component:<12} {edit.describe()}")
    for name, value in patch.metrics.items():
        print(f"metric  {name} = {value}")
    if args.model:
        from .checkpoint import Checkpoint
        from .export import export_refusals

        ckpt = Checkpoint.open(args.model, args.trust_remote_code)
        ckpt.check(patch)
        refusals = export_refusals(ckpt, patch)
        verdicts = {fmt: f"no, {reason}" if reason else "yes" for fmt, reason in refusals.items()}
        print(f"applies to {args.model}: yes; merged export: {verdicts['merged']}; LoRA export: {verdicts['lora']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_lora, export_merged
    from .patch import Patch

    patch = Patch.load(args.patch)
    export = export_merged if args.format == "merged" else export_lora
    out = export(args.model, patch, args.out, overwrite=args.force, trust_remote_code=args.trust_remote_code)
    print(f"wrote {args.format} export of patch {patch.id} to {out}")
    return 0


def cmd_apply_check(args: argparse.Namespace) -> int:
    """Load the patch three ways and print how far apart their logits are."""
    import torch

    from .apply import apply_patch
    from .export import LoraUnsupportedError, export_lora, export_merged
    from .patch import Patch
    from .registry.load import load_causal_lm, load_model

    patch = Patch.load(args.patch)
    model, tokenizer = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    prompts = args.prompt or DEFAULT_PROMPTS

    @torch.no_grad()
    def logits(lm: torch.nn.Module) -> list[torch.Tensor]:
        return [lm(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in prompts]

    base = logits(model)
    with apply_patch(model, patch):
        in_memory = logits(model)
    results = {"in-memory vs base": _max_diff(in_memory, base)}
    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = export_merged(args.model, patch, Path(tmp) / "merged")
        merged = load_model(merged_dir)
        results["merged vs in-memory"] = _max_diff(logits(merged), in_memory)
        del merged
        try:
            from peft import PeftModel

            adapter = export_lora(args.model, patch, Path(tmp) / "lora")
            peft_model = PeftModel.from_pretrained(load_model(args.model), adapter).eval()
            results["lora vs in-memory"] = _max_diff(logits(peft_model), in_memory)
        except LoraUnsupportedError as err:
            print(f"lora: not available ({err})")
    for name, diff in results.items():
        print(f"{name:<22} max |logit diff| = {diff:.3e}")
    agree = [v for k, v in results.items() if k != "in-memory vs base"]
    if any(v > args.tolerance for v in agree):
        print(f"FAIL: the ways of applying the patch differ by more than {args.tolerance}")
        return 1
    print(f"OK: all ways agree within {args.tolerance} on {len(prompts)} prompt(s)")
    return 0


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def register(subcommands: argparse._SubParsersAction) -> None:
    patch = subcommands.add_parser("patch", help="create, inspect, export and check patches")
    sub = patch.add_subparsers(dest="patch_command", required=True, metavar="{new,inspect,export,apply-check}")

    def model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--model", required=required, help="model directory or Hugging Face hub name")
        p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")

    new = sub.add_parser("new", help="write a patch by hand (fingerprint computed)")
    model_args(new)
    new.add_argument("--edit", action="append", type=_parse_edit, required=True, metavar="COMPONENT=GAIN",
                     help="e.g. L11H3=0.5, L11N1024=1.3, L11MLP=0.9 (repeatable)")
    new.add_argument("--out", required=True, type=Path)
    new.set_defaults(func=cmd_new)

    inspect = sub.add_parser("inspect", help="print a patch; with --model, check it applies")
    inspect.add_argument("patch", type=Path)
    model_args(inspect, required=False)
    inspect.set_defaults(func=cmd_inspect)

    export = sub.add_parser("export", help="write a merged checkpoint or a PEFT LoRA adapter")
    model_args(export)
    export.add_argument("--patch", required=True, type=Path)
    export.add_argument("--format", choices=["merged", "lora"], default="merged")
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(func=cmd_export)

    check = sub.add_parser("apply-check", help="compare in-memory, merged and LoRA application")
    model_args(check)
    check.add_argument("--patch", required=True, type=Path)
    check.add_argument("--prompt", action="append", help="prompt to compare on (repeatable)")
    check.add_argument("--tolerance", type=float, default=1e-4)
    check.set_defaults(func=cmd_apply_check)


def summary() -> str:
    """What recallfix does, in one line: the package's summary (pyproject's `description`)."""
    try:
        return metadata("recallfix")["Summary"]
    except PackageNotFoundError:  # a source tree that was never installed
        return "recallfix"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recallfix", description=summary())
    parser.add_argument("--version", action="version", version=f"recallfix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for ep in sorted(entry_points(group="recallfix.commands"), key=lambda e: e.name):
        ep.load()(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, KeyError) as err:
        # User errors (bad patch, wrong model, missing file) get one clear line, not a traceback.
        if args.verbose:
            raise
        print(f"recallfix: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
