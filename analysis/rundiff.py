"""Do two run directories hold the same analysis? `python -m recallfix.analysis.rundiff RUN_A RUN_B`

Compares RUN/analysis.json and RUN/patch.json field by field and prints the JSON path of every difference.
Numbers are compared exactly (JSON floats round-trip exactly, so the same computation gives the same text),
unless --rel-tol is given. Left out, because they differ between any two runs: when a run was made, how long it
took, the command line and the tool version; and, unless --paths, where the inputs were read from (the same
model and facts under another path give the same numbers; the facts' sha256 still has to match).
Exit status 0 when the runs agree, 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# (file, path) pairs that differ between runs of the same analysis
VOLATILE = {
    "analysis.json": [("created",), ("runtime_s",), ("command",), ("tool_version",)],
    "patch.json": [("provenance", "created"), ("provenance", "command"), ("provenance", "tool_version")],
}
INPUT_PATHS = {"analysis.json": [("model", "path"), ("data", "facts_path"), ("data", "unknown_path"),
                                 ("data", "neutral_source")],
               "patch.json": []}


def _drop(doc: Any, path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        if not isinstance(doc, dict) or key not in doc:
            return
        doc = doc[key]
    if isinstance(doc, dict):
        doc.pop(path[-1], None)


def diff(a: Any, b: Any, rel_tol: float = 0.0, where: str = "") -> list[str]:
    """Every JSON path where a and b differ, with both values. Numbers: equal, or within rel_tol."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            path = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                out.append(f"{path}: only in {'b' if key not in a else 'a'}")
            else:
                out += diff(a[key], b[key], rel_tol, path)
        if list(a) != list(b) and not out:
            out.append(f"{where or '(root)'}: same keys in another order")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, rel_tol, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if type(a) is type(b) and (a == b or (rel_tol > 0 and math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0))):
            return []
        return [f"{where}: {a!r} != {b!r}"]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


def diff_runs(run_a: Path, run_b: Path, *, rel_tol: float = 0.0, paths: bool = False) -> list[str]:
    """Differences between the analysis.json and patch.json of two runs ('file: path: a != b')."""
    out = []
    for name in ("analysis.json", "patch.json"):
        fa, fb = Path(run_a) / name, Path(run_b) / name
        if not fa.exists() or not fb.exists():
            if fa.exists() != fb.exists():
                out.append(f"{name}: only in {'a' if fa.exists() else 'b'}")
            continue
        a, b = json.loads(fa.read_text()), json.loads(fb.read_text())
        for path in VOLATILE[name] + ([] if paths else INPUT_PATHS[name]):
            _drop(a, path)
            _drop(b, path)
        out += [f"{name}: {d}" for d in diff(a, b, rel_tol)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recallfix.analysis.rundiff", description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--rel-tol", type=float, default=0.0, help="relative tolerance on numbers (default 0: exact)")
    p.add_argument("--paths", action="store_true", help="also compare the input paths (model.path, ...)")
    args = p.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not (run / "analysis.json").is_file():
            p.error(f"{run}: no analysis.json")
    found = diff_runs(args.run_a, args.run_b, rel_tol=args.rel_tol, paths=args.paths)
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) between {args.run_a} and {args.run_b}"
          + (f" (numbers within rel_tol {args.rel_tol:g})" if args.rel_tol else " (numbers compared exactly)"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
